"""``locconf bench``: the accuracy comparison (:mod:`locconf.bench`)."""

from __future__ import annotations

import argparse

from ._common import add_parser as _sub_parser


def add_parser(sub, parents) -> None:
    from ..bench.cli import add_arguments  # no torch import: --help stays fast

    bench = _sub_parser(sub, "bench", parents, help="the accuracy comparison: every detector, same budget, "
                        "several seeds",
                        description="Train every variant (detector) on a setting's training split with the same "
                        "budget, score the val candidates under every post-processing method they support, "
                        "aggregate over seeds and write results.json, table.md and plots (locconf.bench). "
                        "Resumable: finished trainings and evaluations are reused.")
    add_arguments(bench)
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.cli import run as run_bench

    return run_bench(args)
