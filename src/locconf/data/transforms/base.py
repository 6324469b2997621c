"""What the transforms share: the sample types, the input check, the random draw, :class:`Compose`
and :class:`RandomTransform`, the base of those applied with a probability."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Target", "Transform", "Compose", "RandomTransform", "check_sample", "check_prob", "uniform"]

Target = dict
Transform = Callable[[Tensor, Target], "tuple[Tensor, Target]"]


def check_sample(image: Tensor, target: Target) -> None:
    """``image`` must be a (3, H, W) tensor and ``target`` a dict with ``boxes`` (N, 4)."""
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a float tensor of shape (3, H, W), got {shape}")
    if not isinstance(target, dict) or "boxes" not in target:
        raise ValueError("target must be a dict with a 'boxes' entry")
    boxes = target["boxes"]
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"target['boxes'] must be a tensor of shape (N, 4), got {shape}")


def uniform(generator: torch.Generator | None) -> float:
    """One draw from U[0, 1), from ``generator`` or else torch's global RNG."""
    return float(torch.rand((), generator=generator))


def check_prob(p: float, name: str = "p") -> float:
    """``p`` as a float, which must lie in [0, 1]."""
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


class RandomTransform:
    """Base of a transform applied with probability ``p``: a subclass defines ``apply(image, target)``.

    A call checks the sample, draws one :func:`uniform` and applies the transform when the draw is
    below ``p`` (any further draws are the subclass's, after this one).
    """

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        self.p = check_prob(p)
        self.generator = generator

    def apply(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        raise NotImplementedError

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        check_sample(image, target)
        if uniform(self.generator) >= self.p:
            return image, target
        return self.apply(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"
