"""Losses of the dense (one-stage) detectors, as pure functions with documented shapes.

* :func:`sigmoid_focal_loss`: Focal Loss (Lin et al., RetinaNet, 2017, Sec. 3.2) on binary targets,
  the classification loss of ATSS.
* :func:`quality_focal_loss`: Quality Focal Loss (Li et al., Generalized Focal Loss, NeurIPS 2020,
  Sec. 3.2): focal-weighted binary cross-entropy against a *soft* target ``y`` in [0, 1] (the IoU
  of the predicted box for the positive class, 0 elsewhere), weighted by ``|y - sigma|^beta``.
  It takes logits (GFL) or probabilities.
* :func:`joint_quality_focal_loss`: the same loss for a product score ``J = sigmoid(c) * sigmoid(q)``
  (CLQ's joint score), computed in log space from the two logits, so it is exact, finite and has
  gradients for every ``J`` (no clamp of ``J``).
* :func:`distribution_focal_loss`: Distribution Focal Loss (GFL, Sec. 3.3, Eq. 6) of a discretised
  box-side distribution against a continuous target.
* :func:`giou_loss`: ``1 - GIoU`` (Rezatofighi et al., CVPR 2019), the box loss of ATSS and GFL.
* :func:`centerness_loss`: binary cross-entropy of the centerness logits (FCOS / ATSS).
* :func:`clq_loss`: CLQ's loss on the joint classification-localization-quality score plus the
  loss of the predicted IoU that guides it (see :mod:`locconf.models.dense.clq` for the head).

Every loss returns per-element values with ``reduction="none"`` and their sum or mean
otherwise; normalising by the number of positives is the caller's job (as in the papers, which
divide by the number of positive samples). Only shapes are validated (value checks would force
a host synchronisation in the training loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sigmoid_focal_loss",
    "quality_focal_loss",
    "joint_quality_focal_loss",
    "distribution_focal_loss",
    "giou_loss",
    "centerness_loss",
    "clq_loss",
]

_REDUCTIONS = ("none", "sum", "mean")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    return loss


def _check(pred: Tensor, target: Tensor, names: tuple[str, str], reduction: str) -> None:
    for name, t in zip(names, (pred, target)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if pred.shape != target.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {tuple(pred.shape)}, got {tuple(target.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> Tensor:
    """Focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` (RetinaNet, Eq. 5).

    Args:
        logits: (...) classification logits, e.g. (N, K).
        targets: (...) binary targets of the same shape (1 for the positive class).
        alpha: weight of the positives (``1 - alpha`` for the negatives); a negative value
            disables the weighting.
        gamma: focusing parameter.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
    """
    _check(logits, targets, ("logits", "targets"), reduction)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, reduction)


def quality_focal_loss(
    pred: Tensor,
    targets: Tensor,
    beta: float = 2.0,
    from_logits: bool = True,
    reduction: str = "sum",
    eps: float = 1e-6,
) -> Tensor:
    """Quality focal loss ``-|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))`` (GFL, Sec. 3.2).

    Args:
        pred: (N, K) logits (``from_logits=True``) or probabilities ``sigma`` in [0, 1].
        targets: (N, K) soft targets ``y`` in [0, 1]: the localization quality (IoU) at the
            positive class of a positive sample, 0 everywhere else.
        beta: the modulating exponent (2 in GFL).
        from_logits: whether ``pred`` holds logits.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
        eps: ``from_logits=False`` only: the logarithms are evaluated at the probability clamped
            to ``[eps, 1 - eps]``, *straight through*: the clamp bounds the value but passes the
            gradient on unchanged (a plain clamp would stop every gradient below ``eps``, so a
            positive whose score has collapsed could never recover). The modulating factor uses
            the unclamped probability. Where the probability is a product of sigmoids, prefer
            :func:`joint_quality_focal_loss`, which needs no clamp at all.
    """
    _check(pred, targets, ("pred", "targets"), reduction)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if from_logits:
        sigma = torch.sigmoid(pred)
        bce = F.binary_cross_entropy_with_logits(pred, targets, reduction="none")
    else:
        sigma = pred
        safe = pred + (pred.clamp(eps, 1 - eps) - pred).detach()  # clamped value, identity gradient
        bce = -(targets * torch.log(safe) + (1 - targets) * torch.log1p(-safe))
    loss = bce * (targets - sigma).abs() ** beta
    return _reduce(loss, reduction)


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate over the whole range (Maechler 2012).

    Both branches are evaluated on inputs that are safe for them, so neither leaks NaN or inf into
    the gradient of the other. ``a`` is capped at ``-1e-30`` (``1 - exp(a)`` would be 0 in floating
    point above it): that cap, reached only when ``exp(a)`` is 1 to 30 digits, is the only place
    where the gradient stops.
    """
    a = a.clamp(max=-1e-30)
    near = a > -math.log(2.0)
    a_near = torch.where(near, a, torch.full_like(a, -1.0))
    a_far = torch.where(near, torch.full_like(a, -1.0), a)
    return torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def joint_quality_focal_loss(
    cls_logits: Tensor,
    quality_logits: Tensor,
    targets: Tensor,
    beta: float = 2.0,
    reduction: str = "sum",
) -> Tensor:
    """Quality focal loss of the product score ``J = sigmoid(cls_logits) * sigmoid(quality_logits)``.

    ``-|y - J|^beta ((1 - y) log(1 - J) + y log(J))`` (GFL's QFL, Sec. 3.2, applied to a joint score
    that is a product, as CLQ's). Computed in log space: ``log J = logsigmoid(c) + logsigmoid(q)``
    and ``log(1 - J) = log1mexp(log J)``, so the loss and its gradients are exact for every ``J``,
    also for ``J`` far below any clamp threshold (``1e-6``), where a clamp of ``J`` would stop the
    gradient that must raise a positive's score.

    Args:
        cls_logits: (..., K) class logits ``c``.
        quality_logits: logits ``q`` of the quality score, broadcastable to ``cls_logits`` (e.g.
            (..., 1): one quality per sample, shared by its K classes).
        targets: (..., K) soft targets ``y`` in [0, 1].
        beta: the modulating exponent (2 in GFL).
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
    """
    _check(cls_logits, targets, ("cls_logits", "targets"), reduction)
    if not isinstance(quality_logits, Tensor) or not quality_logits.is_floating_point():
        raise ValueError(f"quality_logits must be a floating-point tensor, got "
                         f"{getattr(quality_logits, 'dtype', type(quality_logits).__name__)}")
    try:
        shape = torch.broadcast_shapes(quality_logits.shape, cls_logits.shape)
    except RuntimeError:
        shape = None
    if shape != cls_logits.shape:
        raise ValueError(f"quality_logits {tuple(quality_logits.shape)} must broadcast to the shape of "
                         f"cls_logits {tuple(cls_logits.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    log_j = F.logsigmoid(cls_logits) + F.logsigmoid(quality_logits)
    bce = -(targets * log_j + (1 - targets) * _log1mexp(log_j))
    loss = bce * (targets - torch.exp(log_j)).abs() ** beta
    return _reduce(loss, reduction)


def distribution_focal_loss(logits: Tensor, targets: Tensor, reduction: str = "sum") -> Tensor:
    """Distribution Focal Loss (GFL, Li et al., NeurIPS 2020, Sec. 3.3, Eq. 6).

    A box side is a discrete distribution ``S = softmax(logits)`` over the values ``0, 1, ..., n``;
    for a continuous target ``y`` with ``y_i = floor(y) <= y <= y_i + 1 = y_{i+1}``,

        ``DFL(S_i, S_{i+1}) = -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1})``,

    the cross-entropy at the two values that bracket ``y``, weighted by linear interpolation, so that
    the mass concentrates around ``y`` and the expectation ``sum_j S_j j`` can reach it. Targets
    are clamped to ``[0, n]``; ``y = n`` uses the last two values (weight 0 on ``n - 1``). GFL's code
    keeps targets at most ``n - 0.1`` (its ``bbox2distance``, ``eps=0.1``); the caller does that
    (:mod:`locconf.models.dense.gfl`).

    Args:
        logits: (..., n + 1) logits over the values ``0..n``, ``n >= 1``.
        targets: (...) continuous targets in the same units (e.g. strides).
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.

    Returns:
        (...) per-element losses (or their sum / mean).
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1 or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point (..., n + 1) tensor with n >= 1, got {shape}")
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        raise ValueError(f"targets must be a floating-point tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the last "
                         f"axis), got {tuple(targets.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    n = logits.shape[-1] - 1
    y = targets.clamp(0, n)
    left = y.floor().clamp(max=n - 1)
    w_left, w_right = (left + 1) - y, y - left
    log_p = F.log_softmax(logits, dim=-1)
    idx = left.long().unsqueeze(-1)
    loss = -(w_left * log_p.gather(-1, idx).squeeze(-1) + w_right * log_p.gather(-1, idx + 1).squeeze(-1))
    return _reduce(loss, reduction)


def giou_loss(boxes: Tensor, target_boxes: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` of matched box pairs (Rezatofighi et al. 2019, Algorithm 2).

    Args:
        boxes: (N, 4) predicted boxes ``(x1, y1, x2, y2)``.
        target_boxes: (N, 4) their ground truths.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
        eps: added to the union and the enclosing area (zero-area boxes stay finite).

    Returns:
        (N,) losses in [0, 2] (or their sum / mean).
    """
    _check(boxes, target_boxes, ("boxes", "target_boxes"), reduction)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    wh_pred = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    wh_gt = (target_boxes[:, 2:] - target_boxes[:, :2]).clamp(min=0)
    inter_wh = (torch.minimum(boxes[:, 2:], target_boxes[:, 2:]) - torch.maximum(boxes[:, :2], target_boxes[:, :2]))
    inter = inter_wh.clamp(min=0).prod(dim=1)
    union = wh_pred.prod(dim=1) + wh_gt.prod(dim=1) - inter + eps
    enclose = (torch.maximum(boxes[:, 2:], target_boxes[:, 2:]) - torch.minimum(boxes[:, :2], target_boxes[:, :2]))
    enclose = enclose.clamp(min=0).prod(dim=1) + eps
    giou = inter / union - (enclose - union) / enclose
    return _reduce(1 - giou, reduction)


def centerness_loss(logits: Tensor, targets: Tensor, reduction: str = "sum") -> Tensor:
    """Binary cross-entropy of centerness logits (N,) against centerness targets (N,) in [0, 1]."""
    _check(logits, targets, ("logits", "targets"), reduction)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)


def clq_loss(
    cls_logits: Tensor,
    lqe_logits: Tensor,
    joint_targets: Tensor,
    iou_logits: Tensor,
    iou_targets: Tensor,
    beta: float = 2.0,
    reduction: str = "sum",
) -> tuple[Tensor, Tensor]:
    """CLQ's two classification-side terms (see :mod:`locconf.models.dense.clq` for the sources).

    * the joint classification-localization-quality score ``J = sigmoid(cls) * sigmoid(lqe)``
      (``sigmoid(lqe)`` the LQE score) is trained as one representation, over every sample and
      class, with the quality focal loss against ``y`` = the IoU of the sample's predicted box at
      its class (0 for negatives and the other classes), computed from the logits
      (:func:`joint_quality_focal_loss`: exact, no clamp of ``J``);
    * the predicted IoU that guides the LQE branch is trained on the positive samples with binary
      cross-entropy against the same IoU (IoU-aware single-stage detector, Wu et al. 2020).

    Args:
        cls_logits: (..., K) class logits.
        lqe_logits: LQE logits broadcastable to ``cls_logits`` (e.g. (..., 1)).
        joint_targets: (..., K) soft targets ``y``.
        iou_logits: (P,) predicted-IoU logits of the positive samples.
        iou_targets: (P,) their true IoUs.
        beta: QFL's exponent.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``, applied to both terms.

    Returns:
        ``(joint_loss, iou_loss)``.
    """
    _check(iou_logits, iou_targets, ("iou_logits", "iou_targets"), reduction)
    joint = joint_quality_focal_loss(cls_logits, lqe_logits, joint_targets, beta=beta, reduction=reduction)
    iou = F.binary_cross_entropy_with_logits(iou_logits, iou_targets, reduction=reduction)
    return joint, iou
