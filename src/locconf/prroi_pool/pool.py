"""PrRoIPool of one feature map: the function :func:`prroi_pool` and its module :class:`PrRoIPool2d`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ._args import boxes_to_rois, check_features, check_rois, check_scale, pair
from ._integral import pool_boxes, prefix_table

__all__ = ["prroi_pool", "PrRoIPool2d"]


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
    check_features(features)
    oh, ow = pair(output_size)
    spatial_scale = check_scale(spatial_scale)
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(list(rois), batch_size=features.shape[0])
        rois = rois.to(device=features.device, dtype=features.dtype) if rois.shape[0] == 0 else rois
    check_rois(rois, features.shape[0])
    if rois.device != features.device:
        raise ValueError(f"rois is on {rois.device} but features is on {features.device}")
    b, c, h, w = features.shape
    in_dtype = features.dtype
    if rois.shape[0] == 0:
        return features.new_zeros((0, c, oh, ow))
    table = prefix_table(features)
    bidx = rois[:, 0].detach().round().long()
    out = pool_boxes(
        table, rois[:, 1:].to(table.dtype) * spatial_scale, base=bidx * ((h + 1) * (w + 1)),
        height=torch.full_like(bidx, h), width=torch.full_like(bidx, w), output_size=(oh, ow),
    )
    return out.to(in_dtype, memory_format=torch.contiguous_format)


class PrRoIPool2d(nn.Module):
    """Module form of :func:`prroi_pool` (same arguments as ``torchvision.ops.RoIAlign`` minus sampling)."""

    def __init__(self, output_size: int | Sequence[int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = pair(output_size)
        self.spatial_scale = check_scale(spatial_scale)

    def forward(self, features: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return prroi_pool(features, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
