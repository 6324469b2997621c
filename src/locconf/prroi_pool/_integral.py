"""The PrRoIPool computation: a closed-form bin integral with exact gradients (CPU and CUDA).

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

The entry point is :func:`pool_boxes` (boxes in feature pixels against a flat table of one or
more maps' prefix sums, from :func:`prefix_table`); :mod:`.pool` and :mod:`.multi_scale` call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Bytes allowed for the per-chunk corner tensor (K_chunk * (oh+1) * (ow+1) * C floats).
_CHUNK_BYTES = 16 * 1024 * 1024


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


def prefix_table(features: Tensor) -> Tensor:
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


def pool_boxes(
    table: Tensor,
    boxes: Tensor,
    base: Tensor,
    height: Tensor,
    width: Tensor,
    output_size: tuple[int, int],
) -> Tensor:
    """PrRoIPool of boxes given in feature pixels, against a flat table of one or more maps.

    Args:
        table: (N, C) float64 prefix tables of all maps (see ``prefix_table``), concatenated.
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
