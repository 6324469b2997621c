"""The accuracy comparison as Markdown (``table.md``) and as one summary figure (``plots/summary.png``).

Everything here reads the results dict of :func:`locconf.bench.run.run_benchmark` (the content of
``results.json``), so a report can be rebuilt from a saved ``results.json`` alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..evaluation import CONFIDENCE_SIGNALS as SIGNALS  # score, quality, combined
from .settings import BASELINE

#: Metrics shown in the Markdown tables (results.json holds every metric of evaluate_methods).
TABLE_METRICS = ("AP", "AP50", "AP75", "AP90", "box_precision", "box_recall")

#: Metrics of the compact summary table (the README quotes it).
SUMMARY_METRICS = ("AP", "AP50", "AP75", "AP90")

#: Column headers of the metrics (DeepForest's box precision / recall at IoU > 0.4, score >= 0.1).
HEADERS = {"box_precision": "P@0.4", "box_recall": "R@0.4"}


def _headers(metrics=TABLE_METRICS) -> str:
    return " | ".join(HEADERS.get(k, k) for k in metrics)


def fmt(stat: Mapping | None, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± std`` (``mean`` alone for one seed, ``-`` for undefined), scaled."""
    if not stat:
        return "-"
    sign = "+" if signed else ""
    text = f"{stat['mean'] * scale:{sign}.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 3] + "..."


def _target_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and "mean" in value:
        return fmt(value, scale=1.0, digits=3)
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            scale, digits, signed = (100.0, 1, True) if k in ("AP", "AP75", "AP90") else (1.0, 3, False)
            parts.append(f"{k}: {fmt(v, scale=scale, digits=digits, signed=signed)}")
        return "; ".join(parts)
    return str(value)


def format_summary(results: Mapping) -> str:
    """One row per variant: its paper's post-processing, the metrics, the paired deltas and the
    Pearson correlations (the compact table the README quotes)."""
    agg = results["aggregate"]["variants"]
    lines = [f"| variant | method | {_headers(SUMMARY_METRICS)} | dAP / dAP75 (own NMS) | dAP / dAP75 (baseline NMS) | "
             "Pearson score | Pearson quality |", "|---|---|" + "---:|" * (len(SUMMARY_METRICS) + 4)]
    for name, a in agg.items():
        method = a["headline"]
        m = a["summary"]["methods"].get(method)
        if not m:
            continue
        own, base = a["delta_own_nms"].get(method, {}), a["delta_baseline_nms"].get(method, {})
        corr = a["summary"]["correlation"]
        own_text = ("(is NMS)" if method == "nms"
                    else f"{fmt(own.get('AP'), signed=True)} / {fmt(own.get('AP75'), signed=True)}")
        base_text = ("(is the reference)" if name == BASELINE and method == "nms"
                     else f"{fmt(base.get('AP'), signed=True)} / {fmt(base.get('AP75'), signed=True)}")
        pearson = [fmt((corr.get(sig) or {}).get("pearson"), scale=1.0, digits=2) for sig in ("score", "quality")]
        lines.append(f"| {name} | {method} | " + " | ".join(fmt(m.get(k)) for k in SUMMARY_METRICS)
                     + f" | {own_text} | {base_text} | {pearson[0]} | {pearson[1]} |")
    return "\n".join(lines) + "\n"


def _header(meta: Mapping, places: Sequence[str] = ()) -> list[str]:
    """Title, data, budget, hardware, seeds, wall time, command and how to read the tables.

    ``places``: where the runs trained (each run's ``train_hardware``), when that is not one machine.
    """
    hw = meta["hardware"]
    return [
        f"# Accuracy benchmark: {meta['setting']}", "",
        f"- Data: {meta['description']}; train {meta['data']['train_images']} images / {meta['data']['train_boxes']} "
        f"boxes, val {meta['data']['val_images']} images / {meta['data']['val_boxes']} boxes.",
        f"- Budget (every variant): {meta['budget']}.",
        f"- Hardware{' of this invocation' if len(places) > 1 else ''}: {hw['device']}; {hw['cpu']}, "
        f"{hw['threads']} torch threads; torch {hw['torch']}, torchvision {hw['torchvision']}, "
        f"Python {hw['python']}.",
        *([f"- Trained on several machines (the Runs table says which run where): {'; '.join(places)}."]
          if len(places) > 1 else []),
        f"- Seeds: {', '.join(str(s) for s in meta['seeds'])}. Cells are mean ± sample std over seeds "
        "(n - 1; a single seed shows the value alone); results.json has min, max and every seed.",
        f"- Wall time: {meta['wall_time_runs_s'] / 3600:.2f} h ({meta['wall_time_runs_s'] / 60:.0f} min) of "
        "training + evaluation summed over all runs "
        f"(this invocation: {meta['wall_time_invocation_s'] / 60:.1f} min).",
        f"- Command: `{meta['command']}`",
        "",
        "Metrics x 100 on the val split. P@0.4 / R@0.4: DeepForest's box precision / recall (one-to-one "
        "matching per image, IoU > 0.4, detections scored >= 0.1, mean over images; "
        "locconf.evaluation.precision_recall). d(own NMS): the method minus NMS on the *same* model's candidates; "
        "d(baseline NMS): the method minus the two-stage baseline with NMS, paired by seed. "
        "**bold** = the method the variant's paper uses.",
        "",
    ]


def _variants_table(variants: Mapping) -> list[str]:
    lines = ["## Variants", "", "| variant | detector | paper's post-processing | signals expected |",
             "|---|---|---|---|"]
    for name, info in variants.items():
        reuse = f" (evaluates {info['reuses']}'s checkpoints)" if info.get("reuses") else ""
        lines.append(f"| {name} | {info.get('label', name)}{reuse} | {info.get('headline', 'nms')} | "
                     f"{', '.join(info.get('expects') or []) or 'none'} |")
    return lines


def _overall_table(variants: Mapping, agg: Mapping) -> list[str]:
    """Every (variant, method): the metrics and the deltas over its own and the baseline's NMS."""
    lines = ["", "## Overall", "",
             "| variant | method | " + _headers()
             + " | dAP (own NMS) | dAP75 (own NMS) | dAP (baseline NMS) | dAP75 (baseline NMS) |",
             "|---|---|" + "---:|" * (len(TABLE_METRICS) + 4)]
    for name, info in variants.items():
        a = agg["variants"].get(name)
        if info.get("errors") and (a is None or not a["summary"]["methods"]):
            lines.append(f"| {name} | failed: {_short(info['errors'][0])} |" + " |" * (len(TABLE_METRICS) + 4))
            continue
        if a is None:
            continue
        for method, m in a["summary"]["methods"].items():
            label = f"**{method}**" if method == a["headline"] else method
            own = a["delta_own_nms"].get(method, {})
            base = a["delta_baseline_nms"].get(method, {})
            cells = [fmt(m.get(k)) for k in TABLE_METRICS]
            cells += [fmt(own.get("AP"), signed=True) if method != "nms" else "",
                      fmt(own.get("AP75"), signed=True) if method != "nms" else "",
                      fmt(base.get("AP"), signed=True), fmt(base.get("AP75"), signed=True)]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _site_table(agg: Mapping) -> list[str]:
    site_rows = []
    for name, a in agg["variants"].items():
        for method, m in a["summary"]["methods"].items():
            for site, sm in (m.get("sites") or {}).items():
                label = f"**{method}**" if method == a["headline"] else method
                site_rows.append(f"| {name} | {label} | {site} | " + " | ".join(fmt(sm.get(k)) for k in TABLE_METRICS)
                                 + " |")
    if not site_rows:
        return []
    return ["## Per site", "", "| variant | method | site | " + _headers() + " |",
            "|---|---|---|" + "---:|" * len(TABLE_METRICS)] + site_rows + [""]


def _correlation_table(agg: Mapping) -> list[str]:
    lines = ["## Correlation of each confidence signal with the true IoU (DIR Figure 4)", "",
             "Pearson (Spearman in results.json) over the raw candidates whose IoU with a ground truth exceeds 0.5; "
             "combined = sqrt(score x quality).", "",
             "| variant | score | quality | combined | n (candidates) |", "|---|---:|---:|---:|---:|"]
    for name, a in agg["variants"].items():
        corr = a["summary"]["correlation"]
        if not corr:
            continue
        cells = [fmt((corr.get(s) or {}).get("pearson"), scale=1.0, digits=3) for s in SIGNALS]
        n = next((c["n"] for c in corr.values() if c.get("n")), None)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if n is None else format(n['mean'], '.0f')} |")
    lines.append("")
    return lines


def _targets_table(agg: Mapping) -> list[str]:
    """The issue's targets, then each variant's headline method against both NMS references."""
    lines = ["## Targets (issue 7)", "", "| target | value | verdict |", "|---|---|---|"]
    for t in agg["targets"]:
        lines.append(f"| {t['target']} | {_target_value(t['value'])} | {t['verdict']}"
                     + (f" ({t['detail']})" if t.get("detail") else "") + " |")
    lines += ["", "Each variant's headline method against its own NMS and against the baseline's NMS "
              "(x 100, mean ± std over seeds):", "",
              "| variant | headline | dAP (own) | dAP75 (own) | dAP90 (own) | dAP (baseline) | dAP75 (baseline) | "
              "dAP90 (baseline) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, a in agg["variants"].items():
        h = a["headline"]
        own, base = a["delta_own_nms"].get(h, {}), a["delta_baseline_nms"].get(h, {})
        if not a["summary"]["methods"]:
            continue
        cells = [fmt(own.get(k), signed=True) if h != "nms" else "0 (is NMS)" for k in ("AP", "AP75", "AP90")]
        cells += [fmt(base.get(k), signed=True) for k in ("AP", "AP75", "AP90")]
        lines.append(f"| {name} | {h} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _places(variants: Mapping) -> list[str]:
    """The distinct ``train_hardware`` lines of the runs, sorted."""
    return sorted({r["train_hardware"] for info in variants.values() for r in info["runs"].values()
                   if r.get("train_hardware")})


def short_place(place: str | None) -> str:
    """A run's hardware line, short: 'CUDA (NVIDIA H200), fp32, <cpu>, 1 threads' -> 'H200, fp32';
    'CPU, <cpu>, 1 threads' -> 'CPU' (also benchmarks/recipe.py's table)."""
    if not place:
        return "-"
    if place.startswith("CUDA ("):
        gpu = place[len("CUDA ("):].split(")", 1)[0].replace("NVIDIA ", "")
        return gpu + (", fp32" if ", fp32" in place else ", mixed precision" if "mixed precision" in place else "")
    return place.split(",", 1)[0]


def _runs_table(variants: Mapping) -> list[str]:
    """Every (variant, seed): status, times, signals and scatter plot; then hardware notes and warnings."""
    places = _places(variants)
    where = len(places) > 1  # a "trained on" column only when the runs trained on different machines
    lines = ["## Runs", "", "| variant | seed | status | " + ("trained on | " if where else "")
             + "train (min) | s/iter | eval (s) | signals | scatter plot |",
             "|---|---:|---|" + ("---|" if where else "") + "---:|---:|---:|---|---|"]
    for name, info in variants.items():
        for seed, run in info["runs"].items():
            train_min = f"{run['train_s'] / 60:.1f}" if run.get("train_s") is not None else "-"
            s_iter = f"{run['s_per_iter']:.2f}" if run.get("s_per_iter") is not None else "-"
            eval_s = f"{run['eval_s']:.0f}" if run.get("eval_s") is not None else "-"
            plot = f"[png]({run['plot']})" if run.get("plot") else ""
            status = run.get("status", "")
            if run.get("error"):
                status = f"failed: {_short(run['error'])}"
            trained = f"{short_place(run.get('train_hardware'))} | " if where else ""
            lines.append(f"| {name} | {seed} | {status} | {trained}{train_min} | {s_iter} | {eval_s} | "
                         f"{', '.join(run.get('signals') or []) or 'none'} | {plot} |")
    if where:
        lines += ["", "The runs were trained on different hardware, so their times do not compare: "
                  + "; ".join(places) + "."]
    warnings = [w for info in variants.values() for w in info.get("warnings", [])]
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    return lines


def format_report(results: Mapping) -> str:
    """The Markdown report of :func:`locconf.bench.run.run_benchmark`'s results dict."""
    agg, meta, variants = results["aggregate"], results["meta"], results["variants"]
    lines = _header(meta, _places(variants))
    if meta.get("summary_plot"):
        lines += [f"![summary]({meta['summary_plot']})", ""]
    lines += ["## Summary: each variant under its paper's post-processing", "", format_summary(results)]
    lines += _variants_table(variants)
    lines += _overall_table(variants, agg)
    lines += _site_table(agg)
    lines += _correlation_table(agg)
    lines += _targets_table(agg)
    lines += _runs_table(variants)
    return "\n".join(lines) + "\n"


def _bar(stat: Mapping | None, scale: float = 100.0) -> tuple[float, float, float]:
    """(mean, mean - min, max - mean), scaled; NaN (no bar) when undefined."""
    if not stat:
        return math.nan, 0.0, 0.0
    return scale * stat["mean"], scale * (stat["mean"] - stat["min"]), scale * (stat["max"] - stat["mean"])


def _bars(ax, y: list[int], offset: float, vals: list[tuple[float, float, float]], color: str, label: str) -> None:
    ax.barh([v + offset for v in y], [v[0] for v in vals], height=0.38, color=color,
            xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=2, label=label)


def plot_summary(results: Mapping, path: str | Path) -> Path | None:
    """One figure of the comparison: each variant's AP / AP75 / AP90 under NMS and under its
    headline method (mean, with min-max over seeds as error bars), and the Pearson correlation of
    its score and quality with the true IoU. Returns the path, or None when nothing was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = results["aggregate"]["variants"]
    names = [n for n, a in agg.items() if a["summary"]["methods"]]
    if not names:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(4.2 * 4, 0.42 * len(names) + 1.8), sharey=True)
    y = list(range(len(names)))
    for ax, metric in zip(axes[:3], ("AP", "AP75", "AP90")):
        for offset, headline, color, label in ((-0.2, False, "0.6", "NMS"),
                                               (0.2, True, "tab:blue", "paper's post-processing")):
            _bars(ax, y, offset, [_bar(agg[n]["summary"]["methods"].get(agg[n]["headline"] if headline else "nms",
                                                                       {}).get(metric)) for n in names], color, label)
        ax.set_title(f"{metric} (x 100)")
        ax.grid(axis="x", alpha=0.3)
    ax = axes[3]
    for offset, signal, color in ((-0.2, "score", "0.6"), (0.2, "quality", "tab:orange")):
        _bars(ax, y, offset, [_bar((agg[n]["summary"]["correlation"].get(signal) or {}).get("pearson"), scale=1.0)
                              for n in names], color, signal)
    ax.set_title("Pearson with true IoU (IoU > 0.5)")
    ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{n} ({agg[n]['headline']})" for n in names])
    axes[0].invert_yaxis()
    axes[0].legend(loc="best", fontsize=7)
    axes[3].legend(loc="best", fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"{meta['setting']}: mean over seeds {meta['seeds']} (bars: min-max)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
