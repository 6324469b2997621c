"""The ``locconf`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_data(args: argparse.Namespace) -> int:
    if args.dataset == "neon-trees":
        from .data import neon_trees

        counts = neon_trees(args.out, tile_size=args.tile_size, overlap=args.overlap, val_height=args.val_height,
                            cache_dir=args.cache_dir)
        for split in ("train", "val"):
            c = counts[split]
            sites = ", ".join(f"{s}: {v['images']} images / {v['boxes']} boxes" for s, v in c["sites"].items())
            print(f"{split:5s} {c['images']:3d} images {c['boxes']:5d} boxes  ({sites})")
        print(f"val holds {counts['val_fraction']:.0%} of the crowns; COCO files: {counts['train_json']}, "
              f"{counts['val_json']} ({counts['seconds']} s)")
    else:
        from .experiment.build import write_synthetic_splits

        splits = write_synthetic_splits(args.out, args.num_train, args.num_val, args.image_size, args.num_classes,
                                        args.seed)
        for split, (n, path) in splits.items():
            print(f"{split}: {n} scenes -> {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiment import load_config, run_train

    summary = run_train(load_config(args.config), resume=args.resume)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in (summary.get("losses") or {}).items())
    print(f"step {summary['step']} in {summary['seconds']:.0f} s; last losses: {losses}")
    print(f"checkpoint: {summary['checkpoint']}; metrics: {summary['metrics_file']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .experiment import load_config, load_trained, run_eval

    cfg = load_config(args.config)
    model, _ = load_trained(args.checkpoint, cfg, device=args.device)
    methods = args.methods.split(",") if args.methods else None
    out_dir = args.out or Path(args.checkpoint).parent / "eval"
    report = run_eval(model, cfg, out_dir, methods=methods, device=args.device, html=args.html, gallery=args.gallery)
    _print_report(report)
    if report.get("calibrator") is not None:  # saved with the model: <checkpoint>.calibration.json
        beside = report["calibrator"].save(Path(args.checkpoint).with_suffix(".calibration.json"))
        print(f"quality calibration (isotonic, for predict/postprocess --calibration): {beside}")
    if report.get("html"):
        print(f"report: {report['html']}")
    return 0


def _print_report(report: dict) -> None:
    print(report["table"])
    corr = report["correlation"]
    if corr:
        print("\ncorrelation with the true IoU (candidates with IoU > 0.5):")
        for signal, c in corr.items():
            print(f"  {signal:9s} pearson {c['pearson']:+.3f}  spearman {c['spearman']:+.3f}  n={c['n']}")
    ece = (report.get("calibration") or {}).get("ece") or {}
    if ece:
        print("\nexpected calibration error as a predicted IoU (raw -> calibrated out-of-fold):")
        for signal, e in ece.items():
            after = f"{e['calibrated']:.3f}" if e.get("calibrated") is not None else "-"
            print(f"  {signal:9s} {e['raw']:.3f} -> {after}  n={e['n']}")
    print(f"\nresults, table and plots in {report['out_dir']}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .experiment import categories_of, load_config, load_trained, predict

    cfg = load_config(args.config) if args.config else None
    model, cfg = load_trained(args.checkpoint, cfg, device=args.device)
    class_names, label_to_cat_id = categories_of(cfg)
    merge = {k: v for k, v in (("max_detections", args.max_detections),
                               ("candidates_per_tile", args.candidates_per_tile)) if v is not None}
    csv_path, json_path = args.csv or args.out.with_suffix(".csv"), args.json or args.out.with_suffix(".json")
    dets = predict(model, args.image, args.out, method=args.method, score_threshold=args.score_threshold,
                   device=args.device, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                   border=args.border, params=_method_params(args.param, args.params), calibration=args.calibration,
                   csv_path=csv_path, json_path=json_path, class_names=class_names, label_to_cat_id=label_to_cat_id,
                   max_side=args.max_side, progress=not args.no_progress, **merge)
    shown = int((dets["scores"] >= args.score_threshold).sum())
    print(f"{len(dets['scores'])} detections ({shown} with score >= {args.score_threshold}) drawn in {args.out}; "
          f"CSV {csv_path}, COCO results {json_path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiment import check_config, load_trained, neon_recipe, run_eval, run_train

    out = Path(args.out)
    recipe = neon_recipe()  # the pretrained NEON CPU recipe (benchmarks/results/recipe_pretrained.md), DIR head
    cfg = check_config({
        "model": dict(arch="rcnn", quality="dir", quality_representation_size=256, **recipe["model"]),
        "data": dict(recipe["data"], root=str(args.data)),
        "train": dict(recipe["train"], iterations=args.iterations, batch_size=2,
                      warmup_iters=min(100, args.iterations // 4), out_dir=str(out),
                      checkpoint_every=max(1, args.iterations // 4), log_every=10, seed=0),
        "eval": dict(methods=["nms", "soft-linear", "soft-gaussian", "quality", "quality+soft-gaussian"]),
    }, source="demo")
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        print(f"training a Faster R-CNN with a DIR head (Purity/Integrity in hindsight) on an ImageNet "
              f"EfficientNet-Lite0 FPN, on NEON tree crowns, for {args.iterations} iterations")
        from .engine.checkpoint import latest_checkpoint

        summary = run_train(cfg, resume=True)  # a finished run in --out is reused, a killed one continued
        checkpoint = Path(summary["checkpoint"] or latest_checkpoint(out))
    model, _ = load_trained(checkpoint, cfg)
    print("evaluating the same candidates under NMS, Soft-NMS and DIR's quality NMS (val split)")
    _print_report(run_eval(model, cfg, out / "eval"))
    return 0


def _method_params(pairs: list[str], text: str | None) -> dict:
    """``--params JSON`` updated by each ``--param key=value`` (a value is JSON if it parses, else a string)."""
    params = {}
    if text is not None:
        try:
            params = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--params must be a JSON object, e.g. '{{\"sigma\": 0.5}}' ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"--params must be a JSON object, got {text!r}")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param must be KEY=VALUE, got {pair!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from .postprocess_files import format_correlation, fuse_files, postprocess_file

    if (args.input is None) == (args.fuse is None):
        raise ValueError("locconf postprocess needs either one INPUT file or --fuse FILE [FILE ...]")
    if args.calibration is not None and args.fuse is not None:
        raise ValueError("--calibration applies to one INPUT file, not to --fuse")
    common = dict(method=args.method, params=_method_params(args.param, args.params),
                  max_detections=args.max_detections, score_threshold=args.score_threshold,
                  class_agnostic=args.class_agnostic, gt=args.gt, progress=not args.no_progress)
    if args.fuse is not None:
        report = fuse_files(args.fuse, args.out, weight=args.weight, iou_threshold=args.fuse_iou,
                            model_weights=args.model_weights, conf_type=args.conf_type, **common)
        what = f"fused ({args.weight}-weighted, after {args.method} per file)"
    else:
        report = postprocess_file(args.input, args.out, calibration=args.calibration, **common)
        what = f"post-processed with {args.method}"
    print(f"{report['records']} records in {report['images']} images {what}: "
          f"{report['detections']} detections written to {report['output']}")
    if "table" in report:
        print("\nCOCO bbox metrics (x 100) against " + str(args.gt) + ":")
        print(report["table"])
        if any(report["correlation"].values()):
            print("\ncorrelation with the true IoU (boxes with IoU > 0.5):")
            print(format_correlation(report["correlation"]))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locconf", description="Localization-confidence-aware object detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_predict_parser(sub)
    _add_demo_parser(sub)
    _add_postprocess_parser(sub)
    _add_bench_parser(sub)
    return parser


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="fetch or generate a dataset in COCO format")
    dsub = data.add_subparsers(dest="dataset", required=True)
    neon = dsub.add_parser("neon-trees", help="NEON aerial tree crowns from the deepforest wheel, tiled and split")
    neon.add_argument("--out", type=Path, required=True, help="output folder (COCO json + PNG tiles)")
    neon.add_argument("--tile-size", type=int, default=400)
    neon.add_argument("--overlap", type=int, default=100)
    neon.add_argument("--val-height", type=int, default=400, help="held-out band at the bottom of each large image")
    neon.add_argument("--cache-dir", type=Path, default=None, help="where the wheel is cached")
    syn = dsub.add_parser("synthetic", help="synthetic scenes (deterministic by seed)")
    syn.add_argument("--out", type=Path, required=True)
    syn.add_argument("--num-train", type=int, default=200)
    syn.add_argument("--num-val", type=int, default=50)
    syn.add_argument("--image-size", type=int, default=256)
    syn.add_argument("--num-classes", type=int, default=3)
    syn.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=_cmd_data)


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a detector from a YAML config")
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    train.set_defaults(func=_cmd_train)


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint under several post-processing methods")
    ev.add_argument("config", type=Path)
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--methods", default=None, help="comma-separated, e.g. nms,soft-gaussian,quality")
    ev.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md and plots")
    ev.add_argument("--device", default=None)
    ev.add_argument("--html", type=Path, default=None, help="also write one self-contained HTML report here")
    ev.add_argument("--gallery", type=int, default=8, help="images in the report's gallery of detections")
    ev.set_defaults(func=_cmd_eval)


def _add_predict_parser(sub) -> None:
    pr = sub.add_parser("predict", help="detect objects in an image of any size (tiled) and draw them",
                        description="Tile the image, run the checkpoint on batches of tiles, merge the tiles' "
                        "candidates (handling boxes cut by tile borders) and write a drawing, a CSV "
                        "(xmin, ymin, xmax, ymax, label, score[, quality]) and COCO results.")
    pr.add_argument("image", type=Path, help="PNG/JPEG (decoded whole) or GeoTIFF (read tile by tile with rasterio)")
    pr.add_argument("--checkpoint", type=Path, required=True)
    pr.add_argument("--config", type=Path, default=None, help="default: config.yaml beside the checkpoint")
    pr.add_argument("--out", type=Path, required=True, help="the drawing (PNG, downscaled to --max-side)")
    pr.add_argument("--csv", type=Path, default=None, help="detections as CSV (default: --out with .csv)")
    pr.add_argument("--json", type=Path, default=None, help="detections as COCO results (default: --out with .json)")
    pr.add_argument("--method", default="nms", help="post-processing method that merges the tiles' candidates")
    pr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a keyword of the method")
    pr.add_argument("--params", default=None, metavar="JSON", help="the method's keywords as a JSON object")
    pr.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    pr.add_argument("--overlap", type=int, default=100, help="least overlap of neighbouring tiles in pixels")
    pr.add_argument("--batch-size", type=int, default=4, help="tiles per model call")
    pr.add_argument("--border", default="drop", help="boxes cut by a tile border: drop (when a neighbouring "
                    "tile sees the whole object), down-weight or none")
    pr.add_argument("--max-detections", type=int, default=None, help="detections kept (default: 100 per tile)")
    pr.add_argument("--candidates-per-tile", type=int, default=None, help="cap on each tile's candidates")
    pr.add_argument("--calibration", type=Path, default=None, help="quality calibration JSON (from locconf eval)")
    pr.add_argument("--score-threshold", type=float, default=0.3, help="smallest score drawn")
    pr.add_argument("--max-side", type=int, default=2000, help="longer side of the drawing in pixels")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--device", default=None)
    pr.set_defaults(func=_cmd_predict)


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the whole idea in a few CPU minutes on NEON tree crowns")
    # 750: what fits the demo's ~10 minutes on two idle CPU cores (1000 took 12.5 min; README, "What
    # `locconf demo` does")
    demo.add_argument("--iterations", type=int, default=750,
                      help="training iterations (default 750, ~10 min on two idle CPU cores)")
    demo.add_argument("--data", type=Path, default=Path("data/neon"))
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    demo.set_defaults(func=_cmd_demo)


def _add_postprocess_parser(sub) -> None:
    pp = sub.add_parser("postprocess", help="post-process or fuse any detector's candidates in COCO results files",
                        description="Read candidates (COCO results: a JSON array or JSON Lines of {image_id, "
                        "category_id, bbox [x, y, w, h], score, optional quality, optional variance [4]}), "
                        "post-process each image (or fuse several files) and write COCO results.")
    pp.add_argument("input", nargs="?", type=Path, default=None, help="the candidates file (or use --fuse)")
    pp.add_argument("--fuse", nargs="+", type=Path, default=None, metavar="FILE",
                    help="fuse the detections of these files (one per model or test-time pass)")
    pp.add_argument("--out", "-o", type=Path, required=True, help="output file (.jsonl: JSON Lines, else a JSON array)")
    pp.add_argument("--method", default="nms",
                    help="a method named in locconf.postprocess.METHODS (e.g. nms, soft-gaussian, quality, "
                    "var-voting+soft; an unknown name lists them all) or none; "
                    "with --fuse it is applied to each file before fusion")
    pp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a keyword of the method, e.g. --param sigma=0.5 (repeatable)")
    pp.add_argument("--params", default=None, metavar="JSON", help='keywords as a JSON object, e.g. \'{"sigma": 0.5}\'')
    pp.add_argument("--max-detections", type=int, default=100, help="detections kept per image")
    pp.add_argument("--score-threshold", type=float, default=0.0, help="drop candidates below this score first")
    pp.add_argument("--class-agnostic", action="store_true", help="suppress across categories")
    pp.add_argument("--gt", type=Path, default=None, help="COCO instances json: score input and output")
    pp.add_argument("--weight", default="score", help="fusion weight: score, quality or variance")
    pp.add_argument("--fuse-iou", type=float, default=0.55, help="fusion IoU threshold")
    pp.add_argument("--model-weights", type=float, nargs="+", default=None, help="one weight per --fuse file")
    pp.add_argument("--conf-type", default="avg",
                    help="fused score: avg, max, box_and_model_avg or absent_model_aware_avg")
    pp.add_argument("--calibration", type=Path, default=None,
                    help="calibrate each record's quality with this JSON (from locconf eval) first")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp.set_defaults(func=_cmd_postprocess)


def _add_bench_parser(sub) -> None:
    from .bench.cli import add_arguments as bench_arguments  # no torch import: --help stays fast

    bench = sub.add_parser("bench", help="the accuracy comparison: every detector, same budget, several seeds",
                           description="Train every variant (detector) on a setting's training split with the same "
                           "budget, score the val candidates under every post-processing method they support, "
                           "aggregate over seeds and write results.json, table.md and plots (locconf.bench). "
                           "Resumable: finished trainings and evaluations are reused.")
    bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
