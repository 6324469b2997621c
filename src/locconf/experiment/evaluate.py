"""Evaluating a trained detector (``locconf eval``): candidates once, every method scored, files written.

:func:`run_eval` collects the val candidates, scores them under each post-processing method, and
writes ``results.json``, ``table.md``, the plots and, on request, one HTML report; the steps below
it each do one of these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .build import build_datasets, device_of
from .keywords import call

#: What ``run_eval`` scores when neither its ``methods`` nor ``eval.methods`` name any.
DEFAULT_METHODS = ("nms", "soft-linear", "soft-gaussian")

_CALIBRATION_NOTE = ("ECE: mean |predicted - true IoU| over equal-width bins, on candidates matched to a ground "
                     "truth with IoU > 0.5; calibrated: isotonic map fitted on the other half of the images "
                     "(2-fold). Calibration changes what the values mean, not how well they rank boxes (the "
                     "correlation below).")


def run_eval(model: nn.Module, cfg: dict[str, dict], out_dir: str | os.PathLike,
             methods: Sequence[str] | None = None, device: str | None = None, progress: bool = True,
             html: str | os.PathLike | None = None, gallery: int = 8) -> dict:
    """Candidates once, every method scored; writes results.json, table.md and the plots.

    ``results.json`` holds ``methods`` (metrics per method, overall and per site), ``correlation``
    (Pearson / Spearman of each confidence signal with the true IoU), ``correlation_sites``
    (the same per site, where the images record one) and ``calibration``: the expected calibration
    error of each signal read as a predicted IoU, as predicted and after out-of-fold isotonic
    calibration, and the metrics of the quality-ranked methods on calibrated quality
    (:func:`locconf.evaluation.calibration.evaluate_calibration`). ``reliability.png`` draws the reliability
    diagrams; ``calibration.json`` is the quality's map fitted on every image (where the detector
    predicts a quality). With ``html``, one self-contained page (:mod:`locconf.evaluation.report`) with a
    gallery of the first ``gallery`` images' detections.
    """
    from ..data import collate_fn
    from ..evaluation import collect_candidates, confidence_correlation, evaluate_calibration, plot_confidence
    from ..postprocess import REQUIRED_SIGNALS

    eval_cfg, methods = _eval_settings(cfg["eval"], methods, gallery)
    method_params = eval_cfg.get("method_params") or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, val_ds, val_json = call(build_datasets, "data", cfg["data"])
    loader = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_fn)
    candidates = collect_candidates(model, loader, device_of(device), progress=progress)
    results = _score(candidates, methods, eval_cfg, val_ds, val_json, progress)
    correlation = confidence_correlation(candidates, val_ds)
    targets = [val_ds.target(i) for i in range(len(val_ds))]
    correlation_sites = _correlation_per_site(candidates, targets)
    plot_confidence(candidates, val_ds, out_dir / "confidence.png")
    cal = evaluate_calibration(candidates, targets)
    calibration = {"ece": cal["ece"], "diagrams": cal["diagrams"]}
    quality_methods = [m for m in results if REQUIRED_SIGNALS.get(m) == "quality"]
    if cal["quality_calibrated"] and quality_methods:
        calibration["methods"] = _with_calibrated_quality(cal["quality_calibrated"], results, quality_methods,
                                                          eval_cfg, val_ds, val_json, progress)
    _save_calibration(cal, out_dir)
    first = methods[0] if methods[0] in results else next(iter(results))
    _draw_first_image(val_ds, candidates[0], first, method_params.get(first, {}), out_dir / "detections.png")
    table = _write_results(out_dir, results, correlation, correlation_sites, calibration)
    report = {"results": results, "correlation": correlation, "correlation_sites": correlation_sites,
              "calibration": calibration, "calibrator": cal["calibration"], "table": table, "out_dir": str(out_dir)}
    if html is not None:
        own = getattr(model, "default_method", None)  # the head's own method (DIR: quality), else a quality one
        shown = own if own in results else next((m for m in quality_methods), first)
        meta = (f"{len(val_ds)} images of {val_json}; model {cfg['model'].get('arch', 'rcnn')} "
                f"{cfg['model'].get('quality') or cfg['model'].get('head') or ''}; gallery: {shown}")
        report["html"] = str(_write_html(html, report, _report_figures(out_dir),
                                         _gallery(val_ds, candidates, shown, method_params.get(shown, {}), gallery),
                                         meta))
    return report


def _eval_settings(section: dict, methods: Sequence[str] | None, gallery: int) -> tuple[dict, list[str]]:
    """``(eval section without methods, methods)``: ``methods``, else ``eval.methods``, else the defaults."""
    eval_cfg = dict(section)
    methods = list(methods or eval_cfg.pop("methods", list(DEFAULT_METHODS)))
    eval_cfg.pop("methods", None)
    if isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 0:
        raise ValueError(f"gallery must be a non-negative int, got {gallery!r}")
    return eval_cfg, methods


def _score(candidates: list[dict], methods: list[str], eval_cfg: dict, val_ds, val_json: Path,
           progress: bool) -> dict:
    """COCO metrics of each method on ``candidates`` (:func:`locconf.evaluation.evaluate_methods`)."""
    from ..evaluation import evaluate_methods

    return call(evaluate_methods, "eval", dict(eval_cfg, progress=progress), candidates, str(val_json), methods,
                val_ds.label_to_cat_id)


def _correlation_per_site(candidates: list[dict], targets: list[dict]) -> dict[str, dict]:
    """The correlation of each confidence signal with the true IoU, per site (images that record one)."""
    from ..evaluation import confidence_correlation

    sites = sorted({t["site"] for t in targets if "site" in t})
    return {
        site: confidence_correlation([c for c, t in zip(candidates, targets) if t.get("site") == site],
                                     [t for t in targets if t.get("site") == site])
        for site in sites
    }


def _with_calibrated_quality(calibrated_candidates: list[dict], results: dict, quality_methods: list[str],
                             eval_cfg: dict, val_ds, val_json: Path, progress: bool) -> dict:
    """The metrics of each quality-ranked method, on predicted and (next to it) on calibrated quality."""
    params = {m: p for m, p in (eval_cfg.get("method_params") or {}).items() if m in quality_methods}
    calibrated = _score(calibrated_candidates, quality_methods, dict(eval_cfg, method_params=params), val_ds,
                        val_json, progress)
    out = {}
    for m in quality_methods:
        out[m] = results[m]
        out[f"{m} (calibrated quality)"] = calibrated[m]
    return out


def _save_calibration(cal: dict, out_dir: Path) -> None:
    """``reliability.png`` (where there are diagrams) and ``calibration.json`` (where a map was fitted)."""
    from ..evaluation import plot_reliability

    if cal["diagrams"]:
        plot_reliability(cal["diagrams"], out_dir / "reliability.png",
                         title="confidence read as a predicted IoU (matched boxes, IoU > 0.5)")
    if cal["calibration"] is not None:
        cal["calibration"].save(out_dir / "calibration.json")


def _draw_first_image(val_ds, candidates: dict, method: str, params: dict, path: Path) -> None:
    """Draw the first val image's detections under ``method`` with its ground truth."""
    from ..evaluation import draw_detections
    from ..postprocess import postprocess

    image, target = val_ds[0]
    dets = postprocess(candidates, method, **params)
    draw_detections(image, dets, path, gt=target, class_names=val_ds.class_names)


def _write_results(out_dir: Path, results: dict, correlation: dict, correlation_sites: dict,
                   calibration: dict) -> str:
    """Write ``results.json`` and ``table.md``; return the table (with the calibrated-quality one, if any)."""
    from ..evaluation import format_table

    table = format_table(results, per_site=True)
    if calibration.get("methods"):
        table += "\n\n" + format_table(calibration["methods"])
    (out_dir / "results.json").write_text(json.dumps(
        {"methods": results, "correlation": correlation, "correlation_sites": correlation_sites,
         "calibration": calibration}, indent=1))
    (out_dir / "table.md").write_text(table + "\n")
    return table


def _write_html(path: str | os.PathLike, report: dict, figures: dict[str, Path], gallery: list[dict],
                meta: str) -> Path:
    """The self-contained HTML page of a :func:`run_eval` report (:func:`locconf.evaluation.report.write_report`)."""
    from ..evaluation.report import write_report

    calibration = report["calibration"]
    return write_report(
        path, "locconf evaluation", report["results"], correlation=report["correlation"],
        correlation_sites=report["correlation_sites"],
        calibration={"ece": calibration["ece"], "methods": calibration.get("methods"), "note": _CALIBRATION_NOTE},
        figures=figures, gallery=gallery, meta=meta)


def _report_figures(out_dir: Path) -> dict[str, Path]:
    """The plots of :func:`run_eval` that exist, with their captions."""
    captions = {"confidence.png": "Each confidence signal against the true IoU of the matched candidates",
                "reliability.png": "Reliability diagrams: mean true IoU per bin of the signal (diagonal: calibrated)"}
    return {c: out_dir / f for f, c in captions.items() if (out_dir / f).is_file()}


def _gallery(val_ds, candidates: list[dict], method: str, params: dict, count: int) -> list[dict]:
    """PNG thumbnails of ``count`` images' detections, coloured by predicted quality, sampled across sites
    (:func:`locconf.evaluation.report.gallery_indices`), at most 25 boxes each (:func:`~locconf.evaluation.report.gallery_item`)."""
    from ..evaluation.report import gallery_indices, gallery_item
    from ..postprocess import postprocess

    sites = [val_ds.target(i).get("site") for i in range(len(val_ds))]
    items = []
    for i in gallery_indices(sites, count):
        image, target = val_ds[i]
        dets = postprocess(candidates[i], method, **params)
        title = f"image {target.get('image_id')}" + (f" ({target['site']})" if "site" in target else "")
        items.append(gallery_item(image, dets, gt=target, title=title))
    return items
