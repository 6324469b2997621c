"""Two runs of the accuracy harness side by side: the same variants, before and after a change.

    python benchmarks/side_by_side.py OLD/results.json NEW/results.json [--variants kl gfl clq]
        [--labels old new] [--methods nms quality]

Prints a Markdown table: for each variant and method (default: NMS and the variant's headline
method) the mean ± sample std over seeds of AP, AP75, AP90 (x 100) in each run and the difference,
and the Pearson correlation of the variant's quality signal with the true IoU where it has one.
Both files are the ``results.json`` that ``benchmarks/accuracy.py`` writes; a variant missing from
either is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("AP", "AP75", "AP90")


def _load(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"{path}: no such results file")
    data = json.loads(file.read_text())
    if "aggregate" not in data or "variants" not in data["aggregate"]:
        raise SystemExit(f"{path}: not a results.json of benchmarks/accuracy.py (no aggregate.variants)")
    return data["aggregate"]["variants"]


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "-"
    mean, std = 100 * stat["mean"], stat.get("std")
    return f"{mean:.1f}" if std is None or stat.get("n", 1) < 2 else f"{mean:.1f} ± {100 * std:.1f}"


def _pearson(variant: dict) -> dict | None:
    quality = variant["summary"].get("correlation", {}).get("quality")
    return None if quality is None else quality.get("pearson")


def rows(old: dict, new: dict, variants: list[str], methods: list[str] | None) -> tuple[list[str], list[str]]:
    """Markdown rows of the table and notes on what was skipped."""
    out, notes = [], []
    for name in variants:
        if name not in old or name not in new:
            notes.append(f"{name}: not in {'the old' if name not in old else 'the new'} results")
            continue
        wanted = methods or list(dict.fromkeys(["nms", new[name]["headline"]]))
        for method in wanted:
            a = old[name]["summary"]["methods"].get(method)
            b = new[name]["summary"]["methods"].get(method)
            if a is None or b is None:
                notes.append(f"{name} / {method}: not in both runs")
                continue
            cells = []
            for m in METRICS:
                diff = 100 * (b[m]["mean"] - a[m]["mean"])
                cells += [_cell(a[m]), _cell(b[m]), f"{diff:+.1f}"]
            pa, pb = _pearson(old[name]), _pearson(new[name])
            out.append(f"| {name} | {method} | " + " | ".join(cells)
                       + f" | {_pearson_cell(pa)} | {_pearson_cell(pb)} |")
    return out, notes


def _pearson_cell(stat: dict | None) -> str:
    return "-" if stat is None else f"{stat['mean']:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--variants", nargs="+", help="default: every variant in both files")
    parser.add_argument("--methods", nargs="+", help="default: nms and each variant's headline method")
    parser.add_argument("--labels", nargs=2, default=("old", "new"))
    args = parser.parse_args(argv)
    old, new = _load(args.old), _load(args.new)
    variants = args.variants or [v for v in new if v in old]
    a, b = args.labels
    header = "| variant | method | " + " | ".join(f"{m} {a} | {m} {b} | d{m}" for m in METRICS)
    header += f" | Pearson quality {a} | Pearson quality {b} |"
    print(header)
    print("|---|---|" + "---:|" * (3 * len(METRICS) + 2))
    body, notes = rows(old, new, variants, args.methods)
    print("\n".join(body))
    for note in notes:
        print(f"\n- {note}")


if __name__ == "__main__":
    main()
