"""Input validation of the post-processing methods: every bad argument raises a ``ValueError`` that names it."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..boxes import check_boxes


def _check_vector(x: Tensor, name: str, n: int, device: torch.device, floating: bool = True) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match boxes, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but boxes are on {device}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def _check_inputs(
    boxes: Tensor,
    scores: Tensor,
    labels: Optional[Tensor] = None,
    quality: Optional[Tensor] = None,
    variances: Optional[Tensor] = None,
) -> None:
    """Validate the candidates of one image; one host synchronisation for all value checks."""
    check_boxes(boxes, "boxes")
    n, dev = boxes.shape[0], boxes.device
    _check_vector(scores, "scores", n, dev)
    if labels is not None:
        _check_vector(labels, "labels", n, dev, floating=False)
    if quality is not None:
        _check_vector(quality, "quality", n, dev)
    if variances is not None:
        if not isinstance(variances, Tensor) or variances.shape != (n, 4):
            shape = tuple(variances.shape) if isinstance(variances, Tensor) else type(variances).__name__
            raise ValueError(f"variances must have shape ({n}, 4) to match boxes, got {shape}")
        if variances.device != dev:
            raise ValueError(f"variances is on {variances.device} but boxes are on {dev}")
        if not variances.is_floating_point():
            raise ValueError(f"variances must be a floating-point tensor, got {variances.dtype}")
    if n == 0:
        return
    checks = {"scores": torch.isfinite(scores).all()}
    if quality is not None:
        checks["quality"] = torch.isfinite(quality).all()
    if variances is not None:
        checks["variances"] = (torch.isfinite(variances) & (variances > 0)).all()
    for name, ok in zip(checks, torch.stack(list(checks.values())).tolist()):
        if not ok:
            what = "finite and positive" if name == "variances" else "finite (no NaN or inf)"
            raise ValueError(f"{name} must be {what}")


def _is_number(value) -> bool:
    """A real number, not a bool (``True`` is an int to Python but never a meaningful threshold)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_threshold(value: float, name: str, low: float = 0.0, high: float = 1.0) -> None:
    if not (_is_number(value) and low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _check_positive(value: float, name: str) -> None:
    if not (_is_number(value) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_backend(backend: Optional[str]) -> None:
    if backend not in (None, "numba", "torch"):
        raise ValueError(f"backend must be 'numba', 'torch' or None, got {backend!r}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _empty_long(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.long, device=device)
