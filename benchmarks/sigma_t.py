"""Variance voting's temperature sigma_t, swept on trained KL-Loss detectors.

    OMP_NUM_THREADS=1 python benchmarks/sigma_t.py \
        --checkpoint runs/accuracy_synthetic/kl/it800_seed0/checkpoint_0000800.pth \
        --checkpoint runs/accuracy_synthetic/kl/it800_seed1/checkpoint_0000800.pth \
        --out benchmarks/results/sigma_t_synthetic.md

KL-Loss weights each voter by ``exp(-(1 - IoU)^2 / sigma_t) / variance``. The authors' released
code uses ``sigma_t = 0.01``; locconf defaults to 0.02 (see ``locconf.postprocess.var_voting``).
For each checkpoint the val candidates are collected once; hard NMS and variance voting (hard and
Gaussian-soft suppression) are scored on them at every ``--values`` entry, so the rows differ only
in sigma_t. The table gives each seed's AP / AP75 / AP90 and their mean; ``--out`` also gets a
``.json`` beside it with every number.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from locconf.data import collate_fn
from locconf.evaluation import collect_candidates, evaluate_methods
from locconf.experiment import build_datasets, load_trained

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("var-voting", "var-voting+soft")
METRICS = ("AP", "AP75", "AP90")


def sweep(checkpoint: Path, values: list[float], device: str) -> dict:
    """``{"nms": metrics, "var-voting": {sigma_t: metrics}, ...}`` for one checkpoint."""
    model, cfg = load_trained(checkpoint, device=device)
    _, val_ds, val_json = build_datasets(**cfg["data"])
    loader = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_fn)
    candidates = collect_candidates(model, loader, torch.device(device), progress=True)
    if not all("variances" in c for c in candidates):
        raise ValueError(f"--checkpoint {checkpoint}: its candidates carry no 'variances' (not a KL-Loss detector)")
    out = {"nms": evaluate_methods(candidates, str(val_json), ["nms"], val_ds.label_to_cat_id,
                                   per_site=False, progress=False)["nms"]}
    for method in METHODS:
        out[method] = {}
        for v in values:
            res = evaluate_methods(candidates, str(val_json), [method], val_ds.label_to_cat_id,
                                   method_params={method: {"sigma_t": v}}, per_site=False, progress=False)
            out[method][v] = res[method]
    return out


def _cells(metrics: list[dict]) -> str:
    """``AP / AP75 / AP90`` of each seed, then their mean, in percent."""
    seeds = " | ".join("/".join(f"{100 * m[k]:.1f}" for k in METRICS) for m in metrics)
    mean = "/".join(f"{100 * sum(m[k] for m in metrics) / len(metrics):.1f}" for k in METRICS)
    return f"{seeds} | **{mean}**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append", required=True,
                    help="a KL-Loss checkpoint with config.yaml beside it; repeat for several seeds")
    ap.add_argument("--values", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02, 0.04, 0.08])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sigma_t.md")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    bad = [v for v in args.values if not v > 0]
    if bad:
        raise ValueError(f"--values must be positive, got {bad}")
    for ckpt in args.checkpoint:
        if not ckpt.is_file():
            raise ValueError(f"--checkpoint {ckpt}: no such file")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = [sweep(c, args.values, args.device) for c in args.checkpoint]

    head = " | ".join(f"checkpoint {i + 1}" for i in range(len(runs)))
    rows = [f"| nms | - | {_cells([r['nms'] for r in runs])} |"]
    for method in METHODS:
        rows += [f"| {method} | {v:g} | {_cells([r[method][v] for r in runs])} |" for v in args.values]
    text = "\n".join([
        "# Variance voting: AP / AP75 / AP90 against sigma_t",
        "",
        "Written by `python benchmarks/sigma_t.py " + " ".join(f"--checkpoint {c}" for c in args.checkpoint) + "`.",
        "Same candidates in every row of a checkpoint; only sigma_t changes. Percent; the last column is",
        "the mean over the checkpoints. The released KL-Loss code uses 0.01; locconf's default is 0.02.",
        "",
        f"| method | sigma_t | {head} | mean |",
        "|---|---:|" + "---:|" * (len(runs) + 1),
        *rows,
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"checkpoints": [str(c) for c in args.checkpoint], "values": args.values,
         "runs": [{k: (v if k == "nms" else {str(s): m for s, m in v.items()}) for k, v in r.items()} for r in runs]},
        indent=1))
    print(text)


if __name__ == "__main__":
    main()
