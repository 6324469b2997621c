"""Box precision and recall at one IoU threshold: the evaluation DeepForest users know.

DeepForest (``deepforest.evaluate.evaluate_boxes``) scores tree-crown predictions, per image, by a
one-to-one matching of predictions to ground truths and reports the mean over images of each
image's recall and precision. :func:`box_precision_recall` computes the same numbers, so that a
user can put locconf's beside those they already have:

1. Detections with a score below ``score_threshold`` are dropped (DeepForest's ``score_thresh``,
   0.1 by default, is applied when it predicts); classes are ignored ("box" precision and recall).
2. Per image, predictions and ground truths are matched one to one by the assignment that
   maximises the **sum of their intersection areas** (DeepForest solves it with a dense
   Hungarian ``linear_sum_assignment`` on the truth x prediction matrix of intersection areas).
   Only pairs that intersect can contribute, so the same optimum is found here on the sparse
   graph of intersecting pairs (each ground truth may also stay unmatched at no gain), with
   SciPy's sparse Jonker-Volgenant solver (``min_weight_full_bipartite_matching``), in memory
   that grows with the number of intersecting pairs rather than with truths x predictions.
   Where several assignments reach the same maximal sum, the one chosen may differ from SciPy's
   dense solver (and so, at an IoU threshold, the count of true positives; ties have measure zero
   for real-valued boxes).
3. A matched pair is a true positive when its IoU is **greater than** ``iou_threshold`` (0.4,
   DeepForest's default).
4. Per image: ``recall = TP / objects``, ``precision = TP / predictions``. As DeepForest:
   ``box_recall`` is the mean of the recall over the images that have ground-truth objects (an
   image without predictions counts 0), and ``box_precision`` the mean of the precision over those
   of them that also have predictions; images without ground-truth objects count in neither (their
   predictions are not false positives here). Undefined means are -1 (COCO's convention).

Crowd annotations (``iscrowd`` 1) are left out of the ground truth. The totals (``tp``,
``predictions``, ``objects``) are also reported, per image and overall, for the pooled
("micro") precision and recall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..boxes import check_boxes

__all__ = ["match_one_to_one", "box_precision_recall", "PR_METRICS", "IOU_THRESHOLD", "SCORE_THRESHOLD"]

#: The metrics :func:`box_precision_recall` adds to a row of results (table columns).
PR_METRICS = ("box_precision", "box_recall")
#: DeepForest's defaults.
IOU_THRESHOLD = 0.4
SCORE_THRESHOLD = 0.1

_CHUNK = 1 << 22  # entries of one block of the intersection matrix (32 MiB in float64)


def _intersections(det: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gt index, det index, area)`` of every intersecting pair, row-major, in blocks of ground
    truths (bounded memory)."""
    rows, cols, areas = [], [], []
    step = max(1, _CHUNK // max(det.shape[0], 1))
    for start in range(0, gt.shape[0], step):
        g = gt[start:start + step]
        w = np.minimum(g[:, None, 2], det[None, :, 2]) - np.maximum(g[:, None, 0], det[None, :, 0])
        h = np.minimum(g[:, None, 3], det[None, :, 3]) - np.maximum(g[:, None, 1], det[None, :, 1])
        i, j = np.nonzero((w > 0) & (h > 0))
        rows.append(i + start)
        cols.append(j)
        areas.append(w[i, j] * h[i, j])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(areas)


def _match(det: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`match_one_to_one` on float64 numpy boxes (N, 4), (M, 4): (N,) matched truth, (N,) IoU."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n, m = det.shape[0], gt.shape[0]
    matched = np.full(n, -1, dtype=np.int64)
    iou = np.zeros(n, dtype=np.float64)
    if n == 0 or m == 0:
        return matched, iou
    gi, dj, inter = _intersections(det, gt)
    if gi.size == 0:
        return matched, iou
    # Rows: the M truths. Columns: the N predictions, then one private "unmatched" column per truth.
    # Cost big - intersection on a pair, big on a truth's own column: a full matching of the rows of
    # least cost is one of greatest total intersection (SciPy wants non-zero weights: big > any area).
    big = float(inter.max()) + 1.0
    cost = np.concatenate([big - inter, np.full(m, big)])
    r = np.concatenate([gi, np.arange(m)])
    c = np.concatenate([dj, n + np.arange(m)])
    rows, cols = min_weight_full_bipartite_matching(csr_array((cost, (r, c)), shape=(m, n + m)))
    real = cols < n
    g_idx, d_idx = np.asarray(rows[real], dtype=np.int64), np.asarray(cols[real], dtype=np.int64)
    d, g = det[d_idx], gt[g_idx]
    i = (np.clip(np.minimum(d[:, 2], g[:, 2]) - np.maximum(d[:, 0], g[:, 0]), 0, None)
         * np.clip(np.minimum(d[:, 3], g[:, 3]) - np.maximum(d[:, 1], g[:, 1]), 0, None))
    union = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - i
    overlap = i > 0  # a truth left on a prediction it does not touch is no match (only intersecting pairs gain)
    matched[d_idx[overlap]] = g_idx[overlap]
    iou[d_idx[overlap]] = i[overlap] / union[overlap]
    return matched, iou


def match_one_to_one(det_boxes: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """DeepForest's one-to-one matching of one image: the assignment of maximal total intersection area.

    Args:
        det_boxes: (N, 4) predictions, gt_boxes: (M, 4) ground truths, ``x1, y1, x2, y2``.

    Returns:
        ``(matched, iou)``: (N,) int64, the ground truth each prediction is assigned to (-1: none,
        or no overlap), and (N,) float64, the IoU with it (0 where none). On the CPU.
    """
    det = check_boxes(det_boxes, "det_boxes").detach().to("cpu", torch.float64).numpy()
    gt = check_boxes(gt_boxes, "gt_boxes").detach().to("cpu", torch.float64).numpy()
    matched, iou = _match(det, gt)
    return torch.from_numpy(matched), torch.from_numpy(iou)


def _check_threshold(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else -1.0


def _summary(images: list[dict]) -> dict:
    with_objects = [im for im in images if im["objects"] > 0]
    return {
        "box_precision": _mean([im["precision"] for im in with_objects if im["predictions"] > 0]),
        "box_recall": _mean([im["recall"] for im in with_objects]),
        "tp": sum(im["tp"] for im in images),
        "predictions": sum(im["predictions"] for im in with_objects),
        "objects": sum(im["objects"] for im in with_objects),
    }


def box_precision_recall(
    detections: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    iou_threshold: float = IOU_THRESHOLD,
    score_threshold: float = SCORE_THRESHOLD,
) -> dict:
    """DeepForest's box precision and recall (see the module docstring), overall, per site and per image.

    Args:
        detections: one dict per image with ``boxes`` (N, 4) and ``scores`` (N,) (labels are not
            read), paired with ``targets`` by position.
        targets: one dict per image with ``boxes`` (M, 4), optional ``iscrowd`` (M,), and optional
            ``image_id`` and ``site`` (reported).
        iou_threshold: a matched pair is a true positive when its IoU is greater than this.
        score_threshold: detections scored lower are dropped first.

    Returns:
        ``{"box_precision", "box_recall", "tp", "predictions", "objects", "iou_threshold",
        "score_threshold", "images": [{"image_id", "site"?, "tp", "predictions", "objects",
        "precision", "recall"}], "sites": {site: {"box_precision", "box_recall", "tp",
        "predictions", "objects"}}}``; ``precision`` / ``recall`` of an image are -1 where
        undefined (no predictions / no objects).
    """
    iou_threshold = _check_threshold(iou_threshold, "iou_threshold", 0.0, 1.0)
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) or score_threshold != score_threshold:
        raise ValueError(f"score_threshold must be a number, got {score_threshold!r}")
    if isinstance(detections, Mapping) or isinstance(targets, Mapping) or len(detections) != len(targets):
        raise ValueError("detections and targets must be lists of per-image dicts of the same length")
    images = []
    for k, (det, target) in enumerate(zip(detections, targets)):
        for name, d, keys in (("detections", det, ("boxes", "scores")), ("targets", target, ("boxes",))):
            if not isinstance(d, Mapping) or any(key not in d for key in keys):
                raise ValueError(f"{name}[{k}] must be a dict with {', '.join(keys)}")
        boxes = check_boxes(det["boxes"], f"detections[{k}]['boxes']").detach().to("cpu", torch.float64).numpy()
        scores = torch.as_tensor(det["scores"]).detach().to("cpu", torch.float64).numpy()
        gt = check_boxes(target["boxes"], f"targets[{k}]['boxes']").detach().to("cpu", torch.float64).numpy()
        if target.get("iscrowd") is not None:
            gt = gt[torch.as_tensor(target["iscrowd"]).cpu().numpy() == 0]
        boxes = boxes[scores >= score_threshold]
        matched, iou = _match(boxes, gt)
        tp = int(((matched >= 0) & (iou > iou_threshold)).sum())
        n, m = int(boxes.shape[0]), int(gt.shape[0])
        im: dict[str, Any] = {"image_id": target.get("image_id", k)}
        if target.get("site") is not None:
            im["site"] = target["site"]
        im.update(tp=tp, predictions=n, objects=m, precision=tp / n if n else -1.0, recall=tp / m if m else -1.0)
        images.append(im)
    out = _summary(images)
    out.update(iou_threshold=iou_threshold, score_threshold=float(score_threshold))
    sites = sorted({im["site"] for im in images if "site" in im})
    out["sites"] = {s: _summary([im for im in images if im.get("site") == s]) for s in sites}
    out["images"] = images
    return out
