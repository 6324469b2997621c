"""The default augmentation pipeline: :func:`build_transforms`."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import Compose, Transform
from .geometry import RandomHorizontalFlip, RandomRot90, RandomVerticalFlip
from .photometric import ColorJitter
from .scale import RandomScaleJitter, Resize

__all__ = ["build_transforms"]


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
