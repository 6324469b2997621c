"""Scoring with COCO: post-process the same candidates with each method, score each with COCO.

:func:`evaluate_methods` applies every post-processing method of :mod:`locconf.postprocess` to the
*same* candidates (:func:`locconf.evaluation.collect_candidates`) and scores each with the COCO API
of ``faster-coco-eval`` (bbox AP, AP50, AP75, AP90, APs/APm/APl, AR@100); :func:`format_table`
shows the results. :func:`load_coco` and :func:`coco_metrics` are the two steps the file tools
(:mod:`locconf.postprocess_files`) share with it.

Conventions:

* Candidates are :class:`locconf.candidates.Candidates` dicts with an ``image_id``; their boxes
  must be in the coordinates of the ground-truth file (evaluate with a loader that does not
  resize; torchvision-style detectors map their outputs back to the input size).
* Metrics are computed on the images that have candidates (so evaluating a subset of a data set
  is fair); an image with no candidates must still appear, with empty tensors.
* COCO's standard ``maxDets = (1, 10, 100)``; ``max_detections`` only caps post-processing.
* -1 means "undefined" (COCO's convention: no ground truth in that category / area range).
* Per site: when image records of the ground truth carry a ``site`` string, each site is also
  evaluated on the subset of its image ids (``params.imgIds``), with the same detections.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor
from ..progress import progress_bar

from ..candidates import Candidates, signals
from ..data.coco import check_ground_truth, read_json
from ..files import require_file
from ..postprocess import METHODS, postprocess
from .collect import _image_id

logger = logging.getLogger(__name__)

__all__ = ["evaluate_methods", "format_table", "load_coco", "coco_metrics", "METRICS"]

#: Metric names, in table order.
METRICS = ("AP", "AP50", "AP75", "AP90", "APs", "APm", "APl", "AR100")

# Positions in ``COCOeval.stats`` for the default area ranges and maxDets = (1, 10, 100).
_STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def _silent(*args: Any, **kwargs: Any) -> None:
    """A ``print_function`` for faster-coco-eval that prints nothing."""


def load_coco(coco_gt: COCO | str | os.PathLike) -> COCO:
    """A silent ``COCO`` ground truth; ``area`` is filled in as ``w * h`` where a record lacks it.

    The file is checked first (:func:`locconf.data.coco.check_ground_truth`): a record COCO's
    evaluation would misread or silently ignore (a negative or non-finite ``area``, say) is a
    ``ValueError`` naming it.
    """
    if isinstance(coco_gt, COCO):
        return coco_gt
    if not isinstance(coco_gt, (str, os.PathLike)):
        raise ValueError(f"coco_gt must be a path to a COCO json file or a COCO object, got {type(coco_gt).__name__}")
    data = read_json(require_file(coco_gt, "ground truth"))
    check_ground_truth(data, coco_gt)
    ids: set = set()
    for i, ann in enumerate(data.get("annotations", []) if isinstance(data, dict) else []):
        if isinstance(ann, dict) and isinstance(ann.get("id"), (int, str)):
            if ann["id"] in ids:
                raise ValueError(f"{coco_gt}: annotations[{i}] repeats annotation id {ann['id']} "
                                 "(COCO evaluation needs unique ids: duplicates corrupt AP)")
            ids.add(ann["id"])
    for ann in data.get("annotations", []):
        if "area" not in ann and "bbox" in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return COCO(data, print_function=_silent)


def _check_candidates(candidates: Sequence[Candidates], gt: COCO) -> list[int]:
    """Validate the candidate list against the ground truth; return the image ids in order."""
    if not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError("candidates must be a non-empty list of per-image dicts (see collect_candidates)")
    ids, seen = [], set()
    for i, cand in enumerate(candidates):
        if not isinstance(cand, Mapping):
            raise ValueError(f"candidates[{i}] must be a dict, got {type(cand).__name__}")
        for key in ("boxes", "scores", "labels"):
            if not isinstance(cand.get(key), Tensor):
                raise ValueError(f"candidates[{i}] needs a tensor '{key}'")
        image_id = _image_id(cand, i)
        if image_id in seen:
            raise ValueError(f"candidates[{i}] repeats image_id {image_id}")
        if image_id not in gt.imgs:
            raise ValueError(f"candidates[{i}] has image_id {image_id}, which is not in coco_gt")
        seen.add(image_id)
        ids.append(image_id)
    return ids


def _check_label_map(label_to_cat_id: Mapping[int, int], gt: COCO) -> dict[int, int]:
    if not isinstance(label_to_cat_id, Mapping) or not label_to_cat_id:
        raise ValueError("label_to_cat_id must be a non-empty dict {label: COCO category id}")
    known = set(gt.getCatIds())
    mapping = {int(k): int(v) for k, v in label_to_cat_id.items()}
    unknown = sorted(set(mapping.values()) - known)
    if unknown:
        raise ValueError(f"label_to_cat_id maps to category ids {unknown} that coco_gt does not have")
    return mapping


def _coco_results(
    candidates: Sequence[Candidates],
    method: str,
    max_detections: int,
    params: dict,
    label_to_cat_id: dict[int, int],
    progress: bool,
) -> list[dict]:
    """Post-process every image with ``method``; COCO result records (``bbox`` as x, y, w, h)."""
    records: list[dict] = []
    for cand in progress_bar(candidates, desc=method, progress=progress, leave=False):
        fields = {k: v for k, v in cand.items() if isinstance(v, Tensor)}
        det = postprocess(fields, method=method, max_detections=max_detections, **params)
        if det["boxes"].shape[0] == 0:
            continue
        boxes = det["boxes"].double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        image_id = int(cand["image_id"])
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            if label not in label_to_cat_id:
                raise ValueError(f"label {label} (image {image_id}) is not a key of label_to_cat_id")
            records.append(
                {"image_id": image_id, "category_id": label_to_cat_id[label], "bbox": box, "score": score}
            )
    return records


def _ap_at_iou(evaluator: COCOeval_faster, iou: float) -> float:
    """AP at one of COCO's IoU thresholds, from the accumulated precision array [T, R, K, A, M].

    Area range "all" and the largest maxDets; the mean over the defined (> -1) entries, or -1.
    """
    p = evaluator.params
    t = np.flatnonzero(np.isclose(np.asarray(p.iouThrs), iou))
    if t.size != 1:
        raise ValueError(f"iou must be one of COCO's thresholds {list(np.round(p.iouThrs, 2))}, got {iou}")
    precision = np.asarray(evaluator.eval["precision"])
    s = precision[t[0], :, :, p.areaRngLbl.index("all"), len(p.maxDets) - 1]
    s = s[s > -1]
    return float(s.mean()) if s.size else -1.0


def coco_metrics(gt: COCO, dt: COCO, image_ids: Sequence[int]) -> dict[str, float]:
    """COCO bbox metrics of ``dt`` on ``image_ids``: plain floats, -1 where undefined."""
    evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=_silent)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.params.maxDets = [1, 10, 100]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(evaluator.stats[i]) for name, i in _STATS_INDEX.items()}
    metrics["AP90"] = _ap_at_iou(evaluator, 0.90)
    return {name: metrics[name] for name in METRICS}


def _sites(gt: COCO, image_ids: Sequence[int]) -> dict[str, list[int]]:
    """Image ids per ``site`` of the image records (images without a site belong to none)."""
    sites: dict[str, list[int]] = {}
    for image_id in image_ids:
        site = gt.imgs[image_id].get("site")
        if site is not None:
            sites.setdefault(str(site), []).append(image_id)
    return dict(sorted(sites.items()))


def evaluate_methods(
    candidates: Sequence[Candidates],
    coco_gt: COCO | str | os.PathLike,
    methods: Sequence[str],
    label_to_cat_id: Mapping[int, int],
    max_detections: int = 100,
    method_params: Mapping[str, dict] | None = None,
    per_site: bool = True,
    progress: bool = True,
) -> dict[str, dict]:
    """Post-process the same candidates with each method and score each with COCO bbox metrics.

    Args:
        candidates: per-image :class:`locconf.candidates.Candidates` with ``image_id``, from
            :func:`locconf.evaluation.collect_candidates`. Images may have no candidates (N = 0).
        coco_gt: the ground-truth COCO json (path) or a ``faster_coco_eval.COCO`` object.
        methods: names from :data:`locconf.postprocess.METHODS`. A method whose signal
            (``METHODS[method].needs``) the candidates lack is skipped with a logged warning and is
            absent from the result.
        label_to_cat_id: contiguous label -> COCO category id (``CocoDetection.label_to_cat_id``).
        max_detections: detections kept per image after post-processing.
        method_params: optional ``{method: {keyword: value}}`` for :func:`postprocess`
            (e.g. ``{"nms": {"iou_threshold": 0.6}}``).
        per_site: also evaluate each ``site`` of the image records on its own images.
        progress: show tqdm progress bars.

    Returns:
        ``{method: {"AP", "AP50", "AP75", "AP90", "APs", "APm", "APl", "AR100": float}}`` in
        ``[0, 1]`` (-1 where undefined), plus ``"sites": {site: {metric: float}}`` when
        ``per_site`` and the images have sites. JSON-serialisable.
    """
    gt = load_coco(coco_gt)
    image_ids = _check_candidates(candidates, gt)
    label_map = _check_label_map(label_to_cat_id, gt)
    if isinstance(methods, str) or not isinstance(methods, Sequence) or len(methods) == 0:
        raise ValueError(f"methods must be a non-empty list of method names, got {methods!r}")
    for method in methods:
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"methods: {method!r} is not one of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods has duplicates: {list(methods)}")
    method_params = dict(method_params or {})
    for method, params in method_params.items():
        if method not in methods:
            raise ValueError(f"method_params has key {method!r}, which is not in methods {list(methods)}")
        if not isinstance(params, Mapping):
            raise ValueError(f"method_params[{method!r}] must be a dict of keyword arguments")
    if not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive int, got {max_detections!r}")
    missing = len(set(gt.getImgIds()) - set(image_ids))
    if missing:
        logger.info("evaluating on the %d images with candidates; %d images of coco_gt have none",
                    len(image_ids), missing)
    sites = _sites(gt, image_ids) if per_site else {}

    results: dict[str, dict] = {}
    for method in methods:
        lacking = [(need, n) for need in METHODS[method].needs
                   if (n := sum(need not in signals(c) for c in candidates))]
        if lacking:
            need, n = lacking[0]
            logger.warning(
                "skipping method %r: it needs candidates[%r], which %d of %d images lack "
                "(this detector does not predict it)", method, need, n, len(candidates)
            )
            continue
        records = _coco_results(candidates, method, max_detections, dict(method_params.get(method, {})),
                                label_map, progress)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(records)
        metrics: dict[str, Any] = coco_metrics(gt, dt, image_ids)
        if sites:
            metrics["sites"] = {site: coco_metrics(gt, dt, ids) for site, ids in sites.items()}
        results[method] = metrics
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _cell(value: Any, percent: bool, digits: int) -> str:
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return ""
    if value == -1:
        return "-"
    return f"{value * (100.0 if percent else 1.0):.{digits}f}"


def format_table(
    results: Mapping[str, Mapping],
    columns: Sequence[str] = METRICS,
    per_site: bool = False,
    percent: bool = True,
    digits: int = 1,
) -> str:
    """Markdown table of :func:`evaluate_methods` results, one row per method.

    Args:
        results: ``{method: metrics}``.
        columns: metric names to show.
        per_site: add one row ``method [site]`` per site after each method's row.
        percent: show metrics x 100 (as papers do). Undefined (-1) values are shown as ``-``.
        digits: decimals.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict {{method: metrics}}, got {type(results).__name__}")
    columns = list(columns)
    if not columns:
        raise ValueError("columns must name at least one metric")
    rows: list[tuple[str, Mapping]] = []
    for method, metrics in results.items():
        rows.append((method, metrics))
        if per_site:
            rows.extend((f"{method} [{site}]", m) for site, m in metrics.get("sites", {}).items())
    for col in columns:
        if rows and not any(col in m for _, m in rows):
            raise ValueError(f"columns: no result has a metric {col!r}")
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(c), percent, digits) for c in columns) + " |")
    return "\n".join(lines)
