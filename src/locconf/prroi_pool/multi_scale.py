"""PrRoIPool over an FPN pyramid: :class:`MultiScalePrRoIPool`, a drop-in replacement for
``torchvision.ops.MultiScaleRoIAlign``, with its level rules :func:`infer_scales` and :func:`map_levels`."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ._args import boxes_to_rois, check_features, check_rois, is_int, is_real, pair
from ._integral import pool_boxes, prefix_table

__all__ = ["MultiScalePrRoIPool", "infer_scales", "map_levels"]


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


def _stack_tables(feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The prefix tables of all levels stacked into one, and where each level lies in it.

    Args:
        feats: L maps (B, C, H_l, W_l).
    Returns:
        table: (sum_l B * (H_l+1) * (W_l+1), C) float64.
        layout: (4, L) int64 on the maps' device: per level ``H_l``, ``W_l``, the table rows of one
            image ``(H_l+1) * (W_l+1)`` and the level's first row.
    """
    tables, bases, heights, widths = [], [], [], []
    offset = 0
    for f in feats:
        tables.append(prefix_table(f))
        bases.append(offset)
        heights.append(f.shape[2])
        widths.append(f.shape[3])
        offset += tables[-1].shape[0]
    rows = [(h + 1) * (w + 1) for h, w in zip(heights, widths)]
    layout = torch.tensor([heights, widths, rows, bases], dtype=torch.int64, device=feats[0].device)
    return torch.cat(tables), layout


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
        if sampling_ratio is not None and not is_int(sampling_ratio):
            raise ValueError(f"sampling_ratio must be an int or None, got {sampling_ratio!r}")
        if not (is_real(canonical_scale) and math.isfinite(canonical_scale) and canonical_scale > 0):
            raise ValueError(f"canonical_scale must be a positive finite number, got {canonical_scale!r}")
        if not is_int(canonical_level):
            raise ValueError(f"canonical_level must be an int, got {canonical_level!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = pair(output_size)
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
            check_features(x[name], name=f"x[{name!r}]")
        feats = [x[name] for name in self.featmap_names]
        rois = boxes_to_rois(boxes, name="boxes", batch_size=feats[0].shape[0], features="x")
        rois = rois.to(feats[0]) if rois.shape[0] == 0 else rois
        check_rois(rois, feats[0].shape[0], name="boxes")
        scales, level = self.levels(x, boxes, image_shapes)
        b, c = feats[0].shape[:2]
        oh, ow = self.output_size
        in_dtype = feats[0].dtype
        if rois.shape[0] == 0:
            return feats[0].new_zeros((0, c, oh, ow))

        table, layout = _stack_tables(feats)
        level_scale = torch.tensor(scales, dtype=table.dtype, device=feats[0].device)[level]
        level_hw = layout[:, level]
        bidx = rois[:, 0].round().long()
        out = pool_boxes(
            table, rois[:, 1:].to(table.dtype) * level_scale[:, None], base=level_hw[3] + bidx * level_hw[2],
            height=level_hw[0], width=level_hw[1], output_size=(oh, ow),
        )
        return out.to(in_dtype, memory_format=torch.contiguous_format)
