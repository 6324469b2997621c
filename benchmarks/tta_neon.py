"""Test-time augmentation on NEON val: no TTA, the flips, all eight symmetries; merged by NMS, by the
head's localization-aware method, or by fusion; AP, AP75 and time, over seeds.

    python benchmarks/tta_neon.py --checkpoint /work/bench/runs/accuracy_neon/{baseline,dir,kl}/it1500_seed{0,1,2}/checkpoint_0001500.pth
    python benchmarks/tta_neon.py --checkpoint \
        /work/bench/runs/accuracy_neon/posthoc_dir/it600_seed{0,1,2}/checkpoint_0000600.pth   # frozen baseline + head

Each checkpoint is rebuilt with ``locconf.experiment.load_trained`` (its recorded configuration) and
run over the val split of its data section once per symmetry of ``locconf.tta.TRANSFORMS`` (one
*pass* each, mapped back to the image), on one CPU thread, timing each pass. The passes of each set
of ``--tta`` (``none``: the identity; ``flips``: identity, left-right, top-bottom; ``all``: the
eight) are then merged in every way the model supports:

* ``nms``: the passes pooled, then NMS (``tta_merge=concat`` with ``--method nms``);
* ``quality``: pooled, then DIR's quality NMS (models that predict a quality);
* ``var-voting``: pooled, then KL-Loss's variance voting (models that predict variances);
* ``fuse-score`` / ``fuse-quality`` / ``fuse-variance``: each pass NMS'd, then the passes fused
  with weighted boxes fusion weighted by score, predicted IoU or inverse variance
  (``locconf.tta.fuse_passes``; IoU 0.55, ``conf_type="avg"``).

Scores are COCO AP and AP75 on the 11 val images (100 detections per image). Time per image is the
passes' model time plus the merge (post-processing or fusion; scoring not included), in CPU seconds
of the process on one thread (``time.process_time``: what it takes on an idle core, however busy the
machine; warm-up calls are not timed). Results of
each checkpoint are cached in ``--cache`` (one JSON each), so an interrupted run resumes and later
checkpoints add rows; the table aggregates whatever is cached for the checkpoints given, one row
per (model, merge, TTA set) with the mean ± sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from common import cpu_name  # benchmarks/common.py (the script's folder is on sys.path)
except ImportError:  # imported as a module from elsewhere (the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_name

from locconf.data import collate_fn
from locconf.evaluation import collect_candidates, evaluate_methods
from locconf.experiment import build_datasets, load_trained
from locconf.postprocess import postprocess
from locconf.tta import TRANSFORMS, TTA_SETS, TestTimeAugmentation, evaluate_fused, fuse_passes, pool_passes

SETS = ("none", "flips", "all")


def _family(cfg: dict) -> str:
    m = cfg["model"]
    if m.get("arch") == "posthoc":  # a frozen detector + a post-hoc head (benchmarks/posthoc.py)
        return f"post-hoc {m.get('head', 'dir')} on frozen " + _family({"model": m["detector"]})
    return str(m.get("quality") or m.get("head") or ("baseline" if m.get("arch", "rcnn") == "rcnn" else m["arch"]))


def _merges(cands: list[dict]) -> list[str]:
    """The merges the candidates support (see the module docstring)."""
    merges = ["nms"]
    if all(isinstance(c.get("quality"), torch.Tensor) for c in cands):
        merges.append("quality")
    if all(isinstance(c.get("variances"), torch.Tensor) for c in cands):
        merges.append("var-voting")
    merges.append("fuse-score")
    if "quality" in merges:
        merges.append("fuse-quality")
    if "var-voting" in merges:
        merges.append("fuse-variance")
    return merges


def _clock() -> float:
    """CPU seconds of this process: on one thread, what the work takes on an idle core, whatever else runs."""
    return time.process_time()


def _merge(pooled: dict, merge: str) -> dict:
    """One image's pooled passes merged: a post-processing method, or NMS per pass and fusion."""
    if merge.startswith("fuse-"):
        return fuse_passes(pooled, merge, "nms", max_detections=100)
    return postprocess({k: v for k, v in pooled.items() if isinstance(v, torch.Tensor)}, merge, 100)


def run_checkpoint(checkpoint: Path, device: str | None = None, max_images: int | None = None,
                   progress: bool = True) -> dict:
    """Every pass of one checkpoint, every (TTA set, merge) scored and timed; a JSON-serialisable dict."""
    model, cfg = load_trained(checkpoint, device=device)
    _, val_ds, val_json = build_datasets(**cfg["data"])
    data = val_ds if max_images is None else torch.utils.data.Subset(val_ds, range(min(max_images, len(val_ds))))
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate_fn)
    dev = next(model.parameters()).device
    collect_candidates(model, [next(iter(loader))], dev, progress=False)  # warm-up, not timed
    passes, pass_seconds = {}, {}
    for name in TRANSFORMS:
        start = _clock()
        passes[name] = collect_candidates(TestTimeAugmentation(model, [name]), loader, dev, progress=progress)
        pass_seconds[name] = _clock() - start
    images = len(passes["identity"])
    label_to_cat_id = dict(val_ds.label_to_cat_id)
    merges = _merges(passes["identity"])
    rows: dict[str, dict] = {}
    for tta in SETS:
        names = TTA_SETS[tta]
        pooled = [dict(pool_passes([passes[n][i] for n in names]), image_id=passes["identity"][i]["image_id"])
                  for i in range(images)]
        model_s = sum(pass_seconds[n] for n in names) / images
        for merge in merges:
            _merge(pooled[0], merge)  # warm-up (numba compiles or loads its kernels), not timed
            start = _clock()
            for c in pooled:
                _merge(c, merge)
            merge_s = (_clock() - start) / images
            if merge.startswith("fuse-"):
                metrics = evaluate_fused(pooled, str(val_json), ["nms"], label_to_cat_id, merge, per_site=False,
                                         progress=False)["nms"]
            else:
                metrics = evaluate_methods(pooled, str(val_json), [merge], label_to_cat_id, per_site=False,
                                           progress=False)[merge]
            rows[f"{tta}|{merge}"] = {"AP": metrics["AP"], "AP75": metrics["AP75"], "model_s": model_s,
                                      "merge_s": merge_s}
    seed = cfg["train"].get("seed", 0)
    return {"checkpoint": str(checkpoint), "family": _family(cfg), "seed": seed, "images": images,
            "val_json": str(val_json), "pass_seconds": pass_seconds, "rows": rows,
            "threads": torch.get_num_threads(), "device": str(dev), "cpu": cpu_name(),
            "torch": torch.__version__}


def _cache_name(checkpoint: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(checkpoint.resolve()).strip("/")) + ".json"


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [scale * v for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def format_report(results: list[dict], command: str) -> str:
    """The markdown table: one row per (model, merge, TTA set), means ± sd over the seeds given."""
    families: dict[str, list[dict]] = {}
    for r in results:
        families.setdefault(r["family"], []).append(r)
    header = ["model (seeds)", "merge", "TTA", "AP", "AP75", "AP vs none", "AP75 vs none", "s / image", "time vs none"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for family, runs in families.items():
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        merges = [k.split("|")[1] for k in runs[0]["rows"] if k.startswith("none|")]
        for merge in merges:
            for tta in SETS:
                key = f"{tta}|{merge}"
                ap = [r["rows"][key]["AP"] for r in runs]
                ap75 = [r["rows"][key]["AP75"] for r in runs]
                d_ap = [r["rows"][key]["AP"] - r["rows"][f"none|{merge}"]["AP"] for r in runs]
                d_ap75 = [r["rows"][key]["AP75"] - r["rows"][f"none|{merge}"]["AP75"] for r in runs]
                secs = [r["rows"][key]["model_s"] + r["rows"][key]["merge_s"] for r in runs]
                ratio = [(r["rows"][key]["model_s"] + r["rows"][key]["merge_s"])
                         / (r["rows"]["none|nms"]["model_s"] + r["rows"]["none|nms"]["merge_s"]) for r in runs]
                delta = ["", ""] if tta == "none" else ["+" * (statistics.mean(d_ap) >= 0) + _fmt(d_ap),
                                                        "+" * (statistics.mean(d_ap75) >= 0) + _fmt(d_ap75)]
                lines.append(f"| {family} ({seeds}) | {merge} | {tta} | {_fmt(ap)} | {_fmt(ap75)} | {delta[0]} | "
                             f"{delta[1]} | {_fmt(secs, 1.0, 2)} | {_fmt(ratio, 1.0, 1)}x |")
    first = results[0]
    meta = (f"{first['images']} val images of `{first['val_json']}`, 100 detections per image; "
            f"{first['cpu']}, {first['threads']} thread(s), torch {first['torch']}. Time per image: CPU seconds "
            f"(process time, one thread) of the passes plus the merge (post-processing or fusion), not the "
            f"scoring; on a shared machine the CPU seconds of one pass varied up to 2x between runs (cores shared "
            f"with other processes), so read the time against no TTA with NMS in the same run (time vs none). "
            f"Checkpoints: "
            + "; ".join(f"`{r['checkpoint']}`" for r in results) + ".")
    return f"Command: `{command}`\n\n" + "\n".join(lines) + "\n\n" + meta


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="locconf checkpoints (config recorded)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tta_neon.md")
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "tta_neon_runs",
                    help="one JSON per checkpoint, reused by later runs (keyed by the checkpoint's path only: "
                         "give quick looks with --max-images their own --cache)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (timings: 1)")
    ap.add_argument("--max-images", type=int, default=None, help="only the first N val images (quick looks)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    results, missing = [], []
    for ckpt in args.checkpoint:
        if not ckpt.is_file():
            missing.append(str(ckpt))
            continue
        cached = args.cache / _cache_name(ckpt)
        if cached.is_file():
            result = json.loads(cached.read_text())
        else:
            print(f"running {ckpt}", flush=True)
            result = run_checkpoint(ckpt, args.device, args.max_images, progress=not args.no_progress)
            cached.write_text(json.dumps(result, indent=1) + "\n")
        results.append(result)
    if not results:
        raise SystemExit(f"none of the checkpoints exists: {missing}")
    command = "python benchmarks/tta_neon.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = format_report(results, command)
    if missing:
        report += "\n\nNot yet run (checkpoint missing): " + ", ".join(f"`{m}`" for m in missing) + "."
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    return results


if __name__ == "__main__":
    main()
