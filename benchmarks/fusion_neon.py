"""Fuse several trained detectors (or test-time flips of one) and compare each fusion weighting with the best single model.

    python benchmarks/fusion_neon.py --checkpoint runs/accuracy_neon/dir/it1500_seed0/checkpoint_0001500.pth \\
                                                  runs/accuracy_neon/dir/it1500_seed1/checkpoint_0001500.pth
    python benchmarks/fusion_neon.py --checkpoint runs/demo/checkpoint_0000400.pth --tta

Each checkpoint is rebuilt from the ``config.yaml`` beside it (``locconf.experiment.load_trained``)
and run once over the val split of its data section (every checkpoint must name the same val
split): one pass per model, plus, with ``--tta``, a horizontally and a vertically flipped pass of
each image whose boxes (and variances) are mapped back (``locconf.tta``; ``benchmarks/tta_neon.py``
measures every symmetry and merge). Each pass's candidates are post-processed
with ``--method`` (NMS by default) and scored alone (``locconf.evaluation.evaluate_methods``);
then the passes' detections of each image are fused with ``locconf.fusion.fuse`` under each
weighting the passes support (``score`` always; ``quality`` when every pass predicts it;
``variance`` when every pass predicts variances), capped at 100 per image, and scored the same
way. The table gives AP / AP50 / AP75 / AP90 of every pass and fusion, and each fusion's AP and
AP75 against the best single model (the un-flipped pass of highest AP).

Writes ``--out`` (markdown, default ``benchmarks/results/fusion_neon.md``) and the same numbers as
JSON beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
from locconf.evaluation import coco_metrics, collect_candidates, evaluate_methods, load_coco
from locconf.postprocess import REQUIRED_SIGNALS
from locconf.experiment import build_datasets, load_trained
from locconf.fusion import WEIGHTS, fuse
from locconf.postprocess import METHODS, postprocess
from locconf.tta import TestTimeAugmentation

COLUMNS = ("AP", "AP50", "AP75", "AP90")


def _records(detections: list[dict], label_to_cat_id: dict[int, int]) -> list[dict]:
    records = []
    for det in detections:
        b = det["boxes"].double()
        xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            records.append({"image_id": det["image_id"], "category_id": label_to_cat_id[int(label)], "bbox": box,
                            "score": score})
    return records


def score_detections(detections: list[dict], gt, label_to_cat_id: dict[int, int]) -> dict[str, float]:
    """COCO metrics of final per-image detections (``image_id``, boxes, scores, labels) on their images."""
    gt = load_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(_records(detections, label_to_cat_id))
    return coco_metrics(gt, dt, [d["image_id"] for d in detections])


def run(checkpoints: list[Path], tta: bool = False, method: str = "nms", iou_threshold: float = 0.55,
        conf_type: str = "avg", device: str | None = None, max_images: int | None = None,
        progress: bool = True) -> dict:
    """Passes, their fusions and the scores; see the module docstring. Returns a JSON-serialisable dict."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not checkpoints:
        raise ValueError("give at least one --checkpoint")
    need = REQUIRED_SIGNALS[method]
    passes: dict[str, list[dict]] = {}  # name -> per-image candidates
    singles: list[str] = []  # the un-flipped passes
    val_json = label_to_cat_id = None
    for k, ckpt in enumerate(checkpoints):
        ckpt = Path(ckpt)
        if not ckpt.is_file():
            raise ValueError(f"checkpoint {ckpt} does not exist")
        model, cfg = load_trained(ckpt, device=device)
        _, val_ds, this_json = build_datasets(**cfg["data"])
        if val_json is None:
            val_json, label_to_cat_id = Path(this_json), dict(val_ds.label_to_cat_id)
        elif Path(this_json).resolve() != val_json.resolve():
            raise ValueError(f"{ckpt}: its val split {this_json} is not the first checkpoint's {val_json}")
        data = val_ds if max_images is None else torch.utils.data.Subset(val_ds, range(min(max_images, len(val_ds))))
        loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate_fn)
        dev = next(model.parameters()).device
        variants = [("", model)] + ([(f" {t}", TestTimeAugmentation(model, [t])) for t in ("hflip", "vflip")]
                                    if tta else [])
        singles.append(f"model {k}")
        for suffix, m in variants:
            cands = collect_candidates(m, loader, dev, progress=progress)
            if need is not None and any(c.get(need) is None for c in cands):
                raise ValueError(f"{ckpt}: method {method!r} needs {need!r}, which this model does not predict")
            passes[f"model {k}{suffix}"] = cands
    gt = load_coco(val_json)

    rows: dict[str, dict] = {}
    detections: dict[str, list[dict]] = {}
    for name, cands in passes.items():
        rows[name] = evaluate_methods(cands, gt, [method], label_to_cat_id, per_site=False, progress=False)[method]
        detections[name] = [dict(postprocess(c, method, 100), image_id=c["image_id"]) for c in cands]
    best = max(singles, key=lambda n: rows[n]["AP"])

    names = list(detections)
    weights = [w for w in WEIGHTS
               if all(d.get({"score": "scores", "quality": "quality", "variance": "variances"}[w]) is not None
                      for dets in detections.values() for d in dets)]
    fused_rows = {}
    seconds = {}
    for w in weights:
        t = time.perf_counter()
        fused = []
        for per_image in zip(*(detections[n] for n in names)):
            out = fuse([{k: d[k] for k in ("boxes", "scores", "labels", "quality", "variances") if k in d}
                        for d in per_image], weight=w, iou_threshold=iou_threshold, conf_type=conf_type)
            fused.append(dict({k: v[:100] for k, v in out.items()}, image_id=per_image[0]["image_id"]))
        seconds[w] = time.perf_counter() - t
        fused_rows[f"fused ({w})"] = score_detections(fused, gt, label_to_cat_id)
    rows.update(fused_rows)
    return {"checkpoints": [str(c) for c in checkpoints], "passes": list(passes), "best_single": best,
            "method": method, "iou_threshold": iou_threshold, "conf_type": conf_type,
            "images": len(next(iter(passes.values()))), "val_json": str(val_json), "metrics": rows,
            "fusion_seconds": seconds}


def format_report(result: dict) -> str:
    best = result["metrics"][result["best_single"]]
    header = ["pass / fusion", *COLUMNS, "AP vs best single", "AP75 vs best single"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def pct(v: float) -> str:
        return "-" if v == -1 else f"{100 * v:.1f}"

    for name, m in result["metrics"].items():
        label = name + (" (best single)" if name == result["best_single"] else "")
        delta = ["", ""]
        if name.startswith("fused"):
            delta = [f"{100 * (m[c] - best[c]):+.1f}" for c in ("AP", "AP75")]
        lines.append(f"| {label} | " + " | ".join(pct(m[c]) for c in COLUMNS) + " | " + " | ".join(delta) + " |")
    checkpoints = "; ".join(f"model {k}: `{c}`" for k, c in enumerate(result["checkpoints"]))
    meta = (f"{result['images']} val images of `{result['val_json']}`; each pass post-processed with "
            f"`{result['method']}`, fused with IoU threshold {result['iou_threshold']} and conf_type "
            f"`{result['conf_type']}`, 100 detections per image. {checkpoints}. "
            f"{cpu_name()}, torch {torch.__version__}.")
    return "\n".join(lines) + "\n\n" + meta


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="config.yaml beside each")
    ap.add_argument("--tta", action="store_true", help="add horizontally and vertically flipped passes")
    ap.add_argument("--method", default="nms", help="post-processing of each pass before fusion")
    ap.add_argument("--iou", type=float, default=0.55, help="fusion IoU threshold")
    ap.add_argument("--conf-type", default="avg")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-images", type=int, default=None, help="only the first N val images (quick looks)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fusion_neon.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.checkpoint, tta=args.tta, method=args.method, iou_threshold=args.iou, conf_type=args.conf_type,
                 device=args.device, max_images=args.max_images, progress=not args.no_progress)
    report = format_report(result)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
