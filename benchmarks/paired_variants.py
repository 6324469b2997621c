"""Paired differences between the variants of one accuracy comparison (``benchmarks/accuracy.py``).

The accuracy table compares every variant with its own NMS and with the two-stage baseline; this
script compares two variants directly, seed by seed, under the same post-processing method: for
each ``--pair A B`` and method, ``metric(A, seed) - metric(B, seed)`` over the seeds both have,
as mean +- sample std (n - 1) and every seed's value. Used for issue 29's IoU-Net comparisons (loss
weight 5 against 1, the score of refined boxes):

    python benchmarks/paired_variants.py benchmarks/results/iou_net_weight_synthetic \\
        --pair iou_net_w5 iou_net_w1 --pair iou_net_refine_w5 iou_net_refine_w1 --methods iou-guided nms

Reads ``<folder>/results.json``; writes ``<folder>/paired.md`` (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from locconf.bench.stats import paired_deltas

METRICS = ("AP", "AP50", "AP75", "AP90")


def _runs(results: dict, variant: str) -> dict:
    try:
        runs = results["variants"][variant]["runs"]
    except KeyError:
        known = sorted(results.get("variants", {}))
        raise ValueError(f"results.json has no runs of variant {variant!r}; it has {known}") from None
    return {seed: run for seed, run in runs.items() if run.get("methods")}


def _cell(spread: dict | None) -> str:
    if not spread:
        return "-"
    std = "" if spread["std"] is None else f" ± {100 * spread['std']:.1f}"
    return f"{100 * spread['mean']:+.1f}{std}"


def paired_table(results: dict, pairs: Sequence[tuple[str, str]], methods: Sequence[str]) -> str:
    """Markdown table of the paired differences (x 100) of each pair under each method."""
    lines = ["| A | B | method | seeds | " + " | ".join(f"d{m}" for m in METRICS) + " | dAP per seed |",
             "|---|---|---|---:|" + "---:|" * len(METRICS) + "---|"]
    for a, b in pairs:
        runs_a, runs_b = _runs(results, a), _runs(results, b)
        for method in methods:
            deltas = paired_deltas({s: r for s, r in runs_a.items() if method in r["methods"]}, runs_b, method,
                                   METRICS).get(method)
            if not deltas:
                continue
            ap = deltas.get("AP")
            per_seed = ", ".join(f"{100 * v:+.1f}" for v in ap["values"]) if ap else "-"
            lines.append(f"| {a} | {b} | {method} | {ap['n'] if ap else 0} | "
                         + " | ".join(_cell(deltas.get(m)) for m in METRICS) + f" | {per_seed} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="an accuracy comparison's --out folder (holds results.json)")
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                    help="report A - B (repeatable)")
    ap.add_argument("--methods", nargs="+", default=["iou-guided", "nms"], help="post-processing methods")
    ap.add_argument("--out", default=None, help="markdown file (default: <folder>/paired.md)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    source = folder / "results.json"
    if not source.is_file():
        raise SystemExit(f"paired_variants: error: {source} does not exist (run benchmarks/accuracy.py first)")
    results = json.loads(source.read_text())
    try:
        table = paired_table(results, [tuple(p) for p in args.pair], args.methods)
    except ValueError as err:
        raise SystemExit(f"paired_variants: error: {err}") from None
    command = "python benchmarks/paired_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    seeds = results.get("meta", {}).get("seeds")
    text = (f"# Paired differences: {results.get('meta', {}).get('setting', '?')}\n\n"
            f"Metric of A minus metric of B on the same seed and post-processing method, x 100; mean ± sample "
            f"std over the seeds both have (seeds run: {seeds}).\n\nCommand: `{command}`\n\n{table}\n")
    out = Path(args.out) if args.out else folder / "paired.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
