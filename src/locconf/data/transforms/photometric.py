"""Photometric jitter: random brightness, contrast and saturation; boxes are unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Target, check_prob, check_sample, uniform

__all__ = ["ColorJitter"]


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
        self.p = check_prob(p)
        self.generator = generator

    def _factor(self, strength: float) -> float | None:
        if strength == 0 or uniform(self.generator) >= self.p:
            return None
        return 1.0 + strength * (2.0 * uniform(self.generator) - 1.0)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        check_sample(image, target)
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
