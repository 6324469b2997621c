"""Matching candidates to ground truth: the true IoU of every box, and the confidence signals beside it.

What the correlation (:mod:`.correlation`), the calibration (:mod:`.calibration`) and the plots
(:mod:`.plots`) measure a confidence signal against: each candidate's best IoU with a ground truth
of its class (:func:`match_to_ground_truth`). Candidates are lists of
:class:`locconf.candidates.Candidates` (raw candidates or post-processed detections), paired with
their targets by ``image_id`` (else by position).

Confidence signals (:data:`CONFIDENCE_SIGNALS`), each read as a predictor of the true IoU:
``"score"`` (the candidates' ``scores``), ``"quality"`` (their ``quality``, the predicted IoU /
localization quality) and ``"combined"`` (``sqrt(score * quality)``, the ranking of DIR / PAA). A
signal that needs ``quality`` is skipped for candidates without one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..boxes import box_iou, check_boxes

logger = logging.getLogger(__name__)

__all__ = ["CONFIDENCE_SIGNALS", "match_to_ground_truth", "pair_with_targets", "signal_values", "matched_signals"]

#: Confidence signals, in plot order.
CONFIDENCE_SIGNALS = ("score", "quality", "combined")


def _targets_list(gts: Any) -> list[Mapping]:
    """Accept a list of target dicts, or a data set with ``target(i)`` (e.g. ``CocoDetection``)."""
    if hasattr(gts, "target") and hasattr(gts, "__len__"):
        return [gts.target(i) for i in range(len(gts))]
    if isinstance(gts, Mapping) or not isinstance(gts, Sequence):
        raise ValueError("gts must be a list of target dicts or a data set with a target(i) method")
    return list(gts)


def pair_with_targets(candidates: Sequence[Mapping], gts: Any) -> list[tuple[Mapping, Mapping]]:
    """Pair per-image candidates with targets: by ``image_id`` when candidates have one, else by position."""
    if isinstance(candidates, Mapping) or not isinstance(candidates, Sequence):
        raise ValueError("candidates must be a list of per-image dicts")
    targets = _targets_list(gts)
    if candidates and all("image_id" in c for c in candidates):
        by_id = {}
        for t in targets:
            if "image_id" in t:
                by_id[int(t["image_id"])] = t
        pairs = []
        for i, c in enumerate(candidates):
            image_id = int(c["image_id"])
            if image_id not in by_id:
                raise ValueError(f"candidates[{i}] has image_id {image_id}, which no target in gts has")
            pairs.append((c, by_id[image_id]))
        return pairs
    if len(candidates) != len(targets):
        raise ValueError(f"candidates ({len(candidates)}) and gts ({len(targets)}) must have the same length "
                         "when candidates have no image_id")
    return list(zip(candidates, targets))


def _match_one(det: Mapping, target: Mapping) -> Tensor:
    for name, d in (("detections", det), ("targets", target)):
        if not isinstance(d, Mapping) or "boxes" not in d or "labels" not in d:
            raise ValueError(f"{name} must be dicts with 'boxes' and 'labels'")
    boxes = check_boxes(det["boxes"], "detections['boxes']")
    gt_boxes = check_boxes(target["boxes"], "targets['boxes']").to(boxes)
    labels, gt_labels = det["labels"], target["labels"].to(boxes.device)
    if labels.shape != boxes.shape[:1]:
        raise ValueError(f"detections['labels'] must have shape ({boxes.shape[0]},), got {tuple(labels.shape)}")
    if gt_labels.shape != gt_boxes.shape[:1]:
        raise ValueError(f"targets['labels'] must have shape ({gt_boxes.shape[0]},), got {tuple(gt_labels.shape)}")
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    same_class = labels[:, None] == gt_labels[None, :]
    if "iscrowd" in target:
        same_class &= target["iscrowd"].to(boxes.device)[None, :] == 0
    iou = box_iou(boxes, gt_boxes).masked_fill(~same_class, 0.0)
    return iou.amax(dim=1)


def match_to_ground_truth(
    detections: Mapping | Sequence[Mapping],
    targets: Mapping | Sequence[Mapping],
) -> Tensor | list[Tensor]:
    """True IoU of every box: its best IoU with a ground truth of the same class (0 if none).

    Crowd ground truths (``iscrowd == 1``) are not matched.

    Args:
        detections: one image's dict with ``boxes`` (N, 4) and ``labels`` (N,), or a list of them
            (paired with ``targets`` by ``image_id`` when they have one, else by position).
        targets: the matching target dict(s) with ``boxes`` (M, 4) and ``labels`` (M,), or a data
            set with a ``target(i)`` method.

    Returns:
        (N,) IoU for one image, or a list of them.
    """
    if isinstance(detections, Mapping):
        if not isinstance(targets, Mapping):
            raise ValueError("targets must be a dict when detections is a dict")
        return _match_one(detections, targets)
    return [_match_one(d, t) for d, t in pair_with_targets(detections, targets)]


def signal_values(cand: Mapping, signal: str) -> Tensor | None:
    """The values (N,) of a confidence signal in one image's candidates; None when they lack its ``quality``."""
    scores, quality = cand.get("scores"), cand.get("quality")
    if signal == "score":
        return scores
    if quality is None:
        return None
    if signal == "quality":
        return quality
    return torch.sqrt(scores.clamp(0, 1) * quality.to(scores.dtype).clamp(0, 1))


def matched_signals(
    candidates: Sequence[Mapping], gts: Any, signals: Sequence[str], min_iou: float, min_score: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """True IoU (M,) of the matched candidates (IoU > min_iou, score >= min_score) and each signal (M,)."""
    for s in signals:
        if s not in CONFIDENCE_SIGNALS:
            raise ValueError(f"signals: {s!r} is not one of {CONFIDENCE_SIGNALS}")
    if not (isinstance(min_iou, (int, float)) and 0.0 <= min_iou < 1.0):
        raise ValueError(f"min_iou must be a number in [0, 1), got {min_iou!r}")
    ious: list[Tensor] = []
    values: dict[str, list[Tensor]] = {s: [] for s in signals}
    present: dict[str, set[bool]] = {s: set() for s in signals}
    for i, (cand, target) in enumerate(pair_with_targets(candidates, gts)):
        if "scores" not in cand:
            raise ValueError(f"candidates[{i}] needs 'scores'")
        true_iou = _match_one(cand, target)
        keep = (true_iou > min_iou) & (cand["scores"] >= min_score)
        ious.append(true_iou[keep].double().cpu())
        for s in signals:
            v = signal_values(cand, s)
            if cand["boxes"].shape[0] > 0:
                present[s].add(v is not None)
            if v is not None:
                values[s].append(v[keep].double().cpu())
    iou = torch.cat(ious) if ious else torch.zeros(0, dtype=torch.float64)
    out: dict[str, Tensor] = {}
    for s in signals:
        if present[s] == {True, False}:
            raise ValueError(f"some candidates have the fields of signal {s!r} and some do not")
        if False in present[s] or not values[s]:
            logger.warning("signal %r skipped: the candidates have no 'quality'", s)
            continue
        out[s] = torch.cat(values[s])
    return iou, out
