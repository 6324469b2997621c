"""Precise RoI Pooling (PrRoIPool, IoU-Net), exact and differentiable, on CPU and CUDA.

Each output bin is the exact integral of the bilinearly interpolated feature map over the bin,
divided by the bin's area. Feature pixel ``F[i, j]`` sits at the continuous point ``(x=j, y=i)``
and the map is zero outside, so the interpolant fades linearly to zero over the one pixel beyond
the border (on ``[-1, 0]`` and ``[W-1, W]``) and is exactly zero further out.
A bin of zero area gives 0.

How it is computed (closed form, no sampling). The interpolant is separable,
``f(x, y) = sum_ij F[i, j] k(x - j) k(y - i)`` with ``k`` the hat kernel, so its
antiderivative ``G(x, y) = int_{-inf}^x int_{-inf}^y f`` is the integral of a bilinear spline,
i.e. a *quadratic B-spline interpolation of the 2-D prefix sums* of ``F``::

    P[m, n] = sum_{i < m, j < n} F[i, j]                        (m, n clamped to [0, H], [0, W])
    G(x, y) = sum_{r, s in 0..2} b_r(v) b_s(u) P[floor(y) + r, floor(x) + s]
    b_0(u) = (1 - u)^2 / 2,  b_1(u) = 1/2 + u - u^2,  b_2(u) = u^2 / 2,  u = x - floor(x)

A bin ``[xa, xb] x [ya, yb]`` integrates to ``G(xb, yb) - G(xa, yb) - G(xb, ya) + G(xa, ya)``.
So a box with an ``oh x ow`` output needs ``G`` at its ``(oh+1) x (ow+1)`` bin corners, 9 taps
each, gathered from one channels-last table with ``F.embedding_bag`` (a fused gather and
weighted sum). The cost per box is independent of the box size and the memory is
``O(K * (oh+1) * (ow+1) * C)``, processed in chunks of boxes. The tap weights are polynomials of
the box coordinates built with torch ops; two small autograd Functions (prefix table, gather)
have hand-written backwards (scatter with ``index_add_``, suffix sums), so the gradients with
respect to the features and to the box coordinates are exact (``G`` is C^1 in the coordinates).

Prefix sums grow with the map while a small bin is a tiny difference of them, so the table, the
gather and the corner differences run in float64 whatever the input dtype (float32 prefix sums
give errors of ~1e-7 * |prefix| / bin area, far too large for sub-pixel bins); the output is cast
back to the input dtype. The feature gradient's suffix sums run in the input dtype.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["prroi_pool", "PrRoIPool2d", "MultiScalePrRoIPool", "infer_scales", "map_levels"]

# Bytes allowed for the per-chunk corner tensor (K_chunk * (oh+1) * (ow+1) * C floats).
_CHUNK_BYTES = 16 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# argument handling
# ----------------------------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a size here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if _is_int(output_size):
        size = (int(output_size), int(output_size))
    elif isinstance(output_size, (tuple, list)) and len(output_size) in (1, 2) and all(_is_int(s) for s in output_size):
        size = tuple(int(s) for s in output_size) * (3 - len(output_size))
    else:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or (oh, ow) of positive ints, got {output_size!r}")
    return size  # type: ignore[return-value]


def _check_scale(spatial_scale: float) -> float:
    if not (_is_real(spatial_scale) and math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    return float(spatial_scale)


def _check_not_meta(tensor: Tensor, name: str) -> None:
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data); move it to a real device first")


def _check_features(features: Tensor, name: str = "features") -> None:
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {features.dtype}")
    _check_not_meta(features, name)


def _boxes_to_rois(boxes: Sequence[Tensor], name: str = "rois") -> Tensor:
    """List of (K_i, 4) boxes -> (K, 5) rois ``[batch_index, x1, y1, x2, y2]``."""
    if len(boxes) == 0:
        raise ValueError(f"{name} is an empty list; give one (K_i, 4) tensor per image")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{name}[{i}] must be a (K_i, 4) tensor of boxes, got {shape}")
    ref = boxes[0]
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    idx = [torch.full((b.shape[0], 1), float(i), dtype=dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(idx), torch.cat([b.to(dtype) for b in boxes])], dim=1)


def _check_rois(rois: Tensor, batch_size: int, name: str = "rois") -> None:
    """One host synchronisation for all value checks."""
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        shape = tuple(rois.shape) if isinstance(rois, Tensor) else type(rois).__name__
        raise ValueError(f"{name} must be a (K, 5) tensor [batch_index, x1, y1, x2, y2] "
                         f"or a list of (K_i, 4) tensors, got {shape}")
    if not rois.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {rois.dtype}")
    _check_not_meta(rois, name)
    if rois.shape[0] == 0:
        return
    r = rois.detach()
    bidx = r[:, 0]
    flags = torch.stack([
        ~torch.isfinite(r).all(),
        ((r[:, 3] < r[:, 1]) | (r[:, 4] < r[:, 2])).any(),
        (bidx != bidx.round()).any(),
        ((bidx < 0) | (bidx > batch_size - 1)).any(),
    ]).tolist()
    if flags[0]:
        raise ValueError(f"{name} contains NaN or infinite values")
    if flags[1]:
        raise ValueError(f"{name} has boxes with x2 < x1 or y2 < y1")
    if flags[2]:
        raise ValueError(f"{name} has a non-integral batch index (column 0 must hold whole image indices)")
    if flags[3]:
        raise ValueError(f"{name} has a batch index out of range [0, {batch_size - 1}]")


# ----------------------------------------------------------------------------------------------
# core
# ----------------------------------------------------------------------------------------------
class _PrefixTable(torch.autograd.Function):
    """2-D prefix sums in float64, channels last: (B, C, H, W) -> (B * (H+1) * (W+1), C) with
    ``table[b, m, n] = sum_{i<m, j<n} F[b, :, i, j]``. The backward (suffix sums of the table
    gradient) runs in the features' dtype, which is accurate for gradients and twice as fast."""

    @staticmethod
    def forward(ctx, features: Tensor) -> Tensor:
        b, c, h, w = features.shape
        ctx.shape, ctx.dtype = features.shape, features.dtype
        x = F.pad(features.permute(0, 2, 3, 1).to(torch.float64), (0, 0, 1, 0, 1, 0))
        return x.cumsum_(1).cumsum_(2).reshape(b * (h + 1) * (w + 1), c)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        b, c, h, w = ctx.shape
        g = grad.view(b, h + 1, w + 1, c)[:, 1:, 1:].to(ctx.dtype)
        g = g.flip(1, 2).cumsum(1).cumsum_(2).flip(1, 2)  # suffix sums
        return g.permute(0, 3, 1, 2)


def _prefix_table(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B * (H+1) * (W+1), C) float64 prefix table (see ``_PrefixTable``)."""
    return _PrefixTable.apply(features)


def _spline_taps(t: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Quadratic B-spline taps of the prefix sums along one axis.

    Args:
        t: (K, N) corner coordinates in feature pixels (float64).
        size: (K, 1) map length (W or H) per box (float64).
    Returns:
        index: (K, N, 3) int64 prefix indices clamped to [0, size].
        weight: (K, N, 3) spline weights, differentiable in ``t``.
    """
    # The antiderivative is constant outside [-1, size]: clamping keeps int64 safe and is exact.
    t = torch.maximum(torch.minimum(t, size + 2.0), torch.full_like(t, -2.0))
    n = torch.floor(t.detach())
    u = t - n
    weight = torch.stack([0.5 * (1.0 - u) ** 2, 0.5 + u - u * u, 0.5 * u * u], dim=-1)
    index = n.long().unsqueeze(-1) + torch.arange(3, device=t.device)
    index = torch.minimum(index.clamp(min=0), size.long().unsqueeze(-1))
    return index, weight


def _corners_to_bins(g: Tensor) -> Tensor:
    """(k, oh+1, ow+1, C) antiderivative at bin corners -> (k, oh, ow, C) bin integrals."""
    return g[:, 1:, 1:] - g[:, :-1, 1:] - g[:, 1:, :-1] + g[:, :-1, :-1]


def _bins_to_corners(d: Tensor) -> Tensor:
    """Adjoint of ``_corners_to_bins``."""
    k, oh, ow, c = d.shape
    g = d.new_zeros((k, oh + 1, ow + 1, c))
    g[:, 1:, 1:] += d
    g[:, :-1, 1:] -= d
    g[:, 1:, :-1] -= d
    g[:, :-1, :-1] += d
    return g


class _BinIntegrals(torch.autograd.Function):
    """Bin integrals from the prefix table: a fused 9-tap gather per bin corner, then the
    corner double difference; chunked over boxes. The backward scatters into the table with
    ``index_add_`` and computes the tap-weight gradient only when the boxes need it."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor, out_hw: tuple[int, int], chunk: int) -> Tensor:
        # index, weight: (K, oh+1, ow+1, 9); returns (K, oh, ow, C)
        k = index.shape[0]
        c = table.shape[1]
        out = table.new_empty((k, out_hw[0], out_hw[1], c))
        for s in range(0, k, chunk):
            idx, w = index[s:s + chunk], weight[s:s + chunk]
            g = F.embedding_bag(idx.reshape(-1, 9), table, per_sample_weights=w.reshape(-1, 9), mode="sum")
            out[s:s + chunk] = _corners_to_bins(g.view(*idx.shape[:3], c))
        ctx.save_for_backward(table, index, weight)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, index, weight = ctx.saved_tensors
        chunk = max(1, ctx.chunk // 9)  # the backward expands every corner to its 9 taps
        need_table, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        c = table.shape[1]
        d_table = torch.zeros_like(table) if need_table else None
        d_weight = torch.empty_like(weight) if need_weight else None
        for s in range(0, index.shape[0], chunk):
            idx, w = index[s:s + chunk], weight[s:s + chunk]
            g = _bins_to_corners(grad[s:s + chunk].to(table.dtype)).reshape(-1, 1, c)  # (n, 1, C)
            flat = idx.reshape(-1)
            if need_table:
                d_table.index_add_(0, flat, (g * w.reshape(-1, 9, 1)).reshape(-1, c))
            if need_weight:
                taps = table.index_select(0, flat).view(-1, 9, c)
                d_weight[s:s + chunk] = torch.bmm(taps, g.transpose(1, 2)).view(w.shape)
        return d_table, None, d_weight, None, None


def _pool_boxes(
    table: Tensor,
    boxes: Tensor,
    base: Tensor,
    height: Tensor,
    width: Tensor,
    output_size: tuple[int, int],
) -> Tensor:
    """PrRoIPool of boxes given in feature pixels, against a flat table of one or more maps.

    Args:
        table: (N, C) float64 prefix tables of all maps (see ``_prefix_table``), concatenated.
        boxes: (K, 4) boxes in feature pixels of their own map.
        base: (K,) int64 first table row of each box's map (and image).
        height, width: (K,) int64 size (H, W) of each box's map.
    Returns:
        (K, C, oh, ow) float64.
    """
    oh, ow = output_size
    k, c = boxes.shape[0], table.shape[1]
    dtype = table.dtype
    boxes = boxes.to(dtype)
    x1, y1, x2, y2 = boxes.unbind(1)
    bw, bh = (x2 - x1)[:, None], (y2 - y1)[:, None]
    ys = y1[:, None] + bh * (torch.arange(oh + 1, device=boxes.device, dtype=dtype) / oh)  # (K, oh+1)
    xs = x1[:, None] + bw * (torch.arange(ow + 1, device=boxes.device, dtype=dtype) / ow)  # (K, ow+1)
    row, wy = _spline_taps(ys, height[:, None].to(dtype))
    col, wx = _spline_taps(xs, width[:, None].to(dtype))

    # 9 taps per corner: (K, oh+1, ow+1, 3, 3) -> (K, oh+1, ow+1, 9)
    index = (base[:, None, None, None, None]
             + row[:, :, None, :, None] * (width + 1)[:, None, None, None, None]
             + col[:, None, :, None, :]).reshape(k, oh + 1, ow + 1, 9)
    weight = (wy[:, :, None, :, None] * wx[:, None, :, None, :]).reshape(k, oh + 1, ow + 1, 9)
    chunk = max(1, _CHUNK_BYTES // ((oh + 1) * (ow + 1) * max(c, 1) * table.element_size()))
    integral = _BinIntegrals.apply(table, index, weight, (oh, ow), chunk)  # (K, oh, ow, C)

    area = (bw * bh / (oh * ow)).view(k, 1, 1, 1)
    nonzero = area > 0
    out = torch.where(nonzero, integral / torch.where(nonzero, area, torch.ones_like(area)), torch.zeros_like(integral))
    return out.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def prroi_pool(
    features: Tensor,
    rois: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Precise RoI Pooling.

    Args:
        features: (B, C, H, W) feature map; pixel ``[i, j]`` sits at ``(x=j, y=i)``.
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]`` or a list of B tensors (K_i, 4), boxes in
            image pixels. May require grad: the gradient to the coordinates is exact.
        output_size: ``oh`` or ``(oh, ow)``.
        spatial_scale: feature pixels per image pixel (e.g. 1/4 for a stride-4 map); the box in
            feature pixels is ``scale * (x1, y1, x2, y2)`` (no half-pixel offset).

    Returns:
        (K, C, oh, ow): the mean of the bilinear interpolant over each bin (0 for an empty bin).
    """
    _check_features(features)
    oh, ow = _pair(output_size)
    spatial_scale = _check_scale(spatial_scale)
    if not isinstance(rois, Tensor):
        rois = _boxes_to_rois(list(rois))
    _check_rois(rois, features.shape[0])
    if rois.device != features.device:
        raise ValueError(f"rois is on {rois.device} but features is on {features.device}")
    b, c, h, w = features.shape
    in_dtype = features.dtype
    if rois.shape[0] == 0:
        return features.new_zeros((0, c, oh, ow))
    table = _prefix_table(features)
    bidx = rois[:, 0].detach().round().long()
    out = _pool_boxes(
        table, rois[:, 1:].to(table.dtype) * spatial_scale, base=bidx * ((h + 1) * (w + 1)),
        height=torch.full_like(bidx, h), width=torch.full_like(bidx, w), output_size=(oh, ow),
    )
    return out.to(in_dtype, memory_format=torch.contiguous_format)


class PrRoIPool2d(nn.Module):
    """Module form of :func:`prroi_pool` (same arguments as ``torchvision.ops.RoIAlign`` minus sampling)."""

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = _check_scale(spatial_scale)

    def forward(self, features: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return prroi_pool(features, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


def infer_scales(feature_sizes: Sequence[Sequence[int]], image_shapes: Sequence[Sequence[int]]) -> list[float]:
    """Scale of each feature map relative to the (padded) input, as ``MultiScaleRoIAlign`` infers it.

    The input size is the largest image height and width; each scale is the height ratio
    ``H_l / max_h`` rounded to the nearest power of two (host integers only, no device sync).

    Args:
        feature_sizes: (H_l, W_l) of each level, finest first.
        image_shapes: (h, w) of each image.
    """
    if len(image_shapes) == 0:
        raise ValueError("image_shapes is empty; give the (h, w) of every image")
    max_h = max(int(s[0]) for s in image_shapes)
    return [2.0 ** round(math.log2(float(size[0]) / float(max_h))) for size in feature_sizes]


def map_levels(
    boxes: Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """FPN level of each box (FPN paper, Eq. 1), as an index from 0 (level ``k_min``).

    ``k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)`` clamped to
    ``[k_min, k_max]``, computed in the boxes' dtype.

    Args:
        boxes: (K, 4). Returns: (K,) int64 in ``[0, k_max - k_min]``.
    """
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    k = torch.floor(canonical_level + torch.log2(size / canonical_scale) + torch.tensor(eps, dtype=size.dtype))
    return (k.clamp(min=k_min, max=k_max).to(torch.int64) - k_min)


class MultiScalePrRoIPool(nn.Module):
    """PrRoIPool over an FPN pyramid; a drop-in replacement for ``torchvision.ops.MultiScaleRoIAlign``.

    Same constructor and ``forward(x, boxes, image_shapes)``; each box is pooled from the level
    given by :func:`map_levels`, with the scales from :func:`infer_scales` (recomputed on each call).
    All levels are stacked into one table, so every box is pooled in one vectorised pass
    (no per-level selection, no host synchronisation beyond input validation).

    Args:
        featmap_names: keys of ``x`` to pool from, finest level first.
        output_size: ``oh`` or ``(oh, ow)``.
        sampling_ratio: ignored (PrRoIPool integrates exactly); kept for signature compatibility.
        canonical_scale, canonical_level: FPN level mapping (224, 4).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | Sequence[int],
        sampling_ratio: int | None = None,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if len(featmap_names) == 0:
            raise ValueError("featmap_names is empty")
        if sampling_ratio is not None and not _is_int(sampling_ratio):
            raise ValueError(f"sampling_ratio must be an int or None, got {sampling_ratio!r}")
        if not (_is_real(canonical_scale) and math.isfinite(canonical_scale) and canonical_scale > 0):
            raise ValueError(f"canonical_scale must be a positive finite number, got {canonical_scale!r}")
        if not _is_int(canonical_level):
            raise ValueError(f"canonical_level must be an int, got {canonical_level!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def levels(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> tuple[list[float], Tensor]:
        """Scales of the used maps and the (K,) level index of every box (concatenated over images)."""
        feats = [x[name] for name in self.featmap_names]
        scales = infer_scales([f.shape[-2:] for f in feats], image_shapes)
        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        all_boxes = torch.cat(boxes) if len(boxes) else feats[0].new_zeros((0, 4))
        return scales, map_levels(all_boxes, k_min, k_max, self.canonical_scale, self.canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """
        Args:
            x: feature maps, each (B, C, H_l, W_l).
            boxes: B tensors (K_i, 4) in image pixels.
            image_shapes: (h, w) of each image (before batching/padding).
        Returns:
            (sum K_i, C, oh, ow).
        """
        for name in self.featmap_names:
            if name not in x:
                raise ValueError(f"x has no feature map named {name!r}")
            _check_features(x[name], name=f"x[{name!r}]")
        feats = [x[name] for name in self.featmap_names]
        rois = _boxes_to_rois(boxes, name="boxes")
        _check_rois(rois, feats[0].shape[0], name="boxes")
        scales, level = self.levels(x, boxes, image_shapes)
        b, c = feats[0].shape[:2]
        oh, ow = self.output_size
        in_dtype = feats[0].dtype
        if rois.shape[0] == 0:
            return feats[0].new_zeros((0, c, oh, ow))
        dev = feats[0].device

        tables, bases, heights, widths = [], [], [], []
        offset = 0
        for f in feats:
            tables.append(_prefix_table(f))
            bases.append(offset)
            heights.append(f.shape[2])
            widths.append(f.shape[3])
            offset += tables[-1].shape[0]
        table = torch.cat(tables)

        level_scale = torch.tensor(scales, dtype=table.dtype, device=dev)[level]
        level_hw = torch.tensor([heights, widths, [(h + 1) * (w + 1) for h, w in zip(heights, widths)], bases],
                                dtype=torch.int64, device=dev)[:, level]
        bidx = rois[:, 0].round().long()
        out = _pool_boxes(
            table, rois[:, 1:].to(table.dtype) * level_scale[:, None], base=level_hw[3] + bidx * level_hw[2],
            height=level_hw[0], width=level_hw[1], output_size=(oh, ow),
        )
        return out.to(in_dtype, memory_format=torch.contiguous_format)
