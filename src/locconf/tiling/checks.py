"""Argument checks shared by the tiling modules: every bad argument raises a ``ValueError`` naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..boxes import check_boxes

#: Candidate fields carried through tiling (others a detector returns are ignored).
_FIELDS = ("boxes", "scores", "labels", "quality", "variances")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _check_int(value: Any, name: str, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_fraction(value: Any, name: str, low_open: bool = False) -> None:
    ok = _is_num(value) and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def _check_image_size(image_size: Any) -> tuple[int, int]:
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(_is_int(v) and v >= 0 for v in image_size)):
        raise ValueError(f"image_size must be (height, width) of non-negative integers, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _check_windows(windows: Any) -> Tensor:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[1] != 4:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a (T, 4) tensor of tile windows (x1, y1, x2, y2), got {shape}")
    if windows.numel() and not bool(((windows[:, 2:] >= windows[:, :2])).all()):
        raise ValueError("windows must have x2 >= x1 and y2 >= y1")
    return windows


def _check_candidates(cands: Any, name: str) -> dict[str, Tensor]:
    """The candidate fields of one tile or image, checked for shapes; returns them (no copy)."""
    if not isinstance(cands, Mapping):
        raise ValueError(f"{name} must be a dict with 'boxes', 'scores' and 'labels', got {type(cands).__name__}")
    for key in ("boxes", "scores", "labels"):
        if not isinstance(cands.get(key), Tensor):
            raise ValueError(f"{name} needs a tensor {key!r}")
    boxes = check_boxes(cands["boxes"], f"{name}['boxes']")
    n = boxes.shape[0]
    out = {}
    for key in _FIELDS:
        v = cands.get(key)
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise ValueError(f"{name}[{key!r}] must be a tensor, got {type(v).__name__}")
        want = (n, 4) if key in ("boxes", "variances") else (n,)
        if tuple(v.shape) != want:
            raise ValueError(f"{name}[{key!r}] must have shape {want}, got {tuple(v.shape)}")
        out[key] = v
    if out["labels"].is_floating_point() or out["labels"].dtype == torch.bool:
        raise ValueError(f"{name}['labels'] must be an integer tensor, got {out['labels'].dtype}")
    return out
