"""Argument checks of the PrRoIPool entry points: sizes, scales, feature maps and boxes.

Every check raises a ``ValueError`` that names the argument. :func:`check_rois` validates all box
values with one host synchronisation.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..boxes import tracing


def is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a size here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    """``oh`` or ``(oh, ow)`` (or ``(oh,)``) -> ``(oh, ow)`` of positive ints."""
    if is_int(output_size):
        size = (int(output_size), int(output_size))
    elif isinstance(output_size, (tuple, list)) and len(output_size) in (1, 2) and all(is_int(s) for s in output_size):
        size = tuple(int(s) for s in output_size) * (3 - len(output_size))
    else:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"output_size must be a positive int or (oh, ow) of positive ints, got {output_size!r}")
    return size  # type: ignore[return-value]


def check_scale(spatial_scale: float) -> float:
    """A positive finite ``spatial_scale`` as a float."""
    if not (is_real(spatial_scale) and math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    return float(spatial_scale)


def check_not_meta(tensor: Tensor, name: str) -> None:
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data); move it to a real device first")


def check_features(features: Tensor, name: str = "features") -> None:
    """``features`` must be a floating-point (B, C, H, W) tensor with data."""
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {features.dtype}")
    check_not_meta(features, name)


def boxes_to_rois(boxes: Sequence[Tensor], name: str = "rois", batch_size: int | None = None,
                  features: str = "features") -> Tensor:
    """List of (K_i, 4) boxes, one per image -> (K, 5) rois ``[batch_index, x1, y1, x2, y2]``.

    With ``batch_size`` (the images of the feature map ``features``), the list must hold one
    tensor per image: another length is a ``ValueError`` naming both. No image and an empty list
    give (0, 5) rois.
    """
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{name}[{i}] must be a (K_i, 4) tensor of boxes, got {shape}")
    if batch_size is not None and len(boxes) != batch_size:
        raise ValueError(f"{name} is a list of {len(boxes)} box tensors but {features} holds {batch_size} "
                         f"image(s): give one (K_i, 4) tensor per image, in the order of {features}' batch")
    if len(boxes) == 0:
        if batch_size == 0:
            return torch.zeros(0, 5)
        raise ValueError(f"{name} is an empty list; give one (K_i, 4) tensor per image")
    ref = boxes[0]
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    idx = [torch.full((b.shape[0], 1), float(i), dtype=dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(idx), torch.cat([b.to(dtype) for b in boxes])], dim=1)


def check_rois(rois: Tensor, batch_size: int, name: str = "rois") -> None:
    """(K, 5) rois: floating point, finite, ``x2 >= x1``, ``y2 >= y1``, whole batch indices in
    ``[0, batch_size - 1]``. One host synchronisation for all value checks."""
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        shape = tuple(rois.shape) if isinstance(rois, Tensor) else type(rois).__name__
        raise ValueError(f"{name} must be a (K, 5) tensor [batch_index, x1, y1, x2, y2] "
                         f"or a list of (K_i, 4) tensors, got {shape}")
    if not rois.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {rois.dtype}")
    check_not_meta(rois, name)
    if rois.shape[0] == 0 or tracing():  # no host reads inside an exported graph (locconf.export)
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
        if batch_size == 0:
            raise ValueError(f"{name} has {rois.shape[0]} boxes but the feature map holds no image (batch of 0)")
        raise ValueError(f"{name} has a batch index out of range [0, {batch_size - 1}] (the feature map holds "
                         f"{batch_size} image(s))")
