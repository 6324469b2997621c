"""Evaluating a trained detector (``locconf eval``): candidates once, every method scored, files written.

:func:`run_eval` collects the val candidates, scores them under each post-processing method, and
writes ``results.json``, ``table.md``, the plots, the quality calibration and, on request, one HTML
report; the steps below it each do one of these.

What it guarantees about its files: everything is checked first (no output on an input, the
checkpoint's categories against the data's, an existing calibration it would replace), the output
folder (and the HTML report) are locked against a second process, and the files are written as one
set (:class:`locconf.files.OutputSet`) once everything is computed: an interrupted evaluation leaves
the previous set, a finished one the complete new set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..evaluation.calibration import MIN_BOXES
from ..files import OutputSet, check_outputs, output_lock
from .build import build_datasets, device_of
from .keywords import call

logger = logging.getLogger(__name__)

#: What ``run_eval`` scores when neither its ``methods`` nor ``eval.methods`` name any.
DEFAULT_METHODS = ("nms", "soft-linear", "soft-gaussian")

#: The files :func:`run_eval` writes into its output folder (``reliability.png`` and
#: ``calibration.json`` only where there is something to draw or fit).
OUTPUT_FILES = ("results.json", "table.md", "confidence.png", "reliability.png", "detections.png", "calibration.json")

_CALIBRATION_NOTE = ("ECE: mean |predicted - true IoU| over equal-width bins, on candidates matched to a ground "
                     "truth with IoU > 0.5; calibrated: isotonic map fitted on the other half of the images "
                     "(2-fold). Calibration changes what the values mean, not how well they rank boxes (the "
                     "correlation below).")


def eval_outputs(out_dir: str | os.PathLike, html: str | os.PathLike | None = None) -> dict[str, Path]:
    """Every file :func:`run_eval` may write: ``{name: path}`` (``OUTPUT_FILES`` in ``out_dir``, and ``html``)."""
    out_dir = Path(out_dir)
    outputs = {name: out_dir / name for name in OUTPUT_FILES}
    if html is not None:
        outputs["html"] = Path(html)
    return outputs


def named_outputs(outputs: Mapping[str, Path]) -> dict[str, Path]:
    """:func:`eval_outputs` named as a user gives them (``--html``, ``--out's results.json``), for messages."""
    return {"--html" if name == "html" else f"--out's {name}": path for name, path in outputs.items()}


def run_eval(model: nn.Module, cfg: dict[str, dict], out_dir: str | os.PathLike,
             methods: Sequence[str] | None = None, device: str | None = None, progress: bool = True,
             html: str | os.PathLike | None = None, gallery: int = 8, checkpoint: str | os.PathLike | None = None,
             inputs: Mapping[str, Any] | None = None, overwrite_calibration: bool = False,
             calibration_min_boxes: int = MIN_BOXES, tta: str = "none", tta_merge: str = "concat") -> dict:
    """Candidates once, every method scored; writes results.json, table.md, the plots and the calibration.

    ``results.json`` holds ``methods`` (metrics per method, overall and per site: COCO's and
    DeepForest's ``box_precision`` / ``box_recall``), ``box_precision_recall_images`` (each
    image's precision and recall per method), ``correlation``
    (Pearson / Spearman of each confidence signal with the true IoU), ``correlation_sites``
    (the same per site, where the images record one) and ``calibration``: the expected calibration
    error of each signal read as a predicted IoU, as predicted and after out-of-fold isotonic
    calibration, and the metrics of the quality-ranked methods on calibrated quality
    (:func:`locconf.evaluation.calibration.evaluate_calibration`). ``reliability.png`` draws the reliability
    diagrams; ``calibration.json`` is the quality's map fitted on every image (where the detector
    predicts a quality and at least ``calibration_min_boxes`` candidates match a ground truth),
    for ``locconf predict|postprocess --calibration``. With ``html``, one self-contained page
    (:mod:`locconf.evaluation.report`) with a gallery of the first ``gallery`` images' detections.

    Before anything runs: no output may be one of ``inputs`` (``{name: path or paths}``, e.g. the
    configuration and ``checkpoint``) or of the data's annotation and image files; the output
    folder (and ``html``) are locked (:func:`locconf.files.output_lock`); the categories the model
    was trained on (``model.categories``, from its checkpoint) must be those of the data; and an
    existing ``calibration.json`` in ``out_dir`` fitted on another checkpoint or data set is not
    replaced unless ``overwrite_calibration`` (``checkpoint`` and the val annotation file are
    recorded in the calibration's ``info["fitted_on"]``). Every file is then written at the end, as
    one set (:class:`locconf.files.OutputSet`); a file of the set that this run does not produce
    (no calibration fitted, say) is removed, so the folder never mixes two evaluations.

    ``tta`` (:mod:`locconf.tta`: ``none``, ``flips``, ``all``): the candidates are the pooled passes of
    test-time augmentation; with ``tta_merge="concat"`` every method merges them, with ``fuse-*``
    each method's row is that method on each pass, then the passes fused (the analyses and pictures
    read the pooled candidates).
    """
    eval_cfg, methods = _eval_settings(cfg["eval"], methods, gallery)
    outputs = eval_outputs(out_dir, html)
    out_dir = Path(out_dir)
    named = named_outputs(outputs)
    check_outputs(named, dict(inputs or {}, checkpoint=checkpoint))
    OutputSet(outputs)  # checks that no output is a folder
    if isinstance(calibration_min_boxes, bool) or not isinstance(calibration_min_boxes, int) \
            or calibration_min_boxes < 1:
        raise ValueError(f"calibration_min_boxes must be an int >= 1, got {calibration_min_boxes!r}")
    _, val_ds, val_json = call(build_datasets, "data", dict(cfg["data"], split="val"))  # val only: no train_json
    check_outputs(named, {"annotation file": val_json,
                          "image": [val_ds.root / im["file_name"] for im in val_ds.images]})
    check_categories(getattr(model, "categories", None), val_ds, val_json)
    with contextlib.ExitStack() as locks:
        locks.enter_context(output_lock(out_dir, command="locconf eval", folder=True))
        if html is not None and out_dir.resolve() != Path(html).resolve().parent:
            locks.enter_context(output_lock(html, command="locconf eval", folder=False))
        return _evaluate(model, cfg, eval_cfg, methods, outputs, val_ds, val_json, device, progress, html, gallery,
                         checkpoint, overwrite_calibration, calibration_min_boxes, tta, tta_merge)


def _evaluate(model, cfg, eval_cfg, methods, outputs, val_ds, val_json, device, progress, html, gallery, checkpoint,
              overwrite_calibration, calibration_min_boxes, tta, tta_merge) -> dict:
    """:func:`run_eval` once its outputs are checked and locked."""
    from ..data import collate_fn
    from ..evaluation import collect_candidates, confidence_correlation, evaluate_calibration
    from ..postprocess import REQUIRED_SIGNALS
    from ..tta import MERGES, tta_model

    method_params = eval_cfg.get("method_params") or {}
    fitted_on = {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
                 "annotations": str(Path(val_json).resolve()), "images": len(val_ds)}
    if not overwrite_calibration:
        _keep_calibration(outputs["calibration.json"], fitted_on)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_fn)
    if tta_merge not in MERGES:
        raise ValueError(f"tta_merge must be one of {', '.join(MERGES)}, got {tta_merge!r}")
    runner = tta_model(model, tta)  # test-time augmentation (locconf.tta): the passes pooled
    candidates = collect_candidates(runner, loader, device_of(device), progress=progress)
    results = _score(candidates, methods, eval_cfg, val_ds, val_json, progress, tta_merge)
    correlation = confidence_correlation(candidates, val_ds)
    targets = [val_ds.target(i) for i in range(len(val_ds))]
    correlation_sites = _correlation_per_site(candidates, targets)
    cal = evaluate_calibration(candidates, targets, min_boxes=calibration_min_boxes)
    if cal["skipped"]:
        logger.warning("no quality calibration: %s", cal["skipped"])
    if cal["calibration"] is not None:
        cal["calibration"].info["fitted_on"] = fitted_on
    calibration = {"ece": cal["ece"], "diagrams": cal["diagrams"]}
    quality_methods = [m for m in results if REQUIRED_SIGNALS.get(m) == "quality"]
    if cal["quality_calibrated"] and quality_methods:
        calibration["methods"] = _with_calibrated_quality(cal["quality_calibrated"], results, quality_methods,
                                                          eval_cfg, val_ds, val_json, progress)
    first = methods[0] if methods[0] in results else next(iter(results))
    out_dir = outputs["results.json"].parent
    report = {"results": results, "correlation": correlation, "correlation_sites": correlation_sites,
              "calibration": calibration, "calibrator": cal["calibration"], "calibration_skipped": cal["skipped"],
              "out_dir": str(out_dir)}
    with OutputSet(outputs) as files:
        _write_plots(files, candidates, val_ds, cal)
        _draw_first_image(val_ds, candidates[0], first, method_params.get(first, {}), files.temp("detections.png"))
        report["table"] = _write_results(files, results, correlation, correlation_sites, calibration)
        if cal["calibration"] is not None:
            cal["calibration"].save(files.temp("calibration.json"))
            report["calibration_file"] = str(outputs["calibration.json"])
        if html is not None:
            own = getattr(model, "default_method", None)  # the head's own method (DIR: quality), else a quality one
            shown = own if own in results else next((m for m in quality_methods), first)
            meta = (f"{len(val_ds)} images of {val_json}; model {cfg['model'].get('arch', 'rcnn')} "
                    f"{cfg['model'].get('quality') or cfg['model'].get('head') or ''}; gallery: {shown}")
            figures = {c: files.temp(f) for f, c in _FIGURES.items() if files.temp(f).is_file()}
            _write_html(files.temp("html"), report, figures,
                        _gallery(val_ds, candidates, shown, method_params.get(shown, {}), gallery), meta)
            report["html"] = str(outputs["html"])
    return report


def check_categories(categories: Sequence[Mapping] | None, dataset: Any, source: Any) -> None:
    """The categories a checkpoint was trained on (``{"id", "name"}`` in label order) against a data set's.

    A data set whose category ids differ (another number, order or ids) would have every label scored
    as another category: a ``ValueError`` naming both lists. Names that differ for the same ids are
    only warned about. ``None`` (a checkpoint of an older version) is not checked.
    """
    if not categories:
        return
    trained = [(int(c["id"]), str(c.get("name", c["id"]))) for c in categories]
    data = [(int(dataset.label_to_cat_id[k]), str(dataset.class_names[k])) for k in range(1, dataset.num_classes + 1)]
    if [i for i, _ in trained] != [i for i, _ in data]:
        def show(cats):
            return ", ".join(f"{i} {n!r}" for i, n in cats)

        raise ValueError(f"the checkpoint was trained on the categories [{show(trained)}] but {source} has "
                         f"[{show(data)}]: its labels would be scored as other categories; evaluate it on data "
                         "with the same categories")
    if trained != data:
        logger.warning("the checkpoint's category names %s differ from those of %s (%s); the ids match",
                       [n for _, n in trained], source, [n for _, n in data])


def _keep_calibration(path: Path, fitted_on: dict) -> None:
    """Refuse to replace the calibration at ``path`` when it was fitted on another checkpoint or data set."""
    from ..data.coco import read_json
    from ..evaluation.calibration import Calibration

    if not path.exists():
        return
    try:
        old = Calibration.from_dict(read_json(path), source=str(path)).info.get("fitted_on")
    except (OSError, ValueError) as e:
        old, why = None, f"an unreadable calibration ({e})"
    else:
        why = "a calibration fitted on " + (_describe_fit(old) if isinstance(old, dict) else "an unrecorded split")
    if old == fitted_on:
        return  # the same evaluation again: the same fit
    raise ValueError(f"{path} holds {why}; this evaluation would replace it with one fitted on "
                     f"{_describe_fit(fitted_on)}: write to another --out, or pass --overwrite-calibration "
                     "(overwrite_calibration=True) to replace it")


def _describe_fit(fitted_on: dict) -> str:
    return (f"{fitted_on.get('images', '?')} images of {fitted_on.get('annotations', '?')} with the checkpoint "
            f"{fitted_on.get('checkpoint') or '(not recorded)'}")


def _eval_settings(section: dict, methods: Sequence[str] | None, gallery: int) -> tuple[dict, list[str]]:
    """``(eval section without methods, methods)``: ``methods``, else ``eval.methods``, else the defaults."""
    eval_cfg = dict(section)
    methods = list(methods or eval_cfg.pop("methods", list(DEFAULT_METHODS)))
    eval_cfg.pop("methods", None)
    if isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 0:
        raise ValueError(f"gallery must be a non-negative int, got {gallery!r}")
    return eval_cfg, methods


def _score(candidates: list[dict], methods: list[str], eval_cfg: dict, val_ds, val_json: Path,
           progress: bool, tta_merge: str = "concat") -> dict:
    """COCO metrics of each method on ``candidates`` (:func:`locconf.evaluation.evaluate_methods`; with a
    ``fuse-*`` ``tta_merge``, of each method then the passes fused: :func:`locconf.tta.evaluate_fused`)."""
    from ..evaluation import evaluate_methods
    from ..tta import evaluate_fused

    if tta_merge != "concat":
        return call(evaluate_fused, "eval", dict(eval_cfg, progress=progress), candidates, str(val_json), methods,
                    val_ds.label_to_cat_id, tta_merge)
    return call(evaluate_methods, "eval", dict(eval_cfg, progress=progress, per_image=True), candidates, str(val_json),
                methods, val_ds.label_to_cat_id)


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


_FIGURES = {"confidence.png": "Each confidence signal against the true IoU of the matched candidates",
            "reliability.png": "Reliability diagrams: mean true IoU per bin of the signal (diagonal: calibrated)"}


def _write_plots(files: OutputSet, candidates: list[dict], val_ds, cal: dict) -> None:
    """``confidence.png`` and, where there are diagrams, ``reliability.png``."""
    from ..evaluation import plot_confidence, plot_reliability

    plot_confidence(candidates, val_ds, files.temp("confidence.png"))
    if cal["diagrams"]:
        plot_reliability(cal["diagrams"], files.temp("reliability.png"),
                         title="confidence read as a predicted IoU (matched boxes, IoU > 0.5)")


def _draw_first_image(val_ds, candidates: dict, method: str, params: dict, path: Path) -> None:
    """Draw the first val image's detections under ``method`` with its ground truth."""
    from ..evaluation import draw_detections
    from ..postprocess import postprocess

    image, target = val_ds[0]
    dets = postprocess(candidates, method, **params)
    draw_detections(image, dets, path, gt=target, class_names=val_ds.class_names)


def _write_results(files: OutputSet, results: dict, correlation: dict, correlation_sites: dict,
                   calibration: dict) -> str:
    """Write ``results.json`` and ``table.md``; return the table (with the calibrated-quality one, if any)."""
    from ..evaluation import format_table

    per_image = {m: r.pop("images") for m, r in results.items() if "images" in r}
    for r in (calibration.get("methods") or {}).values():
        r.pop("images", None)
    table = format_table(results, per_site=True)
    if calibration.get("methods"):
        table += "\n\n" + format_table(calibration["methods"])
    files.temp("results.json").write_text(json.dumps(
        {"methods": results, "correlation": correlation, "correlation_sites": correlation_sites,
         "calibration": calibration, "box_precision_recall_images": per_image}, indent=1))
    files.temp("table.md").write_text(table + "\n")
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
