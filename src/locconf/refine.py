"""Optimization-based box refinement (IoU-Net, Jiang et al. ECCV 2018, Sec. 3.3, Algorithm 2).

Algorithm 2, as the paper states it, for boxes ``B``, ``T`` steps, step size ``lambda``, early-stop
threshold ``Omega_1`` and localization-degeneration tolerance ``Omega_2``::

    A <- {}                                              # boxes that have stopped
    for i = 1..T:
        for b_j in B, b_j not in A:
            grad      <- d IoU(PrPool(F, b_j)) / d b_j
            PrevScore <- IoU(PrPool(F, b_j))
            b_j       <- b_j + lambda * scale(grad, b_j)   # scale: x by the width, y by the height
            NewScore  <- IoU(PrPool(F, b_j))
            if |PrevScore - NewScore| < Omega_1 or NewScore - PrevScore < Omega_2:
                A <- A + {b_j}
    return B

A box that stops keeps its last position, also when that step lowered its score (the step is not
undone). Here ``Omega_1 = min_gain`` and ``Omega_2 = -max_drop``: a box stops when its score
changed by less than ``min_gain`` or fell by more than ``max_drop``. The paper's values of
``Omega_1`` and ``Omega_2`` are not known to us; the defaults 1e-3 and -1e-2 are those of the
MMDetection reimplementation github.com/thisisi3/OpenMMLab-IoUNet (``omega_1=0.001``,
``omega_2=-0.01``), which applies the same rule and likewise keeps the moved box.

``keep_best=True`` is our variant (the former behaviour): a step that drops the score by more than
``max_drop`` is undone (and the box stops), and each box returns the best-scoring box it visited,
so a returned score is never below the input's.

In a detector ``score_fn`` pools features of the boxes with :func:`locconf.prroi_pool.prroi_pool`
(continuous in the box coordinates) and runs the IoU head; any differentiable per-box score works.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["RefineResult", "refine_boxes"]


class RefineResult(NamedTuple):
    """Output of :func:`refine_boxes`.

    boxes: (K, 4) each box where Algorithm 2 left it (``keep_best=True``: the best-scoring box it
        visited, the input box when no step helped).
    scores: (K,) ``score_fn`` of those boxes.
    steps: (K,) int64 number of gradient steps each box took, the one that stopped it included
        (``keep_best=True``: a step undone by the ``max_drop`` rule is not counted).
    """

    boxes: Tensor
    scores: Tensor
    steps: Tensor


def _sanitize(boxes: Tensor, min_size: float, image_size: tuple[float, float] | None) -> Tensor:
    """Clip to the image and keep ``x2 - x1 >= min_size``, ``y2 - y1 >= min_size``. (K, 4) -> (K, 4)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    if image_size is not None:
        h, w = float(image_size[0]), float(image_size[1])
        x1, x2 = x1.clamp(0.0, w), x2.clamp(0.0, w)
        y1, y2 = y1.clamp(0.0, h), y2.clamp(0.0, h)

    def grow(a: Tensor, b: Tensor, limit: float | None) -> tuple[Tensor, Tensor]:
        size = min_size if limit is None else min(min_size, limit)
        small = (b - a) < size
        lo = (a + b) / 2 - size / 2
        if limit is not None:
            lo = lo.clamp(0.0, limit - size)
        return torch.where(small, lo, a), torch.where(small, lo + size, b)

    x1, x2 = grow(x1, x2, None if image_size is None else float(image_size[1]))
    y1, y2 = grow(y1, y2, None if image_size is None else float(image_size[0]))
    return torch.stack([x1, y1, x2, y2], dim=1)


def _score_and_grad(score_fn: Callable[[Tensor], Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
    b = boxes.detach().requires_grad_(True)
    score = score_fn(b)
    if score.shape != (b.shape[0],):
        raise ValueError(f"score_fn must return a (K,) tensor, got {tuple(score.shape)} for K={b.shape[0]}")
    (grad,) = torch.autograd.grad(score.sum(), b, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(b)
    return score.detach(), grad


def refine_boxes(
    score_fn: Callable[[Tensor], Tensor],
    boxes: Tensor,
    steps: int = 5,
    step_size: float = 0.5,
    min_gain: float = 1e-3,
    max_drop: float = 1e-2,
    image_size: tuple[float, float] | None = None,
    min_size: float = 1.0,
    keep_best: bool = False,
) -> RefineResult:
    """Refine boxes by gradient ascent of a differentiable score (IoU-Net's predicted IoU).

    Each step moves every active box by ``step_size * grad * (w, h, w, h)`` (the gradient of the
    score with respect to x1 and x2 scaled by the box width, y1 and y2 by its height), then keeps it
    valid (ours: ``x2 - x1`` and ``y2 - y1`` at least ``min_size``, inside ``[0, w] x [0, h]`` when
    ``image_size=(h, w)`` is given). With ``gain = new score - old score`` a box stops when
    ``|gain| < min_gain`` or ``gain < -max_drop`` (Algorithm 2's rule, see the module docstring);
    otherwise it continues, also after a small drop. By default each box returns where it stopped
    (the paper). With ``keep_best=True`` a step with ``gain < -max_drop`` is undone instead and
    each box returns the best-scoring box it visited (never below the input box's score).

    ``score_fn(boxes (K, 4)) -> (K,)`` must score each box independently (the gradient of the sum
    is used). It is called ``steps + 1`` times, always on all K boxes (stopped boxes are held
    still), so the loop never synchronises with the host. Gradients are enabled internally, so this
    works inside ``torch.no_grad()`` (not inside ``torch.inference_mode()``); parameters used by
    ``score_fn`` receive no gradient. The input is not modified.

    Args:
        score_fn: differentiable per-box score.
        boxes: (K, 4) ``(x1, y1, x2, y2)`` in pixels.
        steps: maximum number of steps T (5 in IoU-Net).
        step_size: lambda (0.5 in IoU-Net).
        min_gain: Omega_1, convergence threshold on the score change.
        max_drop: ``-Omega_2``, largest tolerated score drop.
        image_size: optional (h, w) to clip to.
        min_size: smallest width and height kept, in pixels.
        keep_best: our variant (undo a step that drops more than ``max_drop``, return the best box
            visited) instead of the paper's rule.

    Returns:
        :class:`RefineResult` ``(boxes (K, 4), scores (K,), steps (K,) int64)``.
    """
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a (K, 4) tensor, got {shape}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating-point tensor, got {boxes.dtype}")
    if steps < 0 or step_size < 0 or min_gain < 0 or max_drop < 0 or min_size < 0:
        raise ValueError("steps, step_size, min_gain, max_drop and min_size must be non-negative")
    if not isinstance(keep_best, bool):
        raise ValueError(f"keep_best must be a bool, got {keep_best!r}")
    if image_size is not None and (len(image_size) != 2 or min(float(s) for s in image_size) <= 0):
        raise ValueError(f"image_size must be a positive (h, w), got {image_size!r}")
    k = boxes.shape[0]
    count = torch.zeros(k, dtype=torch.int64, device=boxes.device)
    if k == 0:
        return RefineResult(boxes.detach().clone(), boxes.new_zeros((0,)), count)

    with torch.enable_grad():
        current = boxes.detach().clone()
        score, grad = _score_and_grad(score_fn, current)
        best_boxes, best_score = current.clone(), score.clone()
        active = torch.ones(k, dtype=torch.bool, device=boxes.device)
        for _ in range(steps):
            wh = (current[:, 2:] - current[:, :2]).repeat(1, 2)  # (K, 4): w, h, w, h
            proposal = _sanitize(current + step_size * grad * wh, min_size, image_size)
            proposal = torch.where(active[:, None], proposal, current)
            new_score, new_grad = _score_and_grad(score_fn, proposal)
            gain = new_score - score
            degenerated = gain < -max_drop
            moved = active & ~degenerated if keep_best else active  # the paper keeps every step
            count = count + moved.long()
            better = moved & (new_score > best_score)
            best_boxes = torch.where(better[:, None], proposal, best_boxes)
            best_score = torch.where(better, new_score, best_score)
            current = torch.where(moved[:, None], proposal, current)
            score = torch.where(moved, new_score, score)
            grad = torch.where(moved[:, None], new_grad, grad)
            active = moved & (gain.abs() >= min_gain) & ~degenerated
    if keep_best:
        return RefineResult(best_boxes, best_score, count)
    return RefineResult(current, score, count)
