"""Scale changes: :class:`Resize` to the detector's input size and :class:`RandomScaleJitter`, a zoom
at constant image size. Images are resampled bilinearly with antialiasing; boxes follow exactly."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...boxes import clip_boxes
from .base import RandomTransform, Target, check_sample, uniform

__all__ = ["resize_scale", "Resize", "RandomScaleJitter", "PER_BOX_KEYS"]

#: Per-box target entries that :class:`RandomScaleJitter` filters together with ``boxes``.
PER_BOX_KEYS = ("labels", "area", "iscrowd")


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """Scale factor of the GeneralizedRCNNTransform rule.

    Scale so that the short side becomes ``min_size`` unless the long side would then exceed
    ``max_size``, in which case the long side becomes ``max_size``:
    ``scale = min(min_size / min(H, W), max_size / max(H, W))``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got H={height}, W={width}")
    return min(min_size / min(height, width), max_size / max(height, width))


def _resample(image: Tensor, height: int, width: int) -> Tensor:
    """(3, H, W) -> (3, height, width): bilinear, antialiased, clamped to [0, 1]."""
    return F.interpolate(
        image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )[0].clamp_(0.0, 1.0)


def _scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """(N, 4) xyxy boxes with x multiplied by ``sx`` and y by ``sy``."""
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)


class Resize:
    """Resize by the min/max-size rule (see :func:`resize_scale`); boxes and area follow.

    Args:
        min_size: target short side; a sequence means one is drawn uniformly per call
            (multi-scale training).
        max_size: upper bound on the long side.
        generator: RNG for the choice of ``min_size``.

    The output size is ``round(H * scale) x round(W * scale)`` (at least 1 px) and boxes are scaled
    by the exact per-axis ratios ``W' / W`` and ``H' / H``. Bilinear interpolation, antialiased.
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        sizes = (min_size,) if isinstance(min_size, (int, float)) else tuple(min_size)
        if len(sizes) == 0 or any(s <= 0 for s in sizes):
            raise ValueError(f"min_size must be a positive int or non-empty sequence, got {min_size}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.min_sizes = sizes
        self.max_size = max_size
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        check_sample(image, target)
        h, w = image.shape[-2:]
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            idx = int(torch.randint(len(self.min_sizes), (), generator=self.generator))
            min_size = self.min_sizes[idx]
        scale = resize_scale(h, w, min_size, self.max_size)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        if (new_h, new_w) != (h, w):
            image = _resample(image, new_h, new_w)
        sx, sy = new_w / w, new_h / h
        target = dict(target)
        target["boxes"] = _scale_boxes(target["boxes"], sx, sy)
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        return image, target

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_sizes}, max_size={self.max_size})"


def _zoom_on_canvas(image: Tensor, height: int, width: int, offset: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Resample ``image`` (3, H, W) to ``height x width`` and bring it back to ``H x W``.

    Along an axis that grew, the window starting at ``offset`` (x, y) is cropped; along one that
    shrank, the resampled image is pasted at ``offset`` on a canvas of the image's mean colour.

    Returns:
        The (3, H, W) result and the shift ``(dx, dy)`` of resampled pixels in it.
    """
    h, w = image.shape[-2:]
    ox, oy = offset
    scaled = _resample(image, height, width)
    canvas = image.mean(dim=(1, 2), keepdim=True).expand(3, h, w).clone()
    src_x, dst_x = (ox, 0) if width >= w else (0, ox)
    src_y, dst_y = (oy, 0) if height >= h else (0, oy)
    cw, ch = min(w, width), min(h, height)
    canvas[:, dst_y:dst_y + ch, dst_x:dst_x + cw] = scaled[:, src_y:src_y + ch, src_x:src_x + cw]
    return canvas, (dst_x - src_x, dst_y - src_y)


def _keep_rows(target: Target, keep: Tensor) -> Target:
    """A copy of ``target`` with the rows ``keep`` (N,) bool of every :data:`PER_BOX_KEYS` entry."""
    target = dict(target)
    n = keep.shape[0]
    for key in PER_BOX_KEYS:
        value = target.get(key)
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
            target[key] = value[keep]
    return target


class RandomScaleJitter(RandomTransform):
    """Zoom in or out by a random factor while keeping the image size (scale augmentation).

    With probability ``p``, a factor ``s`` is drawn log-uniformly from ``scale = (lo, hi)``, the
    image is resized to ``round(H * s) x round(W * s)`` (bilinear, antialiased) and brought back
    to ``H x W``: along an axis that grew, a random window is cropped; along one that shrank, the
    resized image is placed at a random offset on a canvas filled with the image's mean colour.
    Objects therefore change size by ``s`` in the output, which a detector that resizes every
    image to a fixed size would otherwise undo.

    Boxes are scaled by the exact per-axis ratios, shifted and clipped to the image. A box that
    keeps less than ``min_visible`` of its (scaled) area, or none of its width or height, is
    dropped together with its entries of :data:`PER_BOX_KEYS`; ``area`` is scaled by
    ``sx * sy`` times the visible fraction. Other target entries are carried along unchanged.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.8, 1.25),
        p: float = 1.0,
        min_visible: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        lo, hi = (float(v) for v in scale)
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        if not 0.0 < min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
        self.scale = (lo, hi)
        super().__init__(p, generator)
        self.min_visible = float(min_visible)

    def apply(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        lo, hi = self.scale
        s = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * uniform(self.generator))
        h, w = image.shape[-2:]
        new_h, new_w = max(1, round(h * s)), max(1, round(w * s))
        if (new_h, new_w) == (h, w):
            return image, target
        # offsets: crop start (>= 0) where the axis grew, paste start (>= 0) where it shrank
        ox = int(torch.randint(abs(new_w - w) + 1, (), generator=self.generator))
        oy = int(torch.randint(abs(new_h - h) + 1, (), generator=self.generator))
        canvas, shift = _zoom_on_canvas(image, new_h, new_w, (ox, oy))
        return canvas, self._move_target(target, new_w / w, new_h / h, shift, (h, w))

    def _move_target(self, target: Target, sx: float, sy: float, shift: tuple[int, int],
                     image_size: tuple[int, int]) -> Target:
        """Scale the boxes by ``(sx, sy)``, shift them, clip them to ``image_size`` (H, W) and drop
        those less than ``min_visible`` visible, with their :data:`PER_BOX_KEYS` entries."""
        boxes = target["boxes"]
        moved = _scale_boxes(boxes, sx, sy) + torch.tensor(list(shift) * 2, dtype=boxes.dtype)
        clipped = clip_boxes(moved, image_size)
        full = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
        visible = (cw * ch) / full.clamp(min=1e-12)
        keep = (cw > 0) & (ch > 0) & (visible >= self.min_visible)
        target = _keep_rows(target, keep)
        if isinstance(target.get("area"), Tensor) and target["area"].shape[0] == int(keep.sum()):
            target["area"] = target["area"] * (sx * sy) * visible[keep].to(target["area"].dtype)
        target["boxes"] = clipped[keep]
        return target

    def __repr__(self) -> str:
        return f"RandomScaleJitter(scale={self.scale}, p={self.p}, min_visible={self.min_visible})"
