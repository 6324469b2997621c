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
        from .data import SyntheticScenes, write_synthetic_coco

        for split, n, seed in (("train", args.num_train, args.seed), ("val", args.num_val, args.seed + 1)):
            ds = SyntheticScenes(n, image_size=args.image_size, num_classes=args.num_classes, seed=seed,
                                 min_size=max(4, args.image_size // 16), max_size=max(8, args.image_size * 3 // 8))
            print(f"{split}: {n} scenes -> {write_synthetic_coco(ds, args.out, split=split)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locconf", description="Localization-confidence-aware object detection.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
