"""Input validation of the post-processing methods: every bad argument raises a ``ValueError`` that names it.

The candidate tensors are validated by :func:`locconf.candidates.check_fields` (the candidates
contract); this module checks the methods' own arguments.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


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
