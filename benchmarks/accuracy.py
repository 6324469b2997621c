"""Accuracy benchmark: every localization-confidence method, same budget, same data, several seeds.

Trains each variant with the same backbone, image size, iterations, batch and schedule on the
training split of a setting, keeps every candidate of the val split once, scores it under every
post-processing method the candidates support (DIR Table 1 style: NMS / Soft-NMS / IoU-guided /
quality / variance voting), and aggregates over seeds.

Run (from the repository root; ``locconf bench`` takes the same options):

    python benchmarks/accuracy.py --setting synthetic --seeds 0 1              # controlled setting
    python benchmarks/accuracy.py --setting neon --seeds 0 1 2                 # NEON, pretrained Lite0
    python benchmarks/accuracy.py --setting neon-scratch --seeds 0 1           # NEON, R18 from scratch
    python benchmarks/accuracy.py --setting neon --variants baseline dir --iterations 300 --threads 2

Writes ``<out>/results.json`` (every run's metrics and the aggregates), ``<out>/table.md`` (overall
and per site, Pearson correlations, the issue's targets, wall times) and ``<out>/plots/*.png`` (each
run's confidence-vs-IoU scatter plot, DIR Figure 4, and ``summary.png``: AP/AP75/AP90 and Pearson
of every variant in one figure). ``<out>`` defaults to
``benchmarks/results/accuracy_<setting>``; training runs live in ``runs/accuracy_<setting>/<variant>/
it<iterations>_seed<seed>/`` (checkpoints are not results).

Resumable: a run whose final checkpoint exists is not retrained (a partial one is resumed exactly),
a run whose evaluation exists is not re-evaluated, and the aggregates are always rebuilt from every
requested run on disk, so adding a seed later trains only that seed.

Spread: mean +- sample standard deviation over seeds (n - 1 in the denominator); ``results.json``
also holds min, max and every seed's value. Deltas are paired by seed: a method's delta over its
own model's NMS (same checkpoint, same candidates) and over the two-stage baseline's NMS (same seed).

The harness itself is the package ``locconf.bench``; this script is its command line, and keeps the
names other scripts import from it (``sys.path.insert(0, "benchmarks"); import accuracy``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from locconf.bench.cli import add_arguments, run
from locconf.bench.report import SIGNALS, TABLE_METRICS, fmt, format_report, format_summary, plot_summary
from locconf.bench.run import (candidate_signals, evaluate_once, hardware, run_benchmark, seconds_per_iteration,
                               select_methods, train_once)
from locconf.bench.settings import (ALL_VARIANTS, BASELINE, DEFAULT_VARIANTS, EXTRA_VARIANTS, SETTINGS, VARIANTS,
                                    Setting, Variant, make_config, neon_setting, synthetic_setting)
from locconf.bench.stats import aggregate, evaluate_targets, paired_deltas, spread, summarize

__all__ = [
    "ALL_VARIANTS", "BASELINE", "DEFAULT_VARIANTS", "EXTRA_VARIANTS", "ROOT", "SETTINGS", "SIGNALS", "TABLE_METRICS",
    "VARIANTS", "Setting", "Variant", "aggregate", "build_parser", "candidate_signals", "evaluate_once",
    "evaluate_targets", "fmt", "format_report", "format_summary", "hardware", "main", "make_config", "neon_setting",
    "paired_deltas", "plot_summary", "run_benchmark", "seconds_per_iteration", "select_methods", "spread",
    "summarize", "synthetic_setting", "train_once",
]

ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(args, root=ROOT, command=command)


if __name__ == "__main__":
    sys.exit(main())
