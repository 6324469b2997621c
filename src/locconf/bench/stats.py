"""Aggregation of an accuracy comparison over seeds: spreads, paired deltas and the issue's targets.

Spread: mean +- sample standard deviation over seeds (n - 1 in the denominator), with min, max and
every seed's value. Deltas are paired by seed: a method's delta over its own model's NMS (same
checkpoint, same candidates) and over the two-stage baseline's NMS (same seed).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Mapping, Sequence

from .settings import BASELINE


def _defined(value: Any) -> bool:
    """A usable metric value: a finite number that is not COCO's -1 ("undefined")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != -1


def _ordered(items: Iterable[str]) -> list[str]:
    """The distinct items in the order of their first appearance."""
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def spread(values: Iterable[Any]) -> dict | None:
    """Mean, sample standard deviation (n - 1; None for one value), min, max, n and the values used.

    Undefined values (None, NaN, -1) are left out; None when nothing is left.
    """
    vals = [float(v) for v in values if _defined(v)]
    if not vals:
        return None
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def _summarize_method(per_run: Sequence[Mapping]) -> dict:
    """One method's metrics (and per-site metrics) over the runs that have it."""
    metrics = _ordered(k for m in per_run for k in m if k != "sites")
    entry: dict[str, Any] = {k: spread(m.get(k) for m in per_run) for k in metrics}
    sites = _ordered(s for m in per_run for s in m.get("sites", {}))
    if sites:
        entry["sites"] = {}
        for site in sites:
            site_runs = [m["sites"][site] for m in per_run if site in m.get("sites", {})]
            keys = _ordered(k for m in site_runs for k in m)
            entry["sites"][site] = {k: spread(m.get(k) for m in site_runs) for k in keys}
    return entry


def summarize(runs: Mapping[Any, Mapping]) -> dict:
    """Aggregate one variant's runs ``{seed: {"methods": ..., "correlation": ...}}`` over seeds.

    Returns ``{"methods": {method: {metric: spread, "sites": {site: {metric: spread}}}},
    "correlation": {signal: {"pearson": spread, "spearman": spread, "n": spread}}}``; a method,
    site or signal is included when at least one run has it.
    """
    methods: dict[str, dict] = {}
    for method in _ordered(m for r in runs.values() for m in r.get("methods", {})):
        methods[method] = _summarize_method([r["methods"][method] for r in runs.values()
                                             if method in r.get("methods", {})])
    correlation: dict[str, dict] = {}
    for signal in _ordered(s for r in runs.values() for s in (r.get("correlation") or {})):
        per_run = [r["correlation"][signal] for r in runs.values() if signal in (r.get("correlation") or {})]
        correlation[signal] = {k: spread(c.get(k) for c in per_run) for k in ("pearson", "spearman", "n")}
    return {"methods": methods, "correlation": correlation}


def paired_deltas(runs: Mapping[Any, Mapping], reference: Mapping[Any, Mapping], reference_method: str = "nms",
                  metrics: Sequence[str] = ("AP", "AP50", "AP75", "AP90")) -> dict:
    """Per-seed differences ``runs[seed][method][k] - reference[seed][reference_method][k]``, aggregated.

    Only seeds present in both (and metrics defined in both) count. Returns
    ``{method: {metric: spread}}``; empty when the reference lacks ``reference_method``.
    """
    out: dict[str, dict] = {}
    seeds = [s for s in runs if s in reference and reference_method in reference[s].get("methods", {})]
    if not seeds:
        return out
    for method in _ordered(m for s in seeds for m in runs[s].get("methods", {})):
        entry = {}
        for k in metrics:
            diffs = []
            for s in seeds:
                value = runs[s]["methods"].get(method, {}).get(k)
                ref = reference[s]["methods"][reference_method].get(k)
                if _defined(value) and _defined(ref):
                    diffs.append(value - ref)
            entry[k] = spread(diffs) if diffs else None
        out[method] = entry
    return out


def _pearson(variants: Mapping[str, Mapping], name: str, signal: str) -> dict | None:
    return (variants.get(name, {}).get("summary", {}).get("correlation", {}).get(signal) or {}).get("pearson")


def _target_dir_pearson(variants: Mapping[str, Mapping]) -> dict:
    """Target 1: DIR's predicted IoU correlates with the true IoU at Pearson >= 0.75."""
    p = _pearson(variants, "dir", "quality")
    return {
        "target": "DIR predicted IoU: Pearson with the true IoU >= 0.75",
        "value": p,
        "verdict": "not run" if p is None else ("met" if p["mean"] >= 0.75 else "missed"),
        "detail": "" if p is None else f"mean over {p['n']} seed(s)",
    }


def _target_ordering(variants: Mapping[str, Mapping]) -> dict:
    """Target 2: ordering score < foresight < hindsight <= DIR (Pearson means; spreads shown)."""
    chain = [("classification score (baseline)", _pearson(variants, BASELINE, "score")),
             ("foresight IoU (dir_foresight)", _pearson(variants, "dir_foresight", "quality")),
             ("hindsight IoU (iou_direct)", _pearson(variants, "iou_direct", "quality")),
             ("hindsight P&I (dir)", _pearson(variants, "dir", "quality"))]
    if any(v is None for _, v in chain):
        verdict, detail = "not run", "needs baseline, dir_foresight, iou_direct and dir"
    else:
        means = [v["mean"] for _, v in chain]
        holds = means[0] < means[1] < means[2] <= means[3]
        # A step is "resolved" when the two means differ by more than the larger of their stds.
        unresolved = []
        for (na, a), (nb, b) in zip(chain, chain[1:]):
            noise = max(a["std"] or 0.0, b["std"] or 0.0)
            if abs(b["mean"] - a["mean"]) <= noise:
                unresolved.append(f"{na} vs {nb}")
        verdict = "reproduced" if holds else "refuted"
        detail = ("within seed noise: " + ", ".join(unresolved)) if unresolved else ""
    return {
        "target": "Pearson ordering: classification score < foresight < hindsight <= DIR",
        "value": {name: v for name, v in chain},
        "verdict": verdict,
        "detail": detail,
    }


def _targets_dir_deltas(variants: Mapping[str, Mapping]) -> list[dict]:
    """Target 3: DIR improves AP by >= 2 and AP75 by >= 3 over the same model's NMS (and vs the baseline's NMS)."""
    out = []
    for ref_key, ref_name in (("delta_own_nms", "the same model's NMS"), ("delta_baseline_nms", "the baseline's NMS")):
        target = f"DIR (quality NMS) vs {ref_name}: dAP >= 2, dAP75 >= 3"
        d = variants.get("dir", {}).get(ref_key, {}).get("quality")
        if not d or d.get("AP") is None or d.get("AP75") is None:
            out.append({"target": target, "value": None, "verdict": "not run", "detail": ""})
            continue
        ok = d["AP"]["mean"] * 100 >= 2 and d["AP75"]["mean"] * 100 >= 3
        out.append({"target": target, "value": {"AP": d["AP"], "AP75": d["AP75"]},
                    "verdict": "met" if ok else "missed", "detail": ""})
    return out


def evaluate_targets(variants: Mapping[str, Mapping]) -> list[dict]:
    """The issue's targets, each ``{"target", "value", "verdict", "detail"}``.

    ``variants[name]`` holds ``summary``, ``delta_own_nms`` and ``delta_baseline_nms`` (see
    :func:`aggregate`). A target whose variants were not run is reported as ``not run``.
    """
    return [_target_dir_pearson(variants), _target_ordering(variants), *_targets_dir_deltas(variants)]


def aggregate(records: Mapping[str, Mapping[Any, Mapping]], headlines: Mapping[str, str] | None = None,
              baseline: str = BASELINE) -> dict:
    """Aggregate every variant's runs: ``records[variant][seed] = {"methods", "correlation", ...}``.

    Per variant: ``summary`` (:func:`summarize`), ``delta_own_nms`` (each method minus the same
    run's NMS), ``delta_baseline_nms`` (each method minus the baseline's NMS of the same seed) and
    ``headline``. Plus ``targets`` (:func:`evaluate_targets`).
    """
    headlines = dict(headlines or {})
    variants: dict[str, dict] = {}
    base_runs = records.get(baseline, {})
    for name, runs in records.items():
        ok = {s: r for s, r in runs.items() if r.get("methods")}
        variants[name] = {
            "headline": headlines.get(name, "nms"),
            "summary": summarize(ok),
            "delta_own_nms": paired_deltas(ok, ok, "nms"),
            "delta_baseline_nms": paired_deltas(ok, {s: r for s, r in base_runs.items() if r.get("methods")}, "nms"),
        }
    return {"variants": variants, "targets": evaluate_targets(variants)}
