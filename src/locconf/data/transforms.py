"""Joint image/target transforms for detection.

Every transform is a small callable ``t(image, target) -> (image, target)`` where

- ``image`` is a float tensor ``(3, H, W)`` with values in ``[0, 1]``;
- ``target`` is a dict with at least ``boxes`` ``(N, 4)`` float ``(x1, y1, x2, y2)`` in absolute,
  continuous pixel coordinates (pixel ``j`` covers ``[j, j + 1)``, so a box that exactly bounds
  columns ``a..b`` is ``x1 = a, x2 = b + 1``). Other keys (``labels``, ``area``, ``iscrowd``,
  ``image_id``, ``site``) are carried along; ``area`` is rescaled by :class:`Resize`.

Random transforms draw from ``generator`` when one is given and from torch's global RNG otherwise,
so ``torch.manual_seed`` makes a pipeline reproducible. Transforms never modify their inputs in place.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict
Transform = Callable[[Tensor, Target], "tuple[Tensor, Target]"]

__all__ = [
    "Compose",
    "Resize",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "RandomRot90",
    "ColorJitter",
    "RandomScaleJitter",
    "build_transforms",
    "resize_scale",
]


def _check(image: Tensor, target: Target) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a float tensor of shape (3, H, W), got {shape}")
    if not isinstance(target, dict) or "boxes" not in target:
        raise ValueError("target must be a dict with a 'boxes' entry")
    boxes = target["boxes"]
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"target['boxes'] must be a tensor of shape (N, 4), got {shape}")


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _check_prob(p: float, name: str = "p") -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """Scale factor of the GeneralizedRCNNTransform rule.

    Scale so that the short side becomes ``min_size`` unless the long side would then exceed
    ``max_size``, in which case the long side becomes ``max_size``:
    ``scale = min(min_size / min(H, W), max_size / max(H, W))``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got H={height}, W={width}")
    return min(min_size / min(height, width), max_size / max(height, width))


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
        _check(image, target)
        h, w = image.shape[-2:]
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            idx = int(torch.randint(len(self.min_sizes), (), generator=self.generator))
            min_size = self.min_sizes[idx]
        scale = resize_scale(h, w, min_size, self.max_size)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        if (new_h, new_w) != (h, w):
            image = F.interpolate(
                image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )[0].clamp_(0.0, 1.0)
        sx, sy = new_w / w, new_h / h
        target = dict(target)
        ratios = torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * ratios
        if "area" in target:
            target["area"] = target["area"] * (sx * sy)
        return image, target

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_sizes}, max_size={self.max_size})"


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror left-right: ``x -> W - x``, so ``(x1, x2) -> (W - x2, W - x1)``."""
    w = image.shape[-1]
    target = dict(target)
    b = target["boxes"]
    target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return image.flip(-1), target


def vflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror top-bottom: ``y -> H - y``, so ``(y1, y2) -> (H - y2, H - y1)``."""
    h = image.shape[-2]
    target = dict(target)
    b = target["boxes"]
    target["boxes"] = torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1)
    return image.flip(-2), target


def rot90(image: Tensor, target: Target, k: int) -> tuple[Tensor, Target]:
    """Rotate by ``k * 90`` degrees counter-clockwise as displayed (``torch.rot90`` on ``(H, W)``).

    One quarter turn maps the point ``(x, y)`` of a ``W``-wide image to ``(y, W - x)`` in the new
    ``W x H`` image, so the box ``(x1, y1, x2, y2)`` becomes ``(y1, W - x2, y2, W - x1)``.
    """
    k = k % 4
    target = dict(target)
    boxes = target["boxes"]
    for _ in range(k):
        w = image.shape[-1]
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], dim=1)
        image = torch.rot90(image, 1, dims=(-2, -1))
    target["boxes"] = boxes
    return image, target


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = _check_prob(p)
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check(image, target)
        if _rand(self.generator) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomVerticalFlip:
    """Flip top-bottom with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = _check_prob(p)
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check(image, target)
        if _rand(self.generator) < self.p:
            return vflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomVerticalFlip(p={self.p})"


class RandomRot90:
    """With probability ``p``, rotate by ``k * 90`` degrees, ``k`` uniform in ``{1, 2, 3}``.

    With ``p = 0.75`` (the default) every one of the four orientations is equally likely;
    together with a horizontal flip this covers all eight symmetries of the square.
    """

    def __init__(self, p: float = 0.75, generator: torch.Generator | None = None) -> None:
        self.p = _check_prob(p)
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check(image, target)
        if _rand(self.generator) >= self.p:
            return image, target
        k = 1 + int(torch.randint(3, (), generator=self.generator))
        return rot90(image, target, k)

    def __repr__(self) -> str:
        return f"RandomRot90(p={self.p})"


def _grayscale(image: Tensor) -> Tensor:
    """ITU-R 601 luma, shape ``(1, H, W)``."""
    r, g, b = image.unbind(0)
    return (0.299 * r + 0.587 * g + 0.114 * b)[None]


class ColorJitter:
    """Random brightness, contrast and saturation (in this order), each with probability ``p``.

    Each factor is drawn uniformly from ``[1 - s, 1 + s]`` for strength ``s``:
    brightness multiplies the image; contrast blends with the mean grey level; saturation blends
    with the greyscale image. The result is clamped to ``[0, 1]``. Boxes are unchanged.
    """

    def __init__(
        self,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.p = _check_prob(p)
        self.generator = generator

    def _factor(self, strength: float) -> float | None:
        if strength == 0 or _rand(self.generator) >= self.p:
            return None
        return 1.0 + strength * (2.0 * _rand(self.generator) - 1.0)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check(image, target)
        f = self._factor(self.brightness)
        if f is not None:
            image = (image * f).clamp(0.0, 1.0)
        f = self._factor(self.contrast)
        if f is not None:
            mean = _grayscale(image).mean()
            image = ((image - mean) * f + mean).clamp(0.0, 1.0)
        f = self._factor(self.saturation)
        if f is not None:
            gray = _grayscale(image)
            image = ((image - gray) * f + gray).clamp(0.0, 1.0)
        return image, target

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, p={self.p})"
        )


#: Per-box target entries that :class:`RandomScaleJitter` filters together with ``boxes``.
PER_BOX_KEYS = ("labels", "area", "iscrowd")


class RandomScaleJitter:
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
        self.p = _check_prob(p)
        self.min_visible = float(min_visible)
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _check(image, target)
        if _rand(self.generator) >= self.p:
            return image, target
        lo, hi = self.scale
        s = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * _rand(self.generator))
        h, w = image.shape[-2:]
        new_h, new_w = max(1, round(h * s)), max(1, round(w * s))
        if (new_h, new_w) == (h, w):
            return image, target
        sx, sy = new_w / w, new_h / h
        scaled = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=True)[0].clamp_(0.0, 1.0)
        # offsets: crop start (>= 0) where the axis grew, paste start (>= 0) where it shrank
        ox = int(torch.randint(abs(new_w - w) + 1, (), generator=self.generator))
        oy = int(torch.randint(abs(new_h - h) + 1, (), generator=self.generator))
        canvas = image.mean(dim=(1, 2), keepdim=True).expand(3, h, w).clone()
        src_x, dst_x = (ox, 0) if new_w >= w else (0, ox)
        src_y, dst_y = (oy, 0) if new_h >= h else (0, oy)
        cw, ch = min(w, new_w), min(h, new_h)
        canvas[:, dst_y:dst_y + ch, dst_x:dst_x + cw] = scaled[:, src_y:src_y + ch, src_x:src_x + cw]

        boxes = target["boxes"]
        shift = torch.tensor([dst_x - src_x, dst_y - src_y] * 2, dtype=boxes.dtype)
        moved = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype) + shift
        clipped = torch.stack([moved[:, 0].clamp(0, w), moved[:, 1].clamp(0, h),
                               moved[:, 2].clamp(0, w), moved[:, 3].clamp(0, h)], dim=1)
        full = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        cw_, ch_ = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
        visible = (cw_ * ch_) / full.clamp(min=1e-12)
        keep = (cw_ > 0) & (ch_ > 0) & (visible >= self.min_visible)
        target = dict(target)
        n = boxes.shape[0]
        for key in PER_BOX_KEYS:
            value = target.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
                target[key] = value[keep]
        if isinstance(target.get("area"), Tensor) and target["area"].shape[0] == int(keep.sum()):
            target["area"] = target["area"] * (sx * sy) * visible[keep].to(target["area"].dtype)
        target["boxes"] = clipped[keep]
        return canvas, target

    def __repr__(self) -> str:
        return f"RandomScaleJitter(scale={self.scale}, p={self.p}, min_visible={self.min_visible})"


def build_transforms(
    train: bool,
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    flips: bool = True,
    rot90: bool = True,
    jitter: bool = True,
    generator: torch.Generator | None = None,
    scale_jitter: Sequence[float] | None = None,
    jitter_strength: float = 0.2,
    vertical_flip: bool = True,
) -> Compose:
    """The default pipeline.

    Train: horizontal and vertical flips (p = 0.5 each), a random quarter turn (all four
    orientations equally likely), optional scale jitter, photometric jitter, then resize.
    Eval: resize only. ``min_size=None`` skips the resize; ``max_size=None`` means
    ``max(1333, min_size)``.

    ``flips`` switches flipping on; ``vertical_flip=False`` keeps the horizontal flip only (p = 0.5),
    the augmentation of the COCO papers (Faster R-CNN, IoU-Net, KL-Loss, ATSS, GFL, DIR), for
    photographs with an up and a down; set ``rot90=False`` there too. The default (both flips)
    suits overhead imagery such as NEON's.

    ``scale_jitter=(lo, hi)`` adds :class:`RandomScaleJitter` (zoom by a log-uniform factor in
    ``[lo, hi]`` at constant image size); ``None`` (default) leaves it out. ``jitter_strength`` is
    the brightness/contrast/saturation strength of the photometric jitter (default 0.2).
    """
    if not isinstance(vertical_flip, bool):
        raise ValueError(f"vertical_flip must be a bool, got {vertical_flip!r}")
    ts: list[Transform] = []
    if train:
        if flips:
            ts.append(RandomHorizontalFlip(0.5, generator))
            if vertical_flip:
                ts.append(RandomVerticalFlip(0.5, generator))
        if rot90:
            ts.append(RandomRot90(0.75, generator))
        if scale_jitter is not None:
            ts.append(RandomScaleJitter(scale_jitter, p=1.0, generator=generator))
        if jitter:
            ts.append(ColorJitter(jitter_strength, jitter_strength, jitter_strength, p=0.8, generator=generator))
    if min_size is not None:
        largest = min_size if isinstance(min_size, (int, float)) else max(min_size)
        ts.append(Resize(min_size, max_size if max_size is not None else max(1333, math.ceil(largest)), generator))
    elif max_size is not None:
        raise ValueError("max_size was given without min_size")
    return Compose(ts)
