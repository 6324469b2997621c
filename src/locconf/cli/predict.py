"""``locconf predict``: detect objects in images of any size, tile by tile, and write them.

Two forms: ``locconf predict INPUT [INPUT ...] --out-dir DIR`` (many images, folders and patterns;
resumable; sharded over processes under ``torchrun``: :mod:`locconf.experiment.batch`) and
``locconf predict IMAGE --out DRAWING.png`` (one image, its three files named after ``--out``).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, add_trust_flag, apply_trust_flag, method_params
from .choices import BORDERS, METHODS, TTA, TTA_MERGES

#: :data:`locconf.tiling.DEFAULT_MAX_PIXELS`, repeated here so that ``--help`` does not import torch.
DEFAULT_MAX_PIXELS = 1_000_000_000


def add_parser(sub, parents) -> None:
    pr = _sub_parser(sub, "predict", parents, help="detect objects in images of any size (tiled) and draw them",
                     description="Tile each image, run the checkpoint on batches of tiles, merge the tiles' "
                     "candidates (handling boxes cut by tile borders) and write a drawing and the detections.\n\n"
                     "  locconf predict a.tif ortho/ 'tiles/*.png' --checkpoint ck.pth --out-dir out/\n"
                     "      every image: out/<name>.png (drawing), out/<name>.json (COCO results) and, for a\n"
                     "      GeoTIFF, out/<name>.geojson (polygons in its map coordinates and CRS); the whole\n"
                     "      call: out/predictions.csv (image_path, xmin, ymin, xmax, ymax, label, score[, quality,\n"
                     "      var_*]) and out/predictions.json (COCO images + annotations with scores). The model\n"
                     "      loads once; a rerun skips the images already complete (--overwrite redoes them);\n"
                     "      under torchrun the images are shared out among the processes.\n"
                     "  locconf predict image.png --checkpoint ck.pth --out vis.png\n"
                     "      one image: vis.png, vis.csv and vis.json.")
    pr.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="images (PNG/JPEG decoded whole, GeoTIFF read tile by tile with rasterio), folders "
                         "(their .png .jpg .jpeg .tif .tiff files) and glob patterns (quote them: expanded here)")
    pr.add_argument("--checkpoint", type=Path, default=None,
                    help="the trained detector (optional when --config's model is arch: torchvision with weights: FILE)")
    pr.add_argument("--config", type=Path, default=None, help="the configuration (default: the one the "
                    "checkpoint records, else config.yaml beside it)")
    out = pr.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", type=Path, default=None, help="the output folder (many images)")
    out.add_argument("--out", type=Path, default=None, help="the drawing of a single image (PNG, downscaled to "
                     "--max-side); its CSV and JSON are named after it")
    pr.add_argument("--csv", type=Path, default=None, help="the CSV (default: <out-dir>/predictions.csv, or --out "
                    "with .csv)")
    pr.add_argument("--json", type=Path, default=None, help="the COCO file (default: <out-dir>/predictions.json, or "
                    "--out with .json)")
    pr.add_argument("--recursive", action="store_true", help="folders: also their sub-folders; patterns: ** "
                    "matches any depth")
    pr.add_argument("--overwrite", action="store_true", help="redo images whose outputs are already complete")
    pr.add_argument("--fail-fast", action="store_true", help="stop at the first image that fails (default: report "
                    "it, go on, exit 1 at the end)")
    pr.add_argument("--method", default="nms", choices=METHODS, metavar="METHOD",
                    help=f"post-processing that merges the tiles' candidates: {', '.join(METHODS)}")
    pr.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a keyword of the method")
    pr.add_argument("--params", default=None, metavar="JSON", help="the method's keywords as a JSON object")
    pr.add_argument("--tta", default="none", choices=TTA,
                    help="test-time augmentation of every tile: none; flips (identity, left-right, top-bottom); "
                         "all (the eight flips and 90-degree rotations)")
    pr.add_argument("--tta-merge", default="concat", choices=TTA_MERGES,
                    help="merging the passes: concat (pooled with the tiles' candidates and merged by --method), "
                         "or fuse-score / fuse-quality / fuse-variance (each pass post-processed by --method, "
                         "then weighted boxes fusion weighted by score, predicted IoU or inverse variance)")
    pr.add_argument("--tile-size", type=int, default=400, help="tile side in pixels (at least 32)")
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
    pr.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="refuse larger images (width x height; 0: no limit)")
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda where available; under "
                    "torchrun each process's cuda:LOCAL_RANK)")
    add_trust_flag(pr)
    add_progress_flag(pr)
    pr.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict:
    merge = {k: v for k, v in (("max_detections", args.max_detections),
                               ("candidates_per_tile", args.candidates_per_tile)) if v is not None}
    return dict(method=args.method, params=method_params(args.param, args.params), tile_size=args.tile_size,
                overlap=args.overlap, batch_size=args.batch_size, border=args.border, tta=args.tta,
                tta_merge=args.tta_merge, max_pixels=args.max_pixels, score_threshold=args.score_threshold,
                max_side=args.max_side, progress=not args.no_progress, **merge)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is None and args.config is None:
        raise ValueError("give --checkpoint, or --config whose model is arch: torchvision with weights: FILE")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.out is not None:
        if world > 1:
            raise ValueError("--out predicts one image in one process; under torchrun give --out-dir")
        return _run_single(args)
    from ..engine.distributed import cleanup_distributed, init_distributed

    _, world, local_rank = init_distributed(timeout_s=7 * 24 * 3600)  # ranks wait for each other between images
    try:
        return _run_batch(args, local_rank if world > 1 else None)
    finally:
        cleanup_distributed()


def _run_single(args: argparse.Namespace) -> int:
    from ..experiment import categories_of, load_config, load_detector, predict
    from ..files import check_outputs, output_lock

    image = Path(args.inputs[0])
    if len(args.inputs) != 1 or image.is_dir() or (glob.has_magic(args.inputs[0]) and not image.exists()):
        raise ValueError("--out draws one image file; for several images, a folder or a pattern give --out-dir")
    if not image.is_file():
        raise FileNotFoundError(f"image file not found: {image}")
    csv_path, json_path = args.csv or args.out.with_suffix(".csv"), args.json or args.out.with_suffix(".json")
    check_outputs({"--out": args.out, "--csv": csv_path, "--json": json_path},
                  {"image": image, "checkpoint": args.checkpoint, "config": args.config,
                   "calibration": args.calibration})
    settings = _settings(args)
    with output_lock(args.out, "locconf predict"):
        cfg = load_config(args.config) if args.config else None
        apply_trust_flag(cfg, args.trust_weights)
        model, cfg = load_detector(cfg, args.checkpoint, device=args.device)
        class_names, label_to_cat_id = categories_of(cfg, getattr(model, "categories", None))
        dets = predict(model, image, args.out, device=args.device, calibration=args.calibration, csv_path=csv_path,
                       json_path=json_path, class_names=class_names, label_to_cat_id=label_to_cat_id, **settings)
    shown = int((dets["scores"] >= args.score_threshold).sum())
    print(f"{len(dets['scores'])} detections ({shown} with score >= {args.score_threshold}) drawn in {args.out}; "
          f"CSV {csv_path}, COCO results {json_path}")
    return 0


def _run_batch(args: argparse.Namespace, local_rank: int | None) -> int:
    import time

    import torch

    from ..engine.distributed import get_rank
    from ..experiment import categories_of, load_config, load_detector
    from ..experiment.batch import predict_images

    device = args.device
    if device is None and local_rank is not None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    start = time.perf_counter()
    cfg = load_config(args.config) if args.config else None
    apply_trust_flag(cfg, args.trust_weights)
    model, cfg = load_detector(cfg, args.checkpoint, device=device)
    class_names, label_to_cat_id = categories_of(cfg, getattr(model, "categories", None))
    loaded = time.perf_counter() - start
    summary = predict_images(model, args.inputs, args.out_dir, csv_path=args.csv, json_path=args.json,
                             recursive=args.recursive, overwrite=args.overwrite, fail_fast=args.fail_fast,
                             calibration=args.calibration, class_names=class_names, label_to_cat_id=label_to_cat_id,
                             checkpoint=args.checkpoint, config=args.config, device=device, **_settings(args))
    if get_rank() == 0:
        _print_summary(summary, loaded, args.score_threshold)
    return 1 if summary["failed"] else 0


def _print_summary(s: dict, loaded: float, threshold: float) -> None:
    done = s["predicted"] + s["skipped"]
    rate = f", {s['predicted'] / s['seconds']:.2f} images/s" if s["predicted"] and s["seconds"] > 0 else ""
    procs = f" on {s['world_size']} processes" if s["world_size"] > 1 else ""
    print(f"{s['images']} images: {s['predicted']} predicted, {s['skipped']} skipped (already complete), "
          f"{len(s['failed'])} failed; {s['detections']} detections ({s['shown']} with score >= {threshold}) "
          f"in {s['seconds']:.1f} s{rate}{procs} (model loaded in {loaded:.1f} s)")
    print(f"outputs of {done} images in {s['out_dir']}; CSV {s['csv']}, COCO {s['json']}")
    if s["failed"]:
        print(f"locconf predict: {len(s['failed'])} of {s['images']} images failed:", file=sys.stderr)
        for f in s["failed"]:
            print(f"  {f['image']}: {f['reason']}", file=sys.stderr)
