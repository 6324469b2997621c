"""Box algebra: IoU, Purity, Integrity, delta encoding, clipping and validation.

Boxes are ``(x1, y1, x2, y2)`` float tensors in absolute pixels with continuous coordinates:
the area of a box is ``(x2 - x1) * (y2 - y1)`` (no ``+1``). Every function works on the caller's
device, is vectorised, and is differentiable wherever the maths is. Degenerate (zero-area) boxes
never produce NaN: every ratio whose denominator is zero is defined as 0.

Two delta parameterisations: :func:`encode_boxes` (Faster R-CNN's centre/log-size deltas) and
:func:`encode_corners` (KL-Loss's per-corner offsets, Eq. 1 of He et al. 2019, in which a
variance per coordinate is meaningful). :func:`jitter_boxes` samples training boxes around ground
truth, balanced over IoU bins, as IoU-Net trains its IoU predictor.

Purity and Integrity are the two halves of IoU introduced by Decoupled IoU Regression (DIR,
seed 002): for a box ``b`` and its ground truth ``g``,

    purity    P = area(b ∩ g) / area(b)
    integrity I = area(b ∩ g) / area(g)
    IoU       = 1 / (1/P + 1/I - 1)        (Eq. 5 of the DIR paper; 0 where P or I is 0)
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_boxes",
    "box_area",
    "box_iou",
    "box_purity",
    "box_integrity",
    "elementwise_box_iou",
    "elementwise_purity",
    "elementwise_integrity",
    "iou_from_purity_integrity",
    "encode_boxes",
    "decode_boxes",
    "clip_boxes",
    "encode_corners",
    "decode_corners",
    "jitter_boxes",
]

def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, never a size here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Largest log-scale change a decoded delta may apply (as in torchvision / Detectron).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def check_boxes(boxes: Tensor, name: str = "boxes", allow_degenerate: bool = True) -> Tensor:
    """Validate a box tensor and return it unchanged.

    Args:
        boxes: (N, 4) floating tensor ``(x1, y1, x2, y2)``.
        name: the argument's name, used in error messages.
        allow_degenerate: accept zero-width or zero-height boxes.

    Raises:
        ValueError: when ``boxes`` is not a floating (N, 4) tensor, holds NaN or inf, or has
            ``x2 < x1`` or ``y2 < y1`` (or ``<=`` when degenerate boxes are not allowed).
    """
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {boxes.dtype}")
    _check_not_meta(boxes, name)
    if boxes.numel() == 0 or tracing():
        return boxes
    # One fused reduction and a single host synchronisation for all checks.
    finite = torch.isfinite(boxes).all()
    wh = boxes[:, 2:] - boxes[:, :2]
    ordered = (wh >= 0).all() if allow_degenerate else (wh > 0).all()
    ok = torch.stack([finite, ordered]).tolist()
    if not ok[0]:
        raise ValueError(f"{name} contains NaN or inf")
    if not ok[1]:
        rel = ">=" if allow_degenerate else ">"
        raise ValueError(f"{name} must satisfy x2 {rel} x1 and y2 {rel} y1")
    return boxes


def tracing() -> bool:
    """Inside ``torch.export`` / ``torch.compile`` / ``torch.jit.trace`` (:mod:`locconf.export`): the
    value checks, which read the data on the host, are left out of the graph."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_not_meta(tensor: Tensor, name: str) -> None:
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data); move it to a real device first")


def _check_deltas(deltas: Tensor, reference: Tensor, name: str) -> None:
    """``deltas`` must be a floating (N, 4 * K) tensor with N the number of reference boxes."""
    if not isinstance(deltas, Tensor) or deltas.dim() != 2 or deltas.shape[1] % 4 != 0 \
            or deltas.shape[0] != reference.shape[0]:
        shape = tuple(deltas.shape) if isinstance(deltas, Tensor) else type(deltas).__name__
        raise ValueError(f"{name} must have shape (N, 4*K) with N={reference.shape[0]}, got {shape}")
    if not deltas.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {deltas.dtype}")
    _check_not_meta(deltas, name)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0`` and 0 elsewhere, with finite gradients everywhere."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box. ``boxes`` (N, 4) -> (N,)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _elementwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


def _check_pair(boxes1: Tensor, boxes2: Tensor, names: tuple[str, str], same_length: bool) -> None:
    check_boxes(boxes1, names[0])
    check_boxes(boxes2, names[1])
    if same_length and boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got {boxes1.shape[0]} and {boxes2.shape[0]}"
        )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU. ``boxes1`` (N, 4), ``boxes2`` (M, 4) -> (N, M); 0 where the union is empty."""
    _check_pair(boxes1, boxes2, ("boxes1", "boxes2"), same_length=False)
    inter = _pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return _safe_div(inter, union)


def box_purity(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Pairwise Purity, overlap / area(box). ``boxes`` (N, 4), ``gt_boxes`` (M, 4) -> (N, M)."""
    _check_pair(boxes, gt_boxes, ("boxes", "gt_boxes"), same_length=False)
    return _safe_div(_pairwise_intersection(boxes, gt_boxes), box_area(boxes)[:, None])


def box_integrity(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Pairwise Integrity, overlap / area(ground truth). (N, 4), (M, 4) -> (N, M)."""
    _check_pair(boxes, gt_boxes, ("boxes", "gt_boxes"), same_length=False)
    return _safe_div(_pairwise_intersection(boxes, gt_boxes), box_area(gt_boxes)[None, :])


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding boxes. ``boxes1``, ``boxes2`` (N, 4) -> (N,)."""
    _check_pair(boxes1, boxes2, ("boxes1", "boxes2"), same_length=True)
    inter = _elementwise_intersection(boxes1, boxes2)
    return _safe_div(inter, box_area(boxes1) + box_area(boxes2) - inter)


def elementwise_purity(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Purity of each box against its own ground truth. (N, 4), (N, 4) -> (N,)."""
    _check_pair(boxes, gt_boxes, ("boxes", "gt_boxes"), same_length=True)
    return _safe_div(_elementwise_intersection(boxes, gt_boxes), box_area(boxes))


def elementwise_integrity(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Integrity of each box against its own ground truth. (N, 4), (N, 4) -> (N,)."""
    _check_pair(boxes, gt_boxes, ("boxes", "gt_boxes"), same_length=True)
    return _safe_div(_elementwise_intersection(boxes, gt_boxes), box_area(gt_boxes))


def iou_from_purity_integrity(purity: Tensor, integrity: Tensor) -> Tensor:
    """Recombine IoU from Purity and Integrity (DIR, Eq. 5): ``1 / (1/P + 1/I - 1)``.

    Written as ``P*I / (P + I - P*I)`` so that it is finite and differentiable for every
    ``P, I`` in [0, 1]; 0 where P or I is 0. Any broadcastable shapes.
    """
    if purity.shape != integrity.shape:
        purity, integrity = torch.broadcast_tensors(purity, integrity)
    prod = purity * integrity
    return _safe_div(prod, purity + integrity - prod)


def encode_boxes(
    boxes: Tensor, reference: Tensor, weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
) -> Tensor:
    """Faster R-CNN deltas that turn ``reference`` boxes into ``boxes``.

    ``dx = wx * (cx - cx_r) / w_r``, ``dw = ww * log(w / w_r)`` (and likewise for y, h).

    Args:
        boxes: (N, 4) target boxes (e.g. ground truth), positive width and height.
        reference: (N, 4) reference boxes (e.g. proposals), positive width and height.
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        (N, 4) deltas ``(dx, dy, dw, dh)``.
    """
    _check_pair(boxes, reference, ("boxes", "reference"), same_length=True)
    wx, wy, ww, wh = weights
    rw = reference[:, 2] - reference[:, 0]
    rh = reference[:, 3] - reference[:, 1]
    rcx = reference[:, 0] + 0.5 * rw
    rcy = reference[:, 1] + 0.5 * rh
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    if boxes.numel() and not bool(((rw > 0) & (rh > 0) & (w > 0) & (h > 0)).all()):
        raise ValueError("encode_boxes needs boxes and reference with positive width and height")
    return torch.stack(
        [wx * (cx - rcx) / rw, wy * (cy - rcy) / rh, ww * torch.log(w / rw), wh * torch.log(h / rh)], dim=1
    )


def decode_boxes(
    deltas: Tensor,
    reference: Tensor,
    weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> Tensor:
    """Apply Faster R-CNN deltas to ``reference`` boxes (the inverse of :func:`encode_boxes`).

    Args:
        deltas: (N, 4 * K) deltas, K boxes per reference (e.g. one per class).
        reference: (N, 4) reference boxes.
        weights: ``(wx, wy, ww, wh)``.
        scale_clamp: upper bound on ``dw / ww`` and ``dh / wh`` so that ``exp`` cannot overflow.

    Returns:
        (N, 4 * K) decoded boxes.
    """
    check_boxes(reference, "reference")
    _check_deltas(deltas, reference, "deltas")
    wx, wy, ww, wh = weights
    rw = (reference[:, 2] - reference[:, 0])[:, None]
    rh = (reference[:, 3] - reference[:, 1])[:, None]
    rcx = reference[:, 0:1] + 0.5 * rw
    rcy = reference[:, 1:2] + 0.5 * rh
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    cx, cy = dx * rw + rcx, dy * rh + rcy
    w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
    out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=2)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip boxes to an image. ``boxes`` (N, 4), ``image_size`` ``(height, width)`` -> (N, 4)."""
    if len(image_size) != 2 or not all(_is_real(v) and v >= 0 for v in image_size):
        raise ValueError(f"image_size must be (height, width) with non-negative sizes, got {image_size}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must have shape (N, 4), got {shape}")
    h, w = image_size
    x = boxes[:, 0::2].clamp(min=0, max=w)
    y = boxes[:, 1::2].clamp(min=0, max=h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def encode_corners(boxes: Tensor, reference: Tensor, weight: float = 10.0) -> Tensor:
    """Corner offsets of KL-Loss (Eq. 1 of He et al. 2019) that turn ``reference`` into ``boxes``.

    ``t_x1 = weight * (x1 - x1_r) / w_r``, ``t_x2 = weight * (x2 - x2_r) / w_r`` (and likewise for
    y with the reference height). Linear in the coordinates, so a variance predicted for ``t`` is a
    variance of the coordinate itself, scaled by ``(w_r / weight)**2``.

    Args:
        boxes: (N, 4) target boxes.
        reference: (N, 4) reference boxes (proposals) with positive width and height.
        weight: scale of the offsets (10 keeps them near the magnitude of Faster R-CNN's deltas).

    Returns:
        (N, 4) offsets ``(t_x1, t_y1, t_x2, t_y2)``.
    """
    _check_pair(boxes, reference, ("boxes", "reference"), same_length=True)
    wh = (reference[:, 2:] - reference[:, :2]).repeat(1, 2)
    if reference.numel() and not bool((wh > 0).all()):
        raise ValueError("encode_corners needs reference boxes with positive width and height")
    return weight * (boxes - reference) / wh


def decode_corners(offsets: Tensor, reference: Tensor, weight: float = 10.0) -> Tensor:
    """Inverse of :func:`encode_corners`: ``offsets`` (N, 4 * K), ``reference`` (N, 4) -> (N, 4 * K)."""
    check_boxes(reference, "reference")
    _check_deltas(offsets, reference, "offsets")
    k = offsets.shape[1] // 4
    wh = (reference[:, 2:] - reference[:, :2]).repeat(1, 2)
    return (offsets.view(-1, k, 4) * (wh / weight)[:, None] + reference[:, None]).reshape(offsets.shape)


def jitter_boxes(
    gt_boxes: Tensor,
    num_per_box: int = 16,
    bins: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    max_shift: float = 0.25,
    oversample: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Random boxes around each ground-truth box, balanced over IoU bins (IoU-Net's training boxes).

    For each box, ``oversample * num_per_box`` candidates are drawn by moving every coordinate by
    a uniform offset in ``[-s, s]`` times the box width or height, with ``s`` itself uniform in
    ``[0, max_shift]`` per candidate (so that near-perfect boxes are drawn often enough to fill
    the top bin); candidates are
    binned by their IoU with the box they came from, and up to ``ceil(num_per_box / n_bins)``
    are kept per bin (a bin with too few candidates leaves its share empty, so the result can hold
    fewer boxes). Everything is vectorised: one sort ranks the candidates within their
    (box, bin) group.

    Args:
        gt_boxes: (M, 4) boxes with positive width and height.
        num_per_box: boxes wanted per ground-truth box.
        bins: increasing IoU bin edges; candidates outside ``[bins[0], bins[-1]]`` are discarded.
        max_shift: largest offset of a coordinate, as a fraction of the box's width/height.
        oversample: candidates drawn per wanted box.
        generator: random generator on the boxes' device (for reproducible draws).

    Returns:
        ``(boxes (K, 4), source (K,) int64)``: the sampled boxes and the index of the ground-truth
        box each was drawn around, with ``K <= M * n_bins * ceil(num_per_box / n_bins)``.
    """
    check_boxes(gt_boxes, "gt_boxes")
    edges = torch.as_tensor(list(bins), dtype=gt_boxes.dtype, device=gt_boxes.device)
    if edges.dim() != 1 or edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"bins must be at least two increasing IoU edges, got {tuple(bins)}")
    if not (_is_int(num_per_box) and _is_int(oversample) and num_per_box >= 1 and oversample >= 1):
        raise ValueError(f"num_per_box and oversample must be ints >= 1, got {num_per_box!r}, {oversample!r}")
    if not (_is_real(max_shift) and max_shift > 0 and math.isfinite(max_shift)):
        raise ValueError(f"max_shift must be a positive finite number, got {max_shift!r}")
    m, dev = gt_boxes.shape[0], gt_boxes.device
    n_bins = edges.numel() - 1
    per_bin = -(-num_per_box // n_bins)
    n = oversample * num_per_box
    if m == 0:
        return gt_boxes.new_zeros((0, 4)), torch.zeros(0, dtype=torch.int64, device=dev)
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).repeat(1, 2)  # (M, 4)
    noise = torch.rand((m, n, 4), generator=generator, device=dev, dtype=gt_boxes.dtype) * 2 - 1
    scale = torch.rand((m, n, 1), generator=generator, device=dev, dtype=gt_boxes.dtype) * max_shift
    cand = gt_boxes[:, None] + noise * scale * wh[:, None]
    x1, x2 = torch.minimum(cand[..., 0], cand[..., 2]), torch.maximum(cand[..., 0], cand[..., 2])
    y1, y2 = torch.minimum(cand[..., 1], cand[..., 3]), torch.maximum(cand[..., 1], cand[..., 3])
    cand = torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4)
    source = torch.arange(m, device=dev).repeat_interleave(n)
    iou = elementwise_box_iou(cand, gt_boxes[source])
    bin_id = torch.bucketize(iou, edges, right=True) - 1  # edges[b] <= iou < edges[b+1]
    bin_id = torch.where(iou == edges[-1], torch.full_like(bin_id, n_bins - 1), bin_id)
    valid = (bin_id >= 0) & (bin_id < n_bins)
    group = torch.where(valid, source * n_bins + bin_id, torch.full_like(source, m * n_bins))
    # random order inside each group: sort by (group, random key), then rank = position - group start
    key = torch.rand(group.shape, generator=generator, device=dev, dtype=torch.float64)
    order = torch.argsort(group.double() + key)
    g_sorted = group[order]
    counts = torch.bincount(g_sorted, minlength=m * n_bins + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(g_sorted.numel(), device=dev) - starts[g_sorted]
    keep = order[(rank < per_bin) & (g_sorted < m * n_bins)]
    keep = keep.sort().values
    return cand[keep], source[keep]
