"""``locconf eval``: evaluate a checkpoint under several post-processing methods."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, add_set_flag, add_trust_flag, apply_trust_flag, print_report
from .choices import TTA, TTA_MERGES


def add_parser(sub, parents) -> None:
    ev = _sub_parser(sub, "eval", parents, help="evaluate a checkpoint under several post-processing methods",
                     description="Evaluate a checkpoint on the val split of its configuration. Everything is "
                     "written into --out as one set when the evaluation is done (results.json, table.md, plots, "
                     "calibration.json: the quality calibration for predict/postprocess --calibration).")
    ev.add_argument("config", type=Path, nargs="?", default=None,
                    help="the YAML configuration (its data section names the split; default: the configuration "
                         "the checkpoint records)")
    ev.add_argument("--checkpoint", type=Path, default=None,
                    help="the checkpoint to evaluate; without it, the config's model must be arch: torchvision with "
                         "weights: FILE (a torchvision or DeepForest detector trained elsewhere), and --out is needed")
    ev.add_argument("--methods", default=None,
                    help="comma-separated post-processing methods, e.g. nms,soft-gaussian,quality "
                         "(default: eval.methods of the config, else nms,soft-linear,soft-gaussian)")
    ev.add_argument("--out", type=Path, default=None,
                    help="folder for results.json, table.md, plots and calibration.json (default: eval/ beside "
                         "the checkpoint)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda where available)")
    ev.add_argument("--html", type=Path, default=None, help="also write one self-contained HTML report here")
    ev.add_argument("--gallery", type=int, default=8, help="images in the report's gallery of detections")
    add_set_flag(ev)
    add_trust_flag(ev)
    ev.add_argument("--overwrite-calibration", action="store_true",
                    help="replace a calibration.json in --out that was fitted on another checkpoint or split "
                         "(refused otherwise)")
    ev.add_argument("--calibration-min-boxes", type=int, default=50,
                    help="fit no calibration on fewer matched boxes (candidates with IoU > 0.5)")
    ev.add_argument("--tta", default="none", choices=TTA,
                    help="test-time augmentation: none; flips (identity, left-right, top-bottom); all (the eight "
                         "flips and 90-degree rotations)")
    ev.add_argument("--tta-merge", default="concat", choices=TTA_MERGES,
                    help="merging the passes: concat (pooled, merged by each method), or fuse-score / "
                         "fuse-quality / fuse-variance (each pass post-processed by the method, then fused)")
    add_progress_flag(ev)
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import load_config, load_detector, run_eval
    from ..experiment.config import apply_overrides, check_config
    from ..experiment.evaluate import eval_outputs, named_outputs
    from ..files import check_outputs

    if args.checkpoint is None and args.config is None:
        raise ValueError("give --checkpoint, or a CONFIG whose model is arch: torchvision with weights: FILE")
    if args.checkpoint is None and args.out is None:
        raise ValueError("--out is required without --checkpoint (the results go beside the checkpoint otherwise)")
    out_dir = args.out or Path(args.checkpoint).parent / "eval"
    inputs = {"config": args.config, "checkpoint": args.checkpoint}
    check_outputs({"--out" if args.out else "the default --out": out_dir}, inputs)
    check_outputs(named_outputs(eval_outputs(out_dir, args.html)), inputs)  # again in run_eval, with the data
    cfg = load_config(args.config, overrides=args.set) if args.config is not None else None
    apply_trust_flag(cfg, args.trust_weights)
    model, cfg = load_detector(cfg, args.checkpoint, device=args.device)
    if args.config is None and args.set:  # --set on the checkpoint's own configuration
        if any(item.strip().startswith("model.") for item in args.set):
            raise ValueError("--set model.*: the model comes from the checkpoint; give a CONFIG to change it")
        cfg = copy.deepcopy(cfg)
        origins = apply_overrides(cfg, args.set)
        cfg = check_config(cfg, source=f"{args.checkpoint}'s configuration", origins=origins)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    report = run_eval(model, cfg, out_dir, methods=methods, device=args.device, html=args.html, gallery=args.gallery,
                      progress=not args.no_progress, checkpoint=args.checkpoint, inputs=inputs,
                      overwrite_calibration=args.overwrite_calibration,
                      calibration_min_boxes=args.calibration_min_boxes, tta=args.tta, tta_merge=args.tta_merge)
    print_report(report)
    if report.get("calibration_file"):  # (why there is none, if any, was logged)
        print(f"quality calibration (isotonic, for predict/postprocess --calibration): {report['calibration_file']}")
    if report.get("html"):
        print(f"report: {report['html']}")
    return 0
