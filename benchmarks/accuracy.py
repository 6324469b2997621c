"""Accuracy benchmark: every localization-confidence method, same budget, same data, several seeds.

Trains each variant with the same backbone, image size, iterations, batch and schedule on the
training split of a setting, keeps every candidate of the val split once, scores it under every
post-processing method the candidates support (DIR Table 1 style: NMS / Soft-NMS / IoU-guided /
quality / variance voting), and aggregates over seeds.

Run (from the repository root):

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
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml
from tqdm import tqdm

try:
    from common import cpu_name  # benchmarks/common.py (the script's folder is on sys.path)
except ImportError:  # imported as a module from elsewhere (the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_name

from locconf.engine.evaluate import REQUIRED_SIGNALS
from locconf.experiment import neon_recipe
from locconf.postprocess import METHODS

log = logging.getLogger("accuracy")

ROOT = Path(__file__).resolve().parent.parent
#: Metrics shown in the Markdown tables (results.json holds every metric of evaluate_methods).
TABLE_METRICS = ("AP", "AP50", "AP75", "AP90")
SIGNALS = ("score", "quality", "combined")
#: Training keys that do not change the trained model (ignored when comparing a run's saved config).
_VOLATILE_TRAIN_KEYS = ("device", "progress", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints")


# --------------------------------------------------------------------------------------------
# Settings and variants
# --------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """The data and the budget shared by every variant of one comparison.

    ``model`` holds the keys every detector gets (backbone, FPN, image size, candidates);
    ``family_model`` / ``family_train`` the few keys that only make sense for one family
    (RPN anchors and RoI sampling of the two-stage detectors; the one-stage learning rate).
    """

    name: str
    description: str
    model: dict
    data: dict
    train: dict
    family_model: dict = field(default_factory=lambda: {"two_stage": {}, "one_stage": {}})
    family_train: dict = field(default_factory=lambda: {"two_stage": {}, "one_stage": {}})


@dataclass(frozen=True)
class Variant:
    """One detector of the comparison, as overrides of its setting's model section.

    ``reuse`` names the variant whose checkpoint this one evaluates (no training of its own);
    ``expects`` the candidate signals the detector should predict; ``headline`` the
    post-processing method its paper pairs it with.
    """

    name: str
    label: str
    family: str
    model: Mapping[str, Any]
    headline: str = "nms"
    expects: tuple[str, ...] = ()
    reuse: str | None = None


#: The variants of issue 7, in table order. ``baseline`` is the reference of every "vs baseline" delta.
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "Faster R-CNN (two-stage baseline)", "two_stage", {"arch": "rcnn"}),
    Variant("iou_net", "IoU-Net", "two_stage", {"arch": "rcnn", "quality": "iou_net"},
            headline="iou-guided", expects=("quality",)),
    Variant("iou_net_refine", "IoU-Net + refinement (same weights, 5 steps)", "two_stage",
            {"arch": "rcnn", "quality": "iou_net", "refine_steps": 5},
            headline="iou-guided", expects=("quality",), reuse="iou_net"),
    Variant("dir", "DIR (hindsight, Purity x Integrity)", "two_stage", {"arch": "rcnn", "quality": "dir"},
            headline="quality", expects=("quality",)),
    Variant("dir_foresight", "DIR foresight (proposal features)", "two_stage",
            {"arch": "rcnn", "quality": "dir_foresight"}, headline="quality", expects=("quality",)),
    Variant("iou_direct", "Hindsight IoU, direct (no P&I)", "two_stage", {"arch": "rcnn", "quality": "iou_direct"},
            headline="quality", expects=("quality",)),
    Variant("kl", "KL-Loss (variance voting)", "two_stage", {"arch": "rcnn", "quality": "kl"},
            headline="var-voting+soft", expects=("variances",)),
    # One-stage: the score is each paper's ranking score (ATSS: cls x centerness; GFL, CLQ: the joint
    # score), so NMS is their own inference; ATSS's `quality` is its centerness, CLQ's its predicted
    # IoU, and GFL has none (locconf.models.one_stage).
    Variant("atss", "ATSS (one-stage; quality = centerness)", "one_stage", {"arch": "one_stage", "head": "atss"},
            expects=("quality",)),
    Variant("gfl", "GFL (one-stage, quality focal loss; joint score, no separate quality)", "one_stage",
            {"arch": "one_stage", "head": "gfl"}),
    Variant("clq", "CLQ (one-stage, joint cls-quality score; quality = predicted IoU)", "one_stage",
            {"arch": "one_stage", "head": "clq"}, expects=("quality",)),
)}
DEFAULT_VARIANTS = tuple(VARIANTS)
#: Not in the default list: torchvision's own Faster R-CNN, a reference and the harness's smoke test.
EXTRA_VARIANTS: dict[str, Variant] = {
    "tv_frcnn": Variant("tv_frcnn", "torchvision Faster R-CNN (reference)", "two_stage", {"arch": "torchvision_frcnn"}),
}
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}
BASELINE = "baseline"


def _setting(name: str, description: str, iterations: int, batch_size: int, model: dict, data: dict,
             lr: tuple[float, float] = (0.02, 0.01),
             two_stage: dict | None = None) -> Setting:
    """A setting with the schedule and per-family keys that NEON and synthetic share.

    ``model`` holds the keys of every detector (backbone, FPN, anchors sizes, image size);
    ``two_stage`` the RPN / RoI keys that only the two-stage detectors take.
    """
    return Setting(
        name=name,
        description=description,
        model={"backbone": "resnet18", "candidates_per_image": 1000, "channels_last": True, **model},
        family_model={"two_stage": {"box_batch_size_per_image": 128, "quality_representation_size": 256,
                                      **(two_stage or {})},
                      "one_stage": {}},
        # The papers' one-stage learning rate is half the two-stage one (ATSS/GFL 0.01 vs Faster
        # R-CNN 0.02 at batch 16); from scratch, a dense head at 0.02 was unstable (shared/notes).
        family_train={"two_stage": {}, "one_stage": dict(lr=lr[1])},
        data=data,
        train=dict(iterations=int(iterations), batch_size=batch_size, lr=lr[0], warmup_iters=100, schedule="step",
                   steps=[0.7, 0.9], clip_grad_norm=10.0, checkpoint_every=250),
    )


def neon_setting(iterations: int | None = None, pretrained: bool = True) -> Setting:
    """NEON tree crowns on :func:`locconf.experiment.neon_recipe` (400 px, P2-P5 64 ch, batch 2).

    ``pretrained`` (setting ``neon``): ImageNet EfficientNet-Lite0, frozen BatchNorm and stem, lr 0.01
    (one-stage 0.005), 1500 iterations by default (benchmarks/results/recipe_pretrained.md).
    From scratch (setting ``neon-scratch``): ResNet-18, lr 0.02 (one-stage 0.01), 600 iterations by
    default, what 18 trainings (9 detectors x 2 seeds) afford on two CPU cores in about two hours.
    """
    shared, two_stage = neon_recipe(False, pretrained), neon_recipe(True, pretrained)
    name, default, init = ("neon", 1500, "ImageNet EfficientNet-Lite0") if pretrained else \
        ("neon-scratch", 600, "ResNet-18 from scratch")
    return _setting(
        name, f"NEON tree crowns (train: YELL tiles; val: held-out YELL band + OSBS + SOAP), {init}",
        default if iterations is None else iterations, 2,
        model=shared["model"],
        two_stage={k: v for k, v in two_stage["model"].items() if k not in shared["model"]},
        data=shared["data"], lr=(two_stage["train"]["lr"], shared["train"]["lr"]))


def synthetic_setting(iterations: int | None = None) -> Setting:
    """Synthetic scenes, 3 classes, 128 px (objects 8-48 px), P2-P5 64 ch, batch 4.

    Sized so that a from-scratch detector trains in a few minutes on one CPU thread.
    """
    return _setting(
        "synthetic", "synthetic scenes (3 classes, 128 px, 400 train / 100 val, exact boxes), from scratch",
        800 if iterations is None else iterations, 4,
        model=dict(fpn_channels=64, returned_layers=[1, 2, 3], anchor_sizes=[8, 16, 32, 64],
                   min_size=128, max_size=128),
        # A 256-wide box head (torchvision's is 1024): at 128 px its two fc layers on 4 x 128 RoIs
        # cost more than the backbone, and the synthetic shapes need no more.
        two_stage=dict(representation_size=256),
        data=dict(source="synthetic", root="data/synthetic128",
                  synthetic=dict(num_train=400, num_val=100, image_size=128, num_classes=3, seed=0)))


SETTINGS = {"neon": neon_setting, "neon-scratch": lambda iterations=None: neon_setting(iterations, pretrained=False),
            "synthetic": synthetic_setting}


def make_config(setting: Setting, variant: Variant, seed: int, out_dir: str | Path,
                num_classes: int | None = None) -> dict:
    """The full configuration (model/data/train/eval sections) of one variant and seed.

    The model section is the setting's shared keys, then its family's keys, then the variant's
    overrides; the train section the setting's budget, its family's keys, the seed and ``out_dir``.
    """
    if variant.family not in ("two_stage", "one_stage"):
        raise ValueError(f"variant {variant.name!r}: family must be 'two_stage' or 'one_stage', got {variant.family!r}")
    model = {**copy.deepcopy(setting.model), **copy.deepcopy(setting.family_model.get(variant.family, {})),
             **copy.deepcopy(dict(variant.model))}
    if model.get("arch") == "torchvision_frcnn":  # torchvision's box head has no quality branch
        model.pop("quality_representation_size", None)
    if num_classes is not None:
        model["num_classes"] = int(num_classes)
    train = {**copy.deepcopy(setting.train), **copy.deepcopy(setting.family_train.get(variant.family, {})),
             "seed": int(seed), "out_dir": str(out_dir)}
    return {"model": model, "data": copy.deepcopy(setting.data), "train": train, "eval": {}}


def select_methods(signals: Iterable[str], methods: Sequence[str] = METHODS) -> list[str]:
    """The post-processing methods whose required candidate field (REQUIRED_SIGNALS) is among ``signals``."""
    have = set(signals)
    return [m for m in methods if REQUIRED_SIGNALS[m] is None or REQUIRED_SIGNALS[m] in have]


def candidate_signals(output: Mapping[str, Any]) -> list[str]:
    """Which localization signals (``quality``, ``variances``) one image's candidates carry."""
    return [k for k in ("quality", "variances") if isinstance(output.get(k), torch.Tensor)]


# --------------------------------------------------------------------------------------------
# Aggregation over seeds
# --------------------------------------------------------------------------------------------


def _defined(value: Any) -> bool:
    """A usable metric value: a finite number that is not COCO's -1 ("undefined")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != -1


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


def summarize(runs: Mapping[Any, Mapping]) -> dict:
    """Aggregate one variant's runs ``{seed: {"methods": ..., "correlation": ...}}`` over seeds.

    Returns ``{"methods": {method: {metric: spread, "sites": {site: {metric: spread}}}},
    "correlation": {signal: {"pearson": spread, "spearman": spread, "n": spread}}}``; a method,
    site or signal is included when at least one run has it.
    """
    methods: dict[str, dict] = {}
    method_names = _ordered(m for r in runs.values() for m in r.get("methods", {}))
    for method in method_names:
        per_run = [r["methods"][method] for r in runs.values() if method in r.get("methods", {})]
        metrics = _ordered(k for m in per_run for k in m if k != "sites")
        entry: dict[str, Any] = {k: spread(m.get(k) for m in per_run) for k in metrics}
        sites = _ordered(s for m in per_run for s in m.get("sites", {}))
        if sites:
            entry["sites"] = {}
            for site in sites:
                site_runs = [m["sites"][site] for m in per_run if site in m.get("sites", {})]
                keys = _ordered(k for m in site_runs for k in m)
                entry["sites"][site] = {k: spread(m.get(k) for m in site_runs) for k in keys}
        methods[method] = entry
    correlation: dict[str, dict] = {}
    for signal in _ordered(s for r in runs.values() for s in (r.get("correlation") or {})):
        per_run = [r["correlation"][signal] for r in runs.values() if signal in (r.get("correlation") or {})]
        correlation[signal] = {k: spread(c.get(k) for c in per_run) for k in ("pearson", "spearman", "n")}
    return {"methods": methods, "correlation": correlation}


def _ordered(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


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


def _mean(stat: Mapping | None) -> float | None:
    return None if stat is None else stat["mean"]


def evaluate_targets(variants: Mapping[str, Mapping]) -> list[dict]:
    """The issue's targets, each ``{"target", "value", "verdict", "detail"}``.

    ``variants[name]`` holds ``summary``, ``delta_own_nms`` and ``delta_baseline_nms`` (see
    :func:`aggregate`). A target whose variants were not run is reported as ``not run``.
    """
    out: list[dict] = []

    def pearson(name: str, signal: str) -> dict | None:
        return (variants.get(name, {}).get("summary", {}).get("correlation", {}).get(signal) or {}).get("pearson")

    # 1. DIR's predicted IoU correlates with the true IoU at Pearson >= 0.75.
    p = pearson("dir", "quality")
    out.append({
        "target": "DIR predicted IoU: Pearson with the true IoU >= 0.75",
        "value": p,
        "verdict": "not run" if p is None else ("met" if p["mean"] >= 0.75 else "missed"),
        "detail": "" if p is None else f"mean over {p['n']} seed(s)",
    })

    # 2. Ordering score < foresight < hindsight <= DIR (Pearson means; spreads shown).
    chain = [("classification score (baseline)", pearson(BASELINE, "score")),
             ("foresight IoU (dir_foresight)", pearson("dir_foresight", "quality")),
             ("hindsight IoU (iou_direct)", pearson("iou_direct", "quality")),
             ("hindsight P&I (dir)", pearson("dir", "quality"))]
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
    out.append({
        "target": "Pearson ordering: classification score < foresight < hindsight <= DIR",
        "value": {name: v for name, v in chain},
        "verdict": verdict,
        "detail": detail,
    })

    # 3. DIR improves AP by >= 2 and AP75 by >= 3 over the same model's NMS (and vs the baseline's NMS).
    for ref_key, ref_name in (("delta_own_nms", "the same model's NMS"), ("delta_baseline_nms", "the baseline's NMS")):
        d = variants.get("dir", {}).get(ref_key, {}).get("quality")
        if not d or d.get("AP") is None or d.get("AP75") is None:
            out.append({"target": f"DIR (quality NMS) vs {ref_name}: dAP >= 2, dAP75 >= 3", "value": None,
                        "verdict": "not run", "detail": ""})
            continue
        ok = d["AP"]["mean"] * 100 >= 2 and d["AP75"]["mean"] * 100 >= 3
        out.append({"target": f"DIR (quality NMS) vs {ref_name}: dAP >= 2, dAP75 >= 3",
                    "value": {"AP": d["AP"], "AP75": d["AP75"]}, "verdict": "met" if ok else "missed", "detail": ""})
    return out


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


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def fmt(stat: Mapping | None, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± std`` (``mean`` alone for one seed, ``-`` for undefined), scaled."""
    if not stat:
        return "-"
    sign = "+" if signed else ""
    text = f"{stat['mean'] * scale:{sign}.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def format_summary(results: Mapping) -> str:
    """One row per variant: its paper's post-processing, the metrics, the paired deltas and the
    Pearson correlations (the compact table the README quotes)."""
    agg = results["aggregate"]["variants"]
    lines = ["| variant | method | AP | AP50 | AP75 | AP90 | dAP / dAP75 (own NMS) | dAP / dAP75 (baseline NMS) | "
             "Pearson score | Pearson quality |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
        lines.append(f"| {name} | {method} | " + " | ".join(fmt(m.get(k)) for k in TABLE_METRICS)
                     + f" | {own_text} | {base_text} | {pearson[0]} | {pearson[1]} |")
    return "\n".join(lines) + "\n"


def format_report(results: Mapping) -> str:
    """The Markdown report of :func:`run_benchmark`'s results dict."""
    agg = results["aggregate"]
    meta = results["meta"]
    lines = [f"# Accuracy benchmark: {meta['setting']}", ""]
    lines += [
        f"- Data: {meta['description']}; train {meta['data']['train_images']} images / {meta['data']['train_boxes']} "
        f"boxes, val {meta['data']['val_images']} images / {meta['data']['val_boxes']} boxes.",
        f"- Budget (every variant): {meta['budget']}.",
        f"- Hardware: {meta['hardware']['device']}; {meta['hardware']['cpu']}, {meta['hardware']['threads']} torch "
        f"threads; torch {meta['hardware']['torch']}, torchvision {meta['hardware']['torchvision']}, "
        f"Python {meta['hardware']['python']}.",
        f"- Seeds: {', '.join(str(s) for s in meta['seeds'])}. Cells are mean ± sample std over seeds "
        "(n - 1; a single seed shows the value alone); results.json has min, max and every seed.",
        f"- Wall time: {meta['wall_time_runs_s'] / 3600:.2f} h ({meta['wall_time_runs_s'] / 60:.0f} min) of "
        "training + evaluation summed over all runs "
        f"(this invocation: {meta['wall_time_invocation_s'] / 60:.1f} min).",
        f"- Command: `{meta['command']}`",
        "",
        "Metrics x 100 on the val split. d(own NMS): the method minus NMS on the *same* model's candidates; "
        "d(baseline NMS): the method minus the two-stage baseline with NMS, paired by seed. "
        "**bold** = the method the variant's paper uses.",
        "",
    ]
    variants = results["variants"]
    if meta.get("summary_plot"):
        lines += [f"![summary]({meta['summary_plot']})", ""]
    lines += ["## Summary: each variant under its paper's post-processing", "", format_summary(results)]

    lines += ["## Variants", "", "| variant | detector | paper's post-processing | signals expected |",
              "|---|---|---|---|"]
    for name, info in variants.items():
        reuse = f" (evaluates {info['reuses']}'s checkpoints)" if info.get("reuses") else ""
        lines.append(f"| {name} | {info.get('label', name)}{reuse} | {info.get('headline', 'nms')} | "
                     f"{', '.join(info.get('expects') or []) or 'none'} |")
    lines += ["", "## Overall", ""]
    lines.append("| variant | method | " + " | ".join(TABLE_METRICS)
                 + " | dAP (own NMS) | dAP75 (own NMS) | dAP (baseline NMS) | dAP75 (baseline NMS) |")
    lines.append("|---|---|" + "---:|" * (len(TABLE_METRICS) + 4))
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

    site_rows = []
    for name, a in agg["variants"].items():
        for method, m in a["summary"]["methods"].items():
            for site, sm in (m.get("sites") or {}).items():
                label = f"**{method}**" if method == a["headline"] else method
                site_rows.append(f"| {name} | {label} | {site} | " + " | ".join(fmt(sm.get(k)) for k in TABLE_METRICS)
                                 + " |")
    if site_rows:
        lines += ["## Per site", "", "| variant | method | site | " + " | ".join(TABLE_METRICS) + " |",
                  "|---|---|---|" + "---:|" * len(TABLE_METRICS)] + site_rows + [""]

    lines += ["## Correlation of each confidence signal with the true IoU (DIR Figure 4)", "",
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

    lines += ["## Targets (issue 7)", "", "| target | value | verdict |", "|---|---|---|"]
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

    lines += ["## Runs", "", "| variant | seed | status | train (min) | s/iter | eval (s) | signals | scatter plot |",
              "|---|---:|---|---:|---:|---:|---|---|"]
    for name, info in variants.items():
        for seed, run in info["runs"].items():
            train_min = f"{run['train_s'] / 60:.1f}" if run.get("train_s") is not None else "-"
            s_iter = f"{run['s_per_iter']:.2f}" if run.get("s_per_iter") is not None else "-"
            eval_s = f"{run['eval_s']:.0f}" if run.get("eval_s") is not None else "-"
            plot = f"[png]({run['plot']})" if run.get("plot") else ""
            status = run.get("status", "")
            if run.get("error"):
                status = f"failed: {_short(run['error'])}"
            lines.append(f"| {name} | {seed} | {status} | {train_min} | {s_iter} | {eval_s} | "
                         f"{', '.join(run.get('signals') or []) or 'none'} | {plot} |")
    places = sorted({r["train_hardware"] for info in variants.values() for r in info["runs"].values()
                     if r.get("train_hardware")})
    if len(places) > 1:
        lines += ["", "The runs were trained on different hardware, so their times do not compare: "
                  + "; ".join(places) + "."]
    warnings = [w for info in variants.values() for w in info.get("warnings", [])]
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


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

    def bar(stat: Mapping | None, scale: float = 100.0) -> tuple[float, float, float]:
        """(mean, mean - min, max - mean), scaled; NaN (no bar) when undefined."""
        if not stat:
            return math.nan, 0.0, 0.0
        return scale * stat["mean"], scale * (stat["mean"] - stat["min"]), scale * (stat["max"] - stat["mean"])

    fig, axes = plt.subplots(1, 4, figsize=(4.2 * 4, 0.42 * len(names) + 1.8), sharey=True)
    y = list(range(len(names)))
    for ax, metric in zip(axes[:3], ("AP", "AP75", "AP90")):
        for offset, headline, color, label in ((-0.2, False, "0.6", "NMS"),
                                               (0.2, True, "tab:blue", "paper's post-processing")):
            vals = [bar(agg[n]["summary"]["methods"].get(agg[n]["headline"] if headline else "nms", {}).get(metric))
                    for n in names]
            ax.barh([v + offset for v in y], [v[0] for v in vals], height=0.38, color=color,
                    xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=2, label=label)
        ax.set_title(f"{metric} (x 100)")
        ax.grid(axis="x", alpha=0.3)
    ax = axes[3]
    for offset, signal, color in ((-0.2, "score", "0.6"), (0.2, "quality", "tab:orange")):
        vals = [bar((agg[n]["summary"]["correlation"].get(signal) or {}).get("pearson"), scale=1.0) for n in names]
        ax.barh([v + offset for v in y], [v[0] for v in vals], height=0.38, color=color,
                xerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=2, label=signal)
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


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _normalise(cfg: Mapping) -> dict:
    """A configuration as YAML would give it back, without the keys that do not change the model."""
    cfg = yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(dict(cfg), default=str)), sort_keys=True))
    cfg.setdefault("train", {})
    for key in _VOLATILE_TRAIN_KEYS:
        cfg["train"].pop(key, None)
    return cfg


def _check_saved_config(run_dir: Path, cfg: Mapping) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = _normalise(yaml.safe_load(saved.read_text()) or {})
    new = _normalise(cfg)
    if old != new:
        diff = sorted(f"{sec}.{k}" for sec in set(old) | set(new)
                      for k in set(old.get(sec, {})) | set(new.get(sec, {}))
                      if old.get(sec, {}).get(k) != new.get(sec, {}).get(k))
        raise ValueError(f"{run_dir} holds a run of a different configuration (differs in {', '.join(diff)}); "
                         "delete it or pass another --runs folder")


def seconds_per_iteration(metrics_file: Path) -> float | None:
    """Median of the ``time`` (seconds of one iteration) of the training records of a metrics.jsonl."""
    if not metrics_file.is_file():
        return None
    times = []
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "train" and isinstance(rec.get("time"), (int, float)):
            times.append(float(rec["time"]))
    return statistics.median(times) if times else None


def train_once(cfg: dict, progress: bool = False) -> dict:
    """Train unless the final checkpoint exists (a partial run is resumed); returns a timing record."""
    from locconf.engine.checkpoint import checkpoint_path
    from locconf.experiment import run_train

    run_dir = Path(cfg["train"]["out_dir"])
    final = checkpoint_path(run_dir, int(cfg["train"]["iterations"]))
    timing_file = run_dir / "timing.json"
    _check_saved_config(run_dir, cfg)
    if final.is_file():
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        return {"checkpoint": str(final), "status": "reused", "train_s": timing.get("train_s"),
                "s_per_iter": seconds_per_iteration(run_dir / "metrics.jsonl"), "hardware": timing.get("hardware")}
    cfg = copy.deepcopy(cfg)
    cfg["train"].setdefault("progress", progress)
    t0 = time.perf_counter()
    summary = run_train(cfg, resume=True)
    elapsed = time.perf_counter() - t0
    previous = json.loads(timing_file.read_text()).get("train_s", 0.0) if timing_file.is_file() else 0.0
    resumed = int(summary.get("start_step", 0)) > 0
    timing = {"train_s": elapsed + (previous if resumed else 0.0), "resumed_from_step": summary.get("start_step", 0),
              "hardware": _run_hardware(cfg["train"].get("device"))}
    timing_file.write_text(json.dumps(timing, indent=1))
    if not final.is_file():
        raise RuntimeError(f"training finished without writing {final}")
    return {"checkpoint": str(final), "status": "resumed" if resumed else "trained", "train_s": timing["train_s"],
            "s_per_iter": seconds_per_iteration(run_dir / "metrics.jsonl"), "hardware": timing["hardware"]}


def evaluate_once(checkpoint: str | Path, cfg: dict, eval_dir: Path, device: str | None = None,
                  progress: bool = False) -> dict:
    """Evaluate a checkpoint under every method its candidates support, unless already done."""
    from locconf.experiment import build_datasets, load_trained, run_eval

    results_file, record_file = eval_dir / "results.json", eval_dir / "record.json"
    if results_file.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        results = json.loads(results_file.read_text())
        return {**record, "methods": results["methods"], "correlation": results.get("correlation", {}),
                "eval_status": "reused"}
    t0 = time.perf_counter()
    model, cfg = load_trained(checkpoint, cfg=cfg, device=device)
    _, val_ds, _ = build_datasets(**cfg["data"])
    image, _ = val_ds[0]
    with torch.no_grad():
        probe = model([image.to(next(model.parameters()).device)])[0]
    signals = candidate_signals(probe)
    methods = select_methods(signals)
    out = run_eval(model, cfg, eval_dir, methods=methods, device=device, progress=progress)
    record = {"signals": signals, "methods_evaluated": methods, "eval_s": time.perf_counter() - t0,
              "checkpoint": str(checkpoint)}
    record_file.write_text(json.dumps(record, indent=1))
    return {**record, "methods": out["results"], "correlation": out["correlation"], "eval_status": "evaluated"}


def _run_hardware(device: str | None) -> str:
    """One line naming where a run trained (kept with its timing: reruns may happen elsewhere)."""
    hw = hardware(device)
    return f"{hw['device']}, {hw['cpu']}, {hw['threads']} threads"


def hardware(device: str | None) -> dict:
    import torchvision

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = f"CUDA ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "CPU"
    return {"device": name, "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


def _budget_text(setting: Setting) -> str:
    t, m = setting.train, setting.model
    text = (f"{t['iterations']} iterations x batch {t['batch_size']}, SGD lr {t['lr']} (one-stage "
            f"{setting.family_train.get('one_stage', {}).get('lr', t['lr'])}), warm-up {t.get('warmup_iters', 0)}, "
            f"{t.get('schedule', 'step')} decay at {t.get('steps', [0.7, 0.9])}; {m['backbone']}-FPN {m['fpn_channels']} ch "
            f"(stages {m['returned_layers']}), images {m['min_size']}-{m['max_size']} px, "
            f"{m['candidates_per_image']} candidates/image, from scratch")
    return text


def run_benchmark(setting: Setting, variants: Sequence[Variant], seeds: Sequence[int], out: str | Path,
                  runs_dir: str | Path, device: str | None = None, inner_progress: bool = False,
                  progress: bool = True, command: str = "") -> dict:
    """Train and evaluate every (variant, seed), aggregate, and write results.json, table.md and plots.

    Returns the results dict (also written to ``out/results.json``).
    """
    from locconf.experiment import build_datasets

    t_start = time.perf_counter()
    out, runs_dir = Path(out), Path(runs_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    by_name = {v.name: v for v in variants}
    for v in variants:
        if v.reuse is not None and v.reuse not in ALL_VARIANTS:
            raise ValueError(f"variant {v.name!r} reuses unknown variant {v.reuse!r}")
    train_ds, val_ds, _ = build_datasets(**setting.data)
    num_classes = train_ds.num_classes
    iterations = int(setting.train["iterations"])

    def run_dir(name: str, seed: int) -> Path:
        return runs_dir / name / f"it{iterations}_seed{seed}"

    results_variants: dict[str, dict] = {
        v.name: {"label": v.label, "family": v.family, "headline": v.headline, "expects": list(v.expects),
                 "reuses": v.reuse, "model": dict(v.model), "runs": {}, "warnings": [], "errors": []}
        for v in variants
    }
    records: dict[str, dict] = {v.name: {} for v in variants}
    jobs = [(v, s) for v in variants for s in seeds]
    bar = tqdm(jobs, desc=f"accuracy/{setting.name}", unit="run", disable=not progress, dynamic_ncols=True)
    for variant, seed in bar:
        bar.set_postfix_str(f"{variant.name} seed {seed}")
        info = results_variants[variant.name]
        run: dict[str, Any] = {}
        try:
            trained = ALL_VARIANTS[variant.reuse] if variant.reuse else variant
            train_cfg = make_config(setting, trained, seed, run_dir(trained.name, seed), num_classes)
            timing = train_once(train_cfg, progress=inner_progress)
            eval_cfg = make_config(setting, variant, seed, run_dir(trained.name, seed), num_classes)
            eval_dir = run_dir(variant.name, seed) / "eval"
            ev = evaluate_once(timing["checkpoint"], eval_cfg, eval_dir, device=device, progress=inner_progress)
            run = {
                "run_dir": str(run_dir(trained.name, seed)), "eval_dir": str(eval_dir),
                "status": (f"reuses {variant.reuse}" if variant.reuse else timing["status"])
                + ("" if ev["eval_status"] == "evaluated" else ", eval reused"),
                "train_s": None if variant.reuse else timing.get("train_s"),
                "s_per_iter": None if variant.reuse else timing.get("s_per_iter"),
                "train_hardware": timing.get("hardware"),
                "eval_s": ev.get("eval_s"), "signals": ev.get("signals"),
                "methods": ev["methods"], "correlation": ev["correlation"],
            }
            missing = sorted(set(variant.expects) - set(ev.get("signals") or []))
            if missing:
                info["warnings"].append(f"{variant.name} seed {seed}: candidates lack {missing}, which this "
                                        "variant should predict; only the methods its candidates support were scored")
            plot = eval_dir / "confidence.png"
            if plot.is_file():
                target = out / "plots" / f"{variant.name}_seed{seed}_confidence.png"
                shutil.copyfile(plot, target)
                run["plot"] = str(target.relative_to(out))
            records[variant.name][seed] = run
        except Exception as e:  # record and go on: one missing detector must not sink the others
            log.exception("%s seed %d failed", variant.name, seed)
            run = {"error": f"{type(e).__name__}: {e}", "status": "failed"}
            info["errors"].append(run["error"])
        info["runs"][seed] = run

    headlines = {name: v.headline for name, v in by_name.items()}
    agg = aggregate(records, headlines=headlines, baseline=BASELINE)
    wall_runs = sum((r.get("train_s") or 0.0) + (r.get("eval_s") or 0.0)
                    for info in results_variants.values() for r in info["runs"].values())
    results = {
        "meta": {
            "setting": setting.name, "description": setting.description, "seeds": list(seeds),
            "budget": _budget_text(setting),
            "config": {"model": setting.model, "family_model": setting.family_model,
                       "family_train": setting.family_train, "data": setting.data, "train": setting.train},
            "data": {"train_images": len(train_ds), "train_boxes": train_ds.num_boxes(),
                     "val_images": len(val_ds), "val_boxes": val_ds.num_boxes(), "num_classes": num_classes},
            "hardware": hardware(device),
            "spread": "mean and sample standard deviation over seeds (n - 1); min, max and values also given; "
                      "deltas paired by seed",
            "wall_time_runs_s": wall_runs,
            "wall_time_invocation_s": time.perf_counter() - t_start,
            "command": command,
            "metrics_scale": "fractions in [0, 1] (tables show x 100)",
        },
        "variants": results_variants,
        "aggregate": agg,
    }
    summary_plot = plot_summary(results, out / "plots" / "summary.png")
    if summary_plot is not None:
        results["meta"]["summary_plot"] = str(summary_plot.relative_to(out))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "table.md").write_text(format_report(results))
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="training iterations of every variant (default: the setting's: neon 1500, "
                         "neon-scratch 600, synthetic 800)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(ALL_VARIANTS),
                    metavar="VARIANT", help=f"default: all of {', '.join(DEFAULT_VARIANTS)}; "
                    f"extra: {', '.join(EXTRA_VARIANTS)}")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/accuracy_<setting>)")
    ap.add_argument("--runs", default=None, help="training runs folder (default: runs/accuracy_<setting>)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--inner-progress", action="store_true", help="also show the training/evaluation bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("--iterations must be >= 1")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise SystemExit("--seeds must be distinct non-negative ints")
    setting = SETTINGS[args.setting](args.iterations)
    names = list(dict.fromkeys(args.variants))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"accuracy_{args.setting}")
    runs = Path(args.runs or ROOT / "runs" / f"accuracy_{args.setting}")
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_benchmark(setting, [ALL_VARIANTS[n] for n in names], args.seeds, out, runs, device=args.device,
                            inner_progress=args.inner_progress, command=command)
    print((out / "table.md").read_text())
    failed = [f"{n} seed {s}: {r['error']}" for n, info in results["variants"].items()
              for s, r in info["runs"].items() if r.get("error")]
    if failed:
        print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
