"""``locconf demo``: the whole idea in a few CPU minutes on NEON tree crowns."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, add_set_flag, print_report


def add_parser(sub, parents) -> None:
    demo = _sub_parser(sub, "demo", parents, help="the whole idea in a few CPU minutes on NEON tree crowns")
    # 750: what fits the demo's ~10 minutes on two idle CPU cores (1000 took 12.5 min)
    demo.add_argument("--iterations", type=int, default=750,
                      help="training iterations (~10 min on two idle CPU cores at 750)")
    demo.add_argument("--data", type=Path, default=Path("data/neon"), help="where the NEON tiles are (or go)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="the run folder")
    demo.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    add_set_flag(demo)
    add_progress_flag(demo)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import apply_overrides, check_config, load_trained, neon_recipe, run_eval, run_train

    out = Path(args.out)
    recipe = neon_recipe()  # the pretrained NEON CPU recipe (benchmarks/results/recipe_pretrained.md), DIR head
    cfg = {
        "model": dict(arch="rcnn", quality="dir", quality_representation_size=256, **recipe["model"]),
        "data": dict(recipe["data"], root=str(args.data)),
        "train": dict(recipe["train"], iterations=args.iterations, batch_size=2,
                      warmup_iters=min(100, args.iterations // 4), out_dir=str(out),
                      checkpoint_every=max(1, args.iterations // 4), log_every=10, seed=0,
                      progress=not args.no_progress),
        "eval": dict(methods=["nms", "soft-linear", "soft-gaussian", "quality", "quality+soft-gaussian"]),
    }
    cfg = check_config(cfg, source="demo", origins=apply_overrides(cfg, args.set))
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        print(f"training a Faster R-CNN with a DIR head (Purity/Integrity in hindsight) on an ImageNet "
              f"EfficientNet-Lite0 FPN, on NEON tree crowns, for {args.iterations} iterations")
        from ..engine.checkpoint import latest_checkpoint

        summary = run_train(cfg, resume=True)  # a finished run in --out is reused, a killed one continued
        checkpoint = Path(summary["checkpoint"] or latest_checkpoint(out))
    model, _ = load_trained(checkpoint, cfg)
    print("evaluating the same candidates under NMS, Soft-NMS and DIR's quality NMS (val split)")
    print_report(run_eval(model, cfg, out / "eval", progress=not args.no_progress, checkpoint=checkpoint))
    return 0
