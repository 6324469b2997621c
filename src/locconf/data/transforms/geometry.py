"""Flips and quarter turns: the symmetries of the image rectangle, exact on pixels and boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import RandomTransform, Target

__all__ = ["hflip", "vflip", "rot90", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90"]


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


class RandomHorizontalFlip(RandomTransform):
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__(p, generator)

    def apply(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return hflip(image, target)


class RandomVerticalFlip(RandomTransform):
    """Flip top-bottom with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__(p, generator)

    def apply(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return vflip(image, target)


class RandomRot90(RandomTransform):
    """With probability ``p``, rotate by ``k * 90`` degrees, ``k`` uniform in ``{1, 2, 3}``.

    With ``p = 0.75`` (the default) every one of the four orientations is equally likely;
    together with a horizontal flip this covers all eight symmetries of the square.
    """

    def __init__(self, p: float = 0.75, generator: torch.Generator | None = None) -> None:
        super().__init__(p, generator)

    def apply(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        k = 1 + int(torch.randint(3, (), generator=self.generator))
        return rot90(image, target, k)
