"""``locconf data``: fetch the NEON tree crowns or generate synthetic scenes, as COCO."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser


def add_parser(sub, parents) -> None:
    data = _sub_parser(sub, "data", parents, help="fetch or generate a dataset in COCO format")
    dsub = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    neon = _sub_parser(dsub, "neon-trees", parents,
                       help="NEON aerial tree crowns from the deepforest wheel, tiled and split")
    neon.add_argument("--out", type=Path, required=True, help="output folder (COCO json + PNG tiles)")
    neon.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    neon.add_argument("--overlap", type=int, default=100, help="least overlap of neighbouring tiles in pixels")
    neon.add_argument("--val-height", type=int, default=400, help="held-out band at the bottom of each large image")
    neon.add_argument("--cache-dir", type=Path, default=None,
                      help="where the wheel is cached (default: $LOCCONF_CACHE or ~/.cache/locconf)")
    syn = _sub_parser(dsub, "synthetic", parents, help="synthetic scenes (deterministic by seed)")
    syn.add_argument("--out", type=Path, required=True, help="output folder")
    syn.add_argument("--num-train", type=int, default=200, help="training scenes")
    syn.add_argument("--num-val", type=int, default=50, help="validation scenes")
    syn.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    syn.add_argument("--num-classes", type=int, default=3, help="object classes")
    syn.add_argument("--seed", type=int, default=0, help="seed of the training scenes (val: seed + 1)")
    data.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file: give a folder (the COCO files and images go there)")
    if args.dataset == "neon-trees":
        from ..data import neon_trees

        counts = neon_trees(args.out, tile_size=args.tile_size, overlap=args.overlap, val_height=args.val_height,
                            cache_dir=args.cache_dir)
        for split in ("train", "val"):
            c = counts[split]
            sites = ", ".join(f"{s}: {v['images']} images / {v['boxes']} boxes" for s, v in c["sites"].items())
            print(f"{split:5s} {c['images']:3d} images {c['boxes']:5d} boxes  ({sites})")
        print(f"val holds {counts['val_fraction']:.0%} of the crowns; COCO files: {counts['train_json']}, "
              f"{counts['val_json']} ({counts['seconds']} s)")
    else:
        from ..experiment.build import write_synthetic_splits

        splits = write_synthetic_splits(args.out, args.num_train, args.num_val, args.image_size, args.num_classes,
                                        args.seed)
        for split, (n, path) in splits.items():
            print(f"{split}: {n} scenes -> {path}")
    return 0
