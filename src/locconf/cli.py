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
    report = run_eval(model, cfg, out_dir, methods=methods, device=args.device)
    _print_report(report)
    return 0


def _print_report(report: dict) -> None:
    print(report["table"])
    corr = report["correlation"]
    if corr:
        print("\ncorrelation with the true IoU (candidates with IoU > 0.5):")
        for signal, c in corr.items():
            print(f"  {signal:9s} pearson {c['pearson']:+.3f}  spearman {c['spearman']:+.3f}  n={c['n']}")
    print(f"\nresults, table and plots in {report['out_dir']}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .experiment import load_config, load_trained, predict

    cfg = load_config(args.config) if args.config else None
    model, _ = load_trained(args.checkpoint, cfg, device=args.device)
    dets = predict(model, args.image, args.out, method=args.method, score_threshold=args.score_threshold,
                   device=args.device)
    shown = int((dets["scores"] >= args.score_threshold).sum())
    print(f"{len(dets['scores'])} detections ({shown} with score >= {args.score_threshold}) drawn in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiment import check_config, load_trained, neon_recipe, run_eval, run_train

    out = Path(args.out)
    recipe = neon_recipe()  # the NEON CPU recipe (benchmarks/results/recipe.md) with a DIR head
    cfg = check_config({
        "model": dict(arch="rcnn", quality="dir", quality_representation_size=256, **recipe["model"]),
        "data": dict(recipe["data"], root=str(args.data)),
        "train": dict(iterations=args.iterations, batch_size=2, lr=0.02, warmup_iters=min(100, args.iterations // 4),
                      clip_grad_norm=10.0, out_dir=str(out), checkpoint_every=max(1, args.iterations // 4),
                      log_every=10, seed=0),
        "eval": dict(methods=["nms", "soft-linear", "soft-gaussian", "quality", "quality+soft-gaussian"]),
    }, source="demo")
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        print(f"training a Faster R-CNN R18-FPN with a DIR head (Purity/Integrity in hindsight) from scratch "
              f"on NEON tree crowns for {args.iterations} iterations")
        from .engine.checkpoint import latest_checkpoint

        summary = run_train(cfg, resume=True)  # a finished run in --out is reused, a killed one continued
        checkpoint = Path(summary["checkpoint"] or latest_checkpoint(out))
    model, _ = load_trained(checkpoint, cfg)
    print("evaluating the same candidates under NMS, Soft-NMS and DIR's quality NMS (val split)")
    _print_report(run_eval(model, cfg, out / "eval"))
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

    train = sub.add_parser("train", help="train a detector from a YAML config")
    train.add_argument("config", type=Path)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint under several post-processing methods")
    ev.add_argument("config", type=Path)
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--methods", default=None, help="comma-separated, e.g. nms,soft-gaussian,quality")
    ev.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md and plots")
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="draw a checkpoint's detections on an image")
    pr.add_argument("image", type=Path)
    pr.add_argument("--checkpoint", type=Path, required=True)
    pr.add_argument("--config", type=Path, default=None, help="default: config.yaml beside the checkpoint")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--method", default="nms")
    pr.add_argument("--score-threshold", type=float, default=0.3)
    pr.add_argument("--device", default=None)
    pr.set_defaults(func=_cmd_predict)

    demo = sub.add_parser("demo", help="the whole idea in a few CPU minutes on NEON tree crowns")
    demo.add_argument("--iterations", type=int, default=400)
    demo.add_argument("--data", type=Path, default=Path("data/neon"))
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
