"""``locconf eval``: evaluate a checkpoint under several post-processing methods."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, print_report
from .choices import TTA, TTA_MERGES


def add_parser(sub, parents) -> None:
    ev = _sub_parser(sub, "eval", parents, help="evaluate a checkpoint under several post-processing methods")
    ev.add_argument("config", type=Path, help="the YAML configuration (its data section names the split)")
    ev.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint to evaluate")
    ev.add_argument("--methods", default=None,
                    help="comma-separated post-processing methods, e.g. nms,soft-gaussian,quality "
                         "(default: eval.methods of the config, else nms,soft-linear,soft-gaussian)")
    ev.add_argument("--out", type=Path, default=None,
                    help="folder for results.json, table.md and plots (default: eval/ beside the checkpoint)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda where available)")
    ev.add_argument("--html", type=Path, default=None, help="also write one self-contained HTML report here")
    ev.add_argument("--gallery", type=int, default=8, help="images in the report's gallery of detections")
    ev.add_argument("--tta", default="none", choices=TTA,
                    help="test-time augmentation: none; flips (identity, left-right, top-bottom); all (the eight "
                         "flips and 90-degree rotations)")
    ev.add_argument("--tta-merge", default="concat", choices=TTA_MERGES,
                    help="merging the passes: concat (pooled, merged by each method), or fuse-score / "
                         "fuse-quality / fuse-variance (each pass post-processed by the method, then fused)")
    add_progress_flag(ev)
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import load_config, load_trained, run_eval

    cfg = load_config(args.config)
    model, _ = load_trained(args.checkpoint, cfg, device=args.device)
    methods = args.methods.split(",") if args.methods else None
    out_dir = args.out or Path(args.checkpoint).parent / "eval"
    report = run_eval(model, cfg, out_dir, methods=methods, device=args.device, html=args.html, gallery=args.gallery,
                      progress=not args.no_progress, tta=args.tta, tta_merge=args.tta_merge)
    print_report(report)
    if report.get("calibrator") is not None:  # saved with the model: <checkpoint>.calibration.json
        beside = report["calibrator"].save(Path(args.checkpoint).with_suffix(".calibration.json"))
        print(f"quality calibration (isotonic, for predict/postprocess --calibration): {beside}")
    if report.get("html"):
        print(f"report: {report['html']}")
    return 0
