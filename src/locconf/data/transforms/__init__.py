"""Joint image/target transforms for detection.

Every transform is a small callable ``t(image, target) -> (image, target)`` where

- ``image`` is a float tensor ``(3, H, W)`` with values in ``[0, 1]``;
- ``target`` is a dict with at least ``boxes`` ``(N, 4)`` float ``(x1, y1, x2, y2)`` in absolute,
  continuous pixel coordinates (pixel ``j`` covers ``[j, j + 1)``, so a box that exactly bounds
  columns ``a..b`` is ``x1 = a, x2 = b + 1``). Other keys (``labels``, ``area``, ``iscrowd``,
  ``image_id``, ``site``) are carried along; ``area`` is rescaled by :class:`Resize`.

Random transforms draw from ``generator`` when one is given and from torch's global RNG otherwise,
so ``torch.manual_seed`` makes a pipeline reproducible. Transforms never modify their inputs in place.

Modules, one job each: :mod:`.base` (:class:`Compose`, the sample check, the base of the random
transforms), :mod:`.geometry` (flips, quarter turns), :mod:`.scale` (:class:`Resize`,
:class:`RandomScaleJitter`), :mod:`.photometric` (:class:`ColorJitter`) and :mod:`.pipeline`
(:func:`build_transforms`).
"""

from .base import Compose, Target, Transform  # noqa: F401  (Target, Transform: the types, importable here as before)
from .geometry import RandomHorizontalFlip, RandomRot90, RandomVerticalFlip, hflip, rot90, vflip  # noqa: F401  (idem)
from .photometric import ColorJitter
from .pipeline import build_transforms
from .scale import PER_BOX_KEYS, RandomScaleJitter, Resize, resize_scale  # noqa: F401  (idem)

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
