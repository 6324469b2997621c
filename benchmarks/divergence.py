"""Does the training diverge? The pretrained NEON recipe at lr 0.02 with a short warm-up, without and with clipping.

    OMP_NUM_THREADS=1 python benchmarks/divergence.py     # -> benchmarks/results/divergence.md

Issue 28: a configuration put together from the README diverged to NaN at step 20 until gradient
clipping was added. The reproduction here: ``locconf.experiment.neon_recipe()`` (ImageNet
EfficientNet-Lite0, frozen BatchNorm and stem, P2-P5 FPN of 64 channels, 400 px NEON tiles) with a
plain Faster R-CNN, batch 2, lr 0.02 (the recipe's 0.01 doubled, the README's Faster R-CNN rate),
a warm-up of 10 iterations (the step decay at 99 % of the run), for ``--iterations`` steps: once with
``clip_grad_norm: null`` (no clipping, the default until now) and once without the key (the
default now, 10). Each run stops at the first non-finite loss (``NonFiniteLossError``: the table
gives its step and message). Needs the NEON data in ``--data`` (``locconf data neon-trees``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_name  # benchmarks/common.py
from locconf.engine.train import NonFiniteLossError
from locconf.experiment import check_config, neon_recipe, run_train

HERE = Path(__file__).resolve().parent


def run(data: Path, iterations: int, warmup: int, clip: str, out: Path) -> dict:
    recipe = neon_recipe()
    train = dict(iterations=iterations, batch_size=2, lr=0.02, warmup_iters=warmup, schedule="step", steps=[0.99],
                 log_every=1, progress=False, seed=0, checkpoint_every=0, out_dir=str(out))
    if clip != "default":
        train["clip_grad_norm"] = None if clip == "null" else float(clip)
    cfg = check_config({"model": dict(arch="rcnn", **recipe["model"]),
                        "data": dict(recipe["data"], root=str(data), fetch=False), "train": train})
    t = time.perf_counter()
    try:
        summary = run_train(cfg)
        result = {"steps": summary["step"], "diverged": None, "loss": summary["losses"]["total"]}
    except NonFiniteLossError as e:
        result = {"steps": None, "diverged": str(e), "loss": None}
    records = [json.loads(line) for line in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    result.update(seconds=time.perf_counter() - t, logged=len(records), max_grad_norm=max(norms) if norms else None,
                  clipped=sum(n > float(clip if clip not in ("default", "null") else 10.0) for n in norms))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/neon"))
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "divergence.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clip in ("null", "default"):
            r = run(args.data, args.iterations, args.warmup, clip, Path(tmp) / clip)
            rows.append((clip, r))
            print(clip, r, flush=True)
    lines = ["| train.clip_grad_norm | steps trained | first non-finite loss | largest gradient norm (clipped steps) "
             "| last total loss | seconds |", "|---|---:|---|---:|---:|---:|"]
    for clip, r in rows:
        label = "null (no clipping)" if clip == "null" else "not set (default: 10)"
        done = r["steps"] if r["steps"] is not None else r["logged"]
        norm = "-" if r["max_grad_norm"] is None else f"{r['max_grad_norm']:.3g} ({r['clipped']} of {r['logged']})"
        loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
        lines.append(f"| {label} | {done} | {r['diverged'] or 'none'} | {norm} | {loss} | {r['seconds']:.0f} |")
    text = "\n".join([
        "# Divergence: the pretrained NEON recipe at lr 0.02, warm-up 10", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/divergence.py --iterations {args.iterations} --warmup "
        f"{args.warmup}` · {cpu_name()} · torch {torch.__version__}, one thread · load average "
        f"{os.getloadavg()[0]:.1f} at the end. Faster R-CNN on `neon_recipe()` (ImageNet EfficientNet-Lite0, "
        "frozen BatchNorm and stem, P2-P5 64 channels, 400 px), batch 2, lr 0.02, linear warm-up over "
        f"{args.warmup} iterations, seed 0; one run per row (steps trained counts the logged steps of a "
        "diverged run).", "", *lines, ""]) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
