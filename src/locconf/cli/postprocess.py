"""``locconf postprocess``: post-process or fuse any detector's candidates in files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, method_params
from .choices import CONF_TYPES, FORMATS, METHODS, WEIGHTS


#: The fusion's options and their defaults (given without --fuse, they are refused).
FUSE_DEFAULTS = {"weight": "score", "fuse_iou": 0.55, "model_weights": None, "conf_type": "avg"}


def add_parser(sub, parents) -> None:
    pp = _sub_parser(sub, "postprocess", parents,
                     help="post-process or fuse any detector's candidates in COCO, CSV or vector files",
                     description="Read candidates (COCO results: a JSON array or JSON Lines of {image_id, "
                     "category_id, bbox [x, y, w, h], score, optional quality, optional variance [4]}; "
                     "DeepForest's CSV: image_path, xmin, ymin, xmax, ymax, label, score (or scores), optional "
                     "quality, var_x1..var_y2; GeoJSON / GeoPackage / shapefile of boxes with the same fields), "
                     "post-process each image (or fuse several files) and write detections in the format of "
                     "--out's extension. Formats are told by extension (.json, .jsonl, .csv, .geojson, .gpkg, "
                     ".shp) unless --format / --gt-format / --out-format name them; map coordinates are "
                     "converted through the rasters of --images (pip install \"locconf[geo]\").")
    pp.add_argument("input", nargs="?", type=Path, default=None, help="the candidates file (or use --fuse)")
    pp.add_argument("--fuse", nargs="+", type=Path, default=None, metavar="FILE",
                    help="fuse the detections of these files (one per model or test-time pass)")
    pp.add_argument("--out", "-o", type=Path, required=True,
                    help="output file: .json (COCO results array), .jsonl, .csv, .geojson, .gpkg or .shp")
    pp.add_argument("--method", default="nms", choices=(*METHODS, "none"), metavar="METHOD",
                    help=f"one of {', '.join(METHODS)} (locconf.postprocess.METHODS) or none; "
                         "with --fuse it is applied to each file before fusion")
    pp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a keyword of the method, e.g. --param sigma=0.5 (repeatable)")
    pp.add_argument("--params", default=None, metavar="JSON", help='keywords as a JSON object, e.g. \'{"sigma": 0.5}\'')
    pp.add_argument("--max-detections", type=int, default=100, help="detections kept per image")
    pp.add_argument("--score-threshold", type=float, default=0.0, help="drop candidates below this score first")
    pp.add_argument("--class-agnostic", action="store_true", help="suppress across categories")
    pp.add_argument("--gt", type=Path, default=None,
                    help="ground truth (COCO instances json, CSV, GeoJSON, GeoPackage or shapefile): score input "
                         "and output (COCO AP and DeepForest's box precision / recall)")
    pp.add_argument("--format", default=None, choices=FORMATS, help="format of INPUT / --fuse files (default: by extension)")
    pp.add_argument("--gt-format", default=None, choices=FORMATS, help="format of --gt (default: by extension)")
    pp.add_argument("--out-format", default=None, choices=FORMATS, help="format of --out (default: by extension)")
    pp.add_argument("--images", action="append", type=Path, default=None, metavar="PATH",
                    help="an image file or folder (repeatable): the rasters of vector files in map coordinates (and "
                         "of a vector --out, then written in map coordinates) and the images a CSV names (the "
                         "folder of each file read is also searched)")
    pp.add_argument("--pr-iou", type=float, default=0.4,
                    help="IoU above which a matched box is a true positive in the box precision / recall")
    pp.add_argument("--pr-score", type=float, default=0.1, help="score from which boxes count in the box precision / recall")
    pp.add_argument("--weight", default=FUSE_DEFAULTS["weight"], choices=WEIGHTS, help="fusion weight")
    pp.add_argument("--fuse-iou", type=float, default=FUSE_DEFAULTS["fuse_iou"], help="fusion IoU threshold")
    pp.add_argument("--model-weights", type=float, nargs="+", default=FUSE_DEFAULTS["model_weights"],
                    help="one weight per --fuse file")
    pp.add_argument("--conf-type", default=FUSE_DEFAULTS["conf_type"], choices=CONF_TYPES,
                    help="how a fused box's score is computed")
    pp.add_argument("--calibration", type=Path, default=None,
                    help="calibrate each record's quality with this JSON (from locconf eval) first")
    add_progress_flag(pp)
    pp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..files import check_outputs, output_lock, require_file

    if (args.input is None) == (args.fuse is None):
        raise ValueError("locconf postprocess needs either one INPUT file or --fuse FILE [FILE ...]")
    if args.calibration is not None and args.fuse is not None:
        raise ValueError("--calibration applies to one INPUT file, not to --fuse")
    if args.fuse is None:  # the fusion's options, given without --fuse, would be silently ignored
        given = [f"--{key.replace('_', '-')}" for key, default in FUSE_DEFAULTS.items()
                 if getattr(args, key) != default]
        if given:
            raise ValueError(f"{', '.join(given)} applies to --fuse FILE [FILE ...] only (fusing several files), "
                             "not to one INPUT file")
    for name, paths in (("input", [args.input]), ("--fuse file", args.fuse or []), ("--gt file", [args.gt]),
                        ("--calibration file", [args.calibration])):
        for path in paths:
            if path is not None and path.is_dir():  # a missing file is the reader's to name
                require_file(path, name)
    check_outputs({"--out": args.out}, {"input": args.input, "--fuse file": args.fuse, "--gt": args.gt,
                                        "--calibration": args.calibration})
    if args.out.is_dir():
        raise IsADirectoryError(f"output {args.out} is a folder: give a file name (--out)")
    if not args.out.parent.is_dir():
        raise ValueError(f"output folder {args.out.parent} does not exist")
    with output_lock(args.out, command="locconf postprocess", folder=False):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..postprocess_files import format_correlation, format_sites, fuse_files, postprocess_file

    common = dict(method=args.method, params=method_params(args.param, args.params),
                  max_detections=args.max_detections, score_threshold=args.score_threshold,
                  class_agnostic=args.class_agnostic, gt=args.gt, progress=not args.no_progress,
                  format=args.format, gt_format=args.gt_format, out_format=args.out_format, images=args.images,
                  pr_iou_threshold=args.pr_iou, pr_score_threshold=args.pr_score)
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
        print("\nCOCO bbox metrics and DeepForest's box precision / recall (IoU > " f"{args.pr_iou:g}, score >= "
              f"{args.pr_score:g}; x 100) against {args.gt}:")
        print(report["table"])
        sites = format_sites(report["precision_recall"])
        if sites:
            print("\nbox precision / recall per site:")
            print(sites)
        if any(report["correlation"].values()):
            print("\ncorrelation with the true IoU (boxes with IoU > 0.5):")
            print(format_correlation(report["correlation"]))
    return 0
