"""``locconf train``: train a detector from a YAML configuration."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_progress_flag, add_set_flag
from ._common import add_progress_flag, add_trust_flag, apply_trust_flag


def add_parser(sub, parents) -> None:
    train = _sub_parser(sub, "train", parents, help="train a detector from a YAML config")
    train.add_argument("config", type=Path, help="the YAML configuration (sections model, data, train, eval)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    add_set_flag(train)
    add_trust_flag(train)
    add_progress_flag(train)
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import load_config, run_train

    cfg = load_config(args.config, overrides=args.set)
    if args.no_progress:
        cfg["train"]["progress"] = False
    summary = run_train(cfg, resume=args.resume, config_file=args.config)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in (summary.get("losses") or {}).items())
    print(f"step {summary['step']} in {summary['seconds']:.0f} s; last losses: {losses}")
    if summary.get("eval"):
        scores = ", ".join(f"{m} AP {100 * r['AP']:.1f}" for m, r in summary["eval"].items() if "AP" in r)
        print(f"val at step {summary['step']}: {scores}")
    print(f"checkpoint: {summary['checkpoint']}; metrics: {summary['metrics_file']}")
    return 0
