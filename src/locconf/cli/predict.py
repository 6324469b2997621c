"""``locconf predict``: detect objects in an image of any size, tile by tile, and write them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, add_trust_flag, apply_trust_flag, method_params
from .choices import BORDERS, METHODS


def add_parser(sub, parents) -> None:
    pr = _sub_parser(sub, "predict", parents, help="detect objects in an image of any size (tiled) and draw them",
                     description="Tile the image, run the checkpoint on batches of tiles, merge the tiles' "
                     "candidates (handling boxes cut by tile borders) and write a drawing, a CSV "
                     "(xmin, ymin, xmax, ymax, label, score[, quality]) and COCO results.")
    pr.add_argument("image", type=Path, help="PNG/JPEG (decoded whole) or GeoTIFF (read tile by tile with rasterio)")
    pr.add_argument("--checkpoint", type=Path, default=None,
                    help="the trained detector (optional when --config's model is arch: torchvision with weights: FILE)")
    pr.add_argument("--config", type=Path, default=None, help="the configuration (default: the checkpoint's own)")
    pr.add_argument("--out", type=Path, required=True, help="the drawing (PNG, downscaled to --max-side)")
    pr.add_argument("--csv", type=Path, default=None, help="detections as CSV (default: --out with .csv)")
    pr.add_argument("--json", type=Path, default=None, help="detections as COCO results (default: --out with .json)")
    pr.add_argument("--method", default="nms", choices=METHODS, metavar="METHOD",
                    help=f"post-processing that merges the tiles' candidates: {', '.join(METHODS)}")
    pr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a keyword of the method")
    pr.add_argument("--params", default=None, metavar="JSON", help="the method's keywords as a JSON object")
    pr.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    pr.add_argument("--overlap", type=int, default=100, help="least overlap of neighbouring tiles in pixels")
    pr.add_argument("--batch-size", type=int, default=4, help="tiles per model call")
    pr.add_argument("--border", default="drop", choices=BORDERS,
                    help="boxes cut by a tile border: drop (when a neighbouring tile sees the whole object), "
                         "down-weight or none")
    pr.add_argument("--max-detections", type=int, default=None, help="detections kept (default: 100 per tile)")
    pr.add_argument("--candidates-per-tile", type=int, default=None, help="cap on each tile's candidates")
    pr.add_argument("--calibration", type=Path, default=None, help="quality calibration JSON (from locconf eval)")
    pr.add_argument("--score-threshold", type=float, default=0.3, help="smallest score drawn")
    pr.add_argument("--max-side", type=int, default=2000, help="longer side of the drawing in pixels")
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda where available)")
    add_trust_flag(pr)
    add_progress_flag(pr)
    pr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import categories_of, load_config, load_detector, predict
    from ..files import check_outputs

    if args.checkpoint is None and args.config is None:
        raise ValueError("give --checkpoint, or --config whose model is arch: torchvision with weights: FILE")

    check_outputs({"--out": args.out, "--csv": args.csv or args.out.with_suffix(".csv"),
                   "--json": args.json or args.out.with_suffix(".json")},
                  {"image": args.image, "checkpoint": args.checkpoint, "config": args.config,
                   "calibration": args.calibration})
    cfg = load_config(args.config) if args.config else None
    apply_trust_flag(cfg, args.trust_weights)
    model, cfg = load_detector(cfg, args.checkpoint, device=args.device)
    class_names, label_to_cat_id = categories_of(cfg, getattr(model, "categories", None))
    merge = {k: v for k, v in (("max_detections", args.max_detections),
                               ("candidates_per_tile", args.candidates_per_tile)) if v is not None}
    csv_path, json_path = args.csv or args.out.with_suffix(".csv"), args.json or args.out.with_suffix(".json")
    dets = predict(model, args.image, args.out, method=args.method, score_threshold=args.score_threshold,
                   device=args.device, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                   border=args.border, params=method_params(args.param, args.params), calibration=args.calibration,
                   csv_path=csv_path, json_path=json_path, class_names=class_names, label_to_cat_id=label_to_cat_id,
                   max_side=args.max_side, progress=not args.no_progress, **merge)
    shown = int((dets["scores"] >= args.score_threshold).sum())
    print(f"{len(dets['scores'])} detections ({shown} with score >= {args.score_threshold}) drawn in {args.out}; "
          f"CSV {csv_path}, COCO results {json_path}")
    return 0
