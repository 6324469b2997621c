"""Scoring with COCO: post-process the same candidates with each method, score each with COCO.

:func:`evaluate_methods` applies every post-processing method of :mod:`locconf.postprocess` to the
*same* candidates (:func:`locconf.evaluation.collect_candidates`) and scores each with the COCO API
of ``faster-coco-eval`` (bbox AP, AP50, AP75, AP90, APs/APm/APl, AR@100), and with DeepForest's box
precision and recall at IoU 0.4 (:mod:`.precision_recall`); :func:`format_table` shows the results. :func:`load_coco` and :func:`coco_metrics` are the two steps the file tools
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
from .precision_recall import IOU_THRESHOLD, PR_METRICS, SCORE_THRESHOLD, box_precision_recall

logger = logging.getLogger(__name__)

__all__ = ["evaluate_methods", "format_table", "load_coco", "coco_metrics", "METRICS", "gt_targets",
           "add_precision_recall"]

#: Metric names, in table order.
METRICS = ("AP", "AP50", "AP75", "AP90", "APs", "APm", "APl", "AR100")

# Positions in ``COCOeval.stats`` for the default area ranges and maxDets = (1, 10, 100).
_STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def _silent(*args: Any, **kwargs: Any) -> None:
    """A ``print_function`` for faster-coco-eval that prints nothing."""


def load_coco(coco_gt: COCO | dict | str | os.PathLike, source: str | os.PathLike | None = None) -> COCO:
    """A silent ``COCO`` ground truth; ``area`` is filled in as ``w * h`` where a record lacks it.

    The records are checked first (:func:`locconf.data.coco.check_ground_truth`): one COCO's
    evaluation would misread or silently ignore (a negative or non-finite ``area``, say) is a
    ``ValueError`` naming it (and ``source``, the file a dict was read from, where given). ``coco_gt``: a COCO object, a COCO instances dict (e.g. :func:`locconf.io.read_annotations`'s)
    or the path of a COCO instances JSON file (a results file, a JSON array, is refused with a
    message that says so).
    """
    from ..io.annotations import check_instances

    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, dict):
        data = check_instances(coco_gt, source or "coco_gt")
    elif isinstance(coco_gt, (str, os.PathLike)):
        data = check_instances(read_json(require_file(coco_gt, "ground truth")), coco_gt)
    else:
        raise ValueError(f"coco_gt must be a path to a COCO json file, a COCO instances dict or a COCO object, "
                         f"got {type(coco_gt).__name__}")
    name = (source or "coco_gt") if isinstance(coco_gt, dict) else coco_gt
    check_ground_truth(data, name)  # the records: ids, boxes, areas COCO's evaluation would misread
    ids: set = set()
    for i, ann in enumerate(data.get("annotations", []) if isinstance(data, dict) else []):
        if isinstance(ann, dict) and isinstance(ann.get("id"), (int, str)):
            if ann["id"] in ids:
                raise ValueError(f"{name}: annotations[{i}] repeats annotation id {ann['id']} "
                                 "(COCO evaluation needs unique ids: duplicates corrupt AP)")
            ids.add(ann["id"])
    for ann in data.get("annotations", []):
        if isinstance(ann, dict) and "area" not in ann and "bbox" in ann:
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
    kept: list | None = None,
) -> list[dict]:
    """Post-process every image with ``method``; COCO result records (``bbox`` as x, y, w, h).

    ``kept``: where given, each image's detections (``boxes``, ``scores``) are appended to it."""
    records: list[dict] = []
    for cand in progress_bar(candidates, desc=method, progress=progress, leave=False):
        fields = {k: v for k, v in cand.items() if isinstance(v, Tensor)}
        det = postprocess(fields, method=method, max_detections=max_detections, **params)
        if kept is not None:
            kept.append({"boxes": det["boxes"], "scores": det["scores"]})
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


def gt_targets(gt: COCO, image_ids: Sequence[int]) -> list[dict]:
    """Each image's ground truth as a target dict: ``boxes`` (M, 4) xyxy float64, ``labels``
    (COCO category ids), ``iscrowd``, ``image_id`` and ``site`` where the image record has one."""
    targets = []
    for image_id in image_ids:
        anns = gt.imgToAnns.get(image_id, [])
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        t = {"image_id": image_id, "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
             "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
             "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)}
        site = gt.imgs[image_id].get("site")
        if site is not None:
            t["site"] = str(site)
        targets.append(t)
    return targets


def add_precision_recall(metrics: dict, pr: Mapping, per_image: bool) -> dict:
    """Put :func:`locconf.evaluation.box_precision_recall`'s ``box_precision`` / ``box_recall``
    into a row of metrics (and into its ``sites``); with ``per_image``, the images' too (``images``)."""
    for key in PR_METRICS:
        metrics[key] = pr[key]
    for site, site_pr in pr["sites"].items():
        if site in metrics.get("sites", {}):
            for key in PR_METRICS:
                metrics["sites"][site][key] = site_pr[key]
    if per_image:
        metrics["images"] = pr["images"]
    return metrics


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
    pr_iou_threshold: float = IOU_THRESHOLD,
    pr_score_threshold: float = SCORE_THRESHOLD,
    per_image: bool = False,
) -> dict[str, dict]:
    """Post-process the same candidates with each method and score each with COCO bbox metrics
    and DeepForest's box precision and recall.

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
        pr_iou_threshold, pr_score_threshold: DeepForest's box precision and recall
            (:func:`locconf.evaluation.box_precision_recall`): a detection scored at least
            ``pr_score_threshold`` is a true positive when the one-to-one matching pairs it with
            a ground truth at IoU greater than ``pr_iou_threshold`` (0.4 and 0.1, DeepForest's).
        per_image: also return each image's precision and recall (``"images"``).

    Returns:
        ``{method: {"AP", "AP50", "AP75", "AP90", "APs", "APm", "APl", "AR100", "box_precision",
        "box_recall": float}}`` in ``[0, 1]`` (-1 where undefined), plus ``"sites": {site:
        {metric: float}}`` when ``per_site`` and the images have sites, and ``"images": [{"image_id",
        "tp", "predictions", "objects", "precision", "recall"}]`` with ``per_image``.
        JSON-serialisable.
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
    box_precision_recall([], [], pr_iou_threshold, pr_score_threshold)  # checks the thresholds before any work
    targets = gt_targets(gt, image_ids)
    if not per_site:
        targets = [{k: v for k, v in t.items() if k != "site"} for t in targets]

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
        kept: list[dict] = []
        records = _coco_results(candidates, method, max_detections, dict(method_params.get(method, {})),
                                label_map, progress, kept)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(records)
        metrics: dict[str, Any] = coco_metrics(gt, dt, image_ids)
        if sites:
            metrics["sites"] = {site: coco_metrics(gt, dt, ids) for site, ids in sites.items()}
        pr = box_precision_recall(kept, targets, pr_iou_threshold, pr_score_threshold)
        results[method] = add_precision_recall(metrics, pr, per_image)
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
    columns: Sequence[str] | None = None,
    per_site: bool = False,
    percent: bool = True,
    digits: int = 1,
) -> str:
    """Markdown table of :func:`evaluate_methods` results, one row per method.

    Args:
        results: ``{method: metrics}``.
        columns: metric names to show (default: :data:`METRICS`, then ``box_precision`` and
            ``box_recall`` where a result has them).
        per_site: add one row ``method [site]`` per site after each method's row.
        percent: show metrics x 100 (as papers do). Undefined (-1) values are shown as ``-``.
        digits: decimals.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict {{method: metrics}}, got {type(results).__name__}")
    if columns is None:
        columns = list(METRICS) + [c for c in PR_METRICS if any(c in m for m in results.values()
                                                                 if isinstance(m, Mapping))]
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
