"""The greedy core's dispatch between its backends, and hard NMS with a deterministic tie-break."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .modes import _HARD
from .rounds import _greedy_torch


def _greedy(boxes, scores, labels, mode, iou_threshold=0.5, sigma=0.5, min_score=-math.inf,
            variances=None, sigma_t=0.02, backend=None):
    """Dispatch the greedy core. Returns ``(sel, sel_scores, dropper, voted)`` on boxes' device.

    ``backend=None`` runs the numba kernel on every device, CUDA inputs included (one copy to the
    host and one back). Measured on an H200 against its own CPU path (``benchmarks/gpu.py
    postprocess``, benchmarks/results/device/postprocess.md; CPU time without the copies): for
    Soft-NMS, IoU-guided NMS and variance voting the torch rounds backend on the GPU was 2.5 to
    over 20 times slower than the CPU kernel on 1,000-20,000 detector-like boxes of one class (a
    cluster's decay chain is sequential, so its rounds are many and small) and on 1,000 boxes of
    80 classes; only with 80 classes and 20,000 boxes were the two alike (CPU / GPU 0.6-1.7). (One
    cell, Gaussian Soft-NMS on 1,000 boxes, timed the kernel's first CPU call, loading included.)
    ``backend="torch"`` keeps the computation on the caller's device.
    """
    dev = boxes.device
    if backend is None:
        backend = "numba"
    if backend == "numba":
        from .kernel import _greedy_numba  # here: it imports numba (0.2 s), which only this path needs

        out = _greedy_numba(boxes.cpu(), scores.cpu(), None if labels is None else labels.cpu(), mode,
                            iou_threshold, sigma, min_score, None if variances is None else variances.cpu(), sigma_t)
        return tuple(None if t is None else t.to(dev) for t in out)
    return _greedy_torch(boxes, scores, labels, mode, iou_threshold, sigma, min_score, variances, sigma_t)


def _hard_nms(boxes: Tensor, rank_scores: Tensor, labels: Optional[Tensor], iou_threshold: float,
              backend: Optional[str] = None) -> Tensor:
    """Hard NMS ranked by ``rank_scores`` (ties: lower index first), exact for any finite input.

    CPU: the numba kernel. Otherwise torchvision's NMS, classes kept apart by shifting each
    class's boxes, but only where every shifted coordinate is exact (checked with an error-free
    sum), so that every IoU is the unshifted one; else the torch rounds.
    """
    if backend is None:
        backend = "numba" if boxes.device.type == "cpu" else "torch"
    if backend == "numba":
        return _greedy(boxes, rank_scores, labels, _HARD, iou_threshold, backend="numba")[0]
    import torchvision  # here: importing it costs seconds, and only this path needs it

    order = torch.sort(rank_scores, descending=True, stable=True).indices
    surrogate = torch.arange(order.numel(), 0, -1, device=boxes.device, dtype=torch.float64)  # fixes the order
    b = boxes[order].to(torch.float64)
    if labels is None:
        return order[torchvision.ops.nms(b, surrogate, iou_threshold)]
    cls = torch.unique(labels[order], return_inverse=True)[1].to(torch.float64)
    span = (b.max() - b.min()) * (1 + 1e-9) + 1.0  # a class's boxes fit in [b.min(), b.min() + span)
    offset = (cls * span)[:, None]
    shifted = b + offset
    back = shifted - b
    error = (b - (shifted - back)) + (offset - back)  # the exact rounding error of b + offset (TwoSum)
    if bool(torch.isfinite(shifted).all() & (error == 0).all()):
        return order[torchvision.ops.nms(shifted, surrogate, iou_threshold)]
    return _greedy(boxes, rank_scores, labels, _HARD, iou_threshold, backend="torch")[0]
