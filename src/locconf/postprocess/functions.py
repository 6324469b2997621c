"""The public post-processing functions: the NMS family, each validating its own arguments.

Each takes the fields of one image's candidates (:mod:`locconf.candidates`): ``boxes`` (N, 4),
``scores`` (N,), optional ``labels`` (N,) (suppression is then per class) and the signal it uses,
and returns the kept indices in selection
order with the output scores (and boxes, where the method changes them).
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ..candidates import check_fields
from .checks import _check_backend, _check_positive, _check_threshold, _compute_dtype, _empty_long
from .greedy import _greedy, _hard_nms
from .modes import _GAUSSIAN, _HARD, _SOFT_MODES


def _check_args(iou_threshold: float, backend: Optional[str], fractions: tuple = (), positives: tuple = (),
                non_negatives: tuple = ()) -> None:
    """Validate a method's own arguments, in this order: ``iou_threshold`` and each ``(value, name)``
    of ``fractions`` in [0, 1], of ``positives`` positive and finite, of ``non_negatives`` in
    [0, inf], then ``backend``."""
    _check_threshold(iou_threshold, "iou_threshold")
    for value, name in fractions:
        _check_threshold(value, name)
    for value, name in positives:
        _check_positive(value, name)
    for value, name in non_negatives:
        _check_threshold(value, name, 0.0, math.inf)
    _check_backend(backend)


def nms(boxes: Tensor, scores: Tensor, labels: Optional[Tensor] = None, iou_threshold: float = 0.5,
        backend: Optional[str] = None) -> Tensor:
    """Hard NMS: suppress a box whose IoU with a kept box is greater than ``iou_threshold``.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). labels: optional (N,) integer classes (per-class NMS).
        iou_threshold: in [0, 1].
        backend: ``"numba"`` (CPU kernel), ``"torch"`` (torchvision / vectorised rounds) or None
            (by device).

    Returns:
        (K,) int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    check_fields(boxes, scores, labels)
    _check_args(iou_threshold, backend)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device)
    return _hard_nms(boxes, scores, labels, iou_threshold, backend)


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Optional[Tensor] = None,
    method: str = "gaussian",
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017), exact.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). labels: optional (N,) integer classes.
        method: ``"linear"`` (decay by ``1 - IoU`` where ``IoU >= iou_threshold``) or
            ``"gaussian"`` (decay by ``exp(-IoU^2 / sigma)``, no threshold).
        iou_threshold: linear decay threshold. sigma: Gaussian width.
        min_score: a box is dropped once its (decayed) score is below this.
        backend: ``"numba"`` (the CPU kernel, for inputs on any device), ``"torch"`` (vectorised
            rounds on the inputs' device) or None (numba; measured in ``greedy._greedy``).

    Returns:
        ``(keep, new_scores)``: (K,) int64 indices in selection order and their (K,) decayed
        scores, which are non-increasing.
    """
    check_fields(boxes, scores, labels)
    if method not in _SOFT_MODES:
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    _check_args(iou_threshold, backend, positives=((sigma, "sigma"),), non_negatives=((min_score, "min_score"),))
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    cd = _compute_dtype(boxes)
    sel, sel_scores, _, _ = _greedy(boxes.to(cd), scores.to(cd), labels, _SOFT_MODES[method],
                                    iou_threshold, sigma, min_score, backend=backend)
    return sel, sel_scores.to(scores.dtype)


def iou_guided_nms(
    boxes: Tensor,
    scores: Tensor,
    quality: Tensor,
    labels: Optional[Tensor] = None,
    iou_threshold: float = 0.5,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """IoU-guided NMS (IoU-Net, Algorithm 1).

    Boxes are ranked by the predicted localization ``quality``; hard NMS at ``iou_threshold``;
    every kept box takes the maximum classification score of the boxes it suppresses, itself
    included.

    Args:
        boxes: (N, 4). scores: (N,) classification scores. quality: (N,) predicted IoU.
        labels: optional (N,) classes.

    Returns:
        ``(keep, new_scores)``: (K,) indices in selection (quality) order and (K,) scores.
    """
    check_fields(boxes, scores, labels, quality=quality)
    _check_args(iou_threshold, backend)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    cd = _compute_dtype(boxes)
    sel, _, dropper, _ = _greedy(boxes.to(cd), quality.to(cd), labels, _HARD, iou_threshold, backend=backend)
    suppressed = dropper >= 0
    cluster_max = scores.clone().scatter_reduce(0, dropper[suppressed], scores[suppressed], reduce="amax")
    return sel, cluster_max[sel]


def quality_nms(
    boxes: Tensor,
    scores: Tensor,
    quality: Tensor,
    labels: Optional[Tensor] = None,
    iou_threshold: float = 0.5,
    weight: float = 0.5,
    soft: Optional[str] = None,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Quality-ranked NMS (DIR, PAA, FCOS): rank and score by ``scores^(1-weight) * quality^weight``.

    ``weight=0.5`` is the geometric mean ``sqrt(cls * IoU)``. Scores and quality are clamped to
    [0, 1] before combining. Hard NMS at ``iou_threshold`` unless ``soft`` is ``"linear"`` or
    ``"gaussian"``, which applies :func:`soft_nms` to the combined score instead.

    Returns:
        ``(keep, new_scores)``: (K,) indices in selection order and their (K,) combined scores.
    """
    check_fields(boxes, scores, labels, quality=quality)
    _check_args(iou_threshold, backend, fractions=((weight, "weight"),), positives=((sigma, "sigma"),),
                non_negatives=((min_score, "min_score"),))
    if soft not in (None, "linear", "gaussian"):
        raise ValueError(f"soft must be None, 'linear' or 'gaussian', got {soft!r}")
    combined = scores.clamp(0, 1) ** (1 - weight) * quality.to(scores.dtype).clamp(0, 1) ** weight
    if soft is not None:
        return soft_nms(boxes, combined, labels, method=soft, iou_threshold=iou_threshold, sigma=sigma,
                        min_score=min_score, backend=backend)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    keep = _hard_nms(boxes, combined, labels, iou_threshold, backend)
    return keep, combined[keep]


def var_voting(
    boxes: Tensor,
    scores: Tensor,
    variances: Tensor,
    labels: Optional[Tensor] = None,
    iou_threshold: float = 0.5,
    sigma_t: float = 0.02,
    suppression: str = "hard",
    soft_sigma: float = 0.5,
    min_score: float = 1e-3,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Variance voting (KL-Loss, He et al. 2019) with hard or Gaussian-soft suppression.

    Each selected box becomes the per-coordinate weighted mean of the remaining same-class
    candidates that overlap it (IoU > 0, itself included), weights ``p / variance`` with
    ``p = exp(-(1 - IoU)^2 / sigma_t)``. Suppression uses the original boxes: hard NMS at
    ``iou_threshold``, or Gaussian Soft-NMS (``soft_sigma``, ``min_score``).

    Args:
        boxes: (N, 4). scores: (N,). variances: (N, 4) positive predicted variances sigma^2
            of ``(x1, y1, x2, y2)``. labels: optional (N,) classes.
        sigma_t: voting temperature. Default 0.02, the value this library has attributed to the
            paper since its start and the one the PyTorch reimplementation
            github.com/cxliu0/KL-Loss-pytorch uses (``var_sigma_t=0.02``, a training that "follows
            the original paper"); the paper's own text could not be read from here to confirm it.
            The authors' released code (github.com/ethanhe42/KL-Loss) uses **0.01**:
            ``detectron/core/config.py`` sets ``__C.STD.IOU_SIGMA = .01`` and
            ``detectron/utils/py_cpu_nms.py`` votes with ``exp(-(1 - IoU)^2 / cfg.STD.IOU_SIGMA)``;
            its README's variance-voting numbers (39.2 AP, R-50-FPN 2x) come from that code. Pass
            ``sigma_t=0.01`` to reproduce the released code. A smaller value concentrates the vote
            on the boxes that overlap the selected one most. Measured on locconf's synthetic KL-Loss
            detectors (2 seeds, ``benchmarks/results/sigma_t_synthetic.md``), 0.02 gives 1.1-1.2 AP and
            2.7-3.0 AP90 more than 0.01 (hard / soft suppression), and 0.04 another 0.6-0.8 AP; on one
            pretrained NEON KL-Loss detector (``sigma_t_neon.md``) 0.02 gives +0.5 AP over 0.01.
        suppression: ``"hard"`` or ``"soft"``.

    Returns:
        ``(keep, new_boxes, new_scores)``: (K,) indices, (K, 4) voted boxes, (K,) scores.
    """
    check_fields(boxes, scores, labels, variances=variances)
    _check_args(iou_threshold, backend, positives=((sigma_t, "sigma_t"), (soft_sigma, "soft_sigma")),
                non_negatives=((min_score, "min_score"),))
    if suppression not in ("hard", "soft"):
        raise ValueError(f"suppression must be 'hard' or 'soft', got {suppression!r}")
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), boxes.new_empty(0, 4), scores.new_empty(0)
    cd = _compute_dtype(boxes)
    mode, floor = (_HARD, -math.inf) if suppression == "hard" else (_GAUSSIAN, min_score)
    sel, sel_scores, _, voted = _greedy(boxes.to(cd), scores.to(cd), labels, mode, iou_threshold, soft_sigma,
                                        floor, variances=variances.to(cd), sigma_t=sigma_t, backend=backend)
    return sel, voted.to(boxes.dtype), sel_scores.to(scores.dtype)
