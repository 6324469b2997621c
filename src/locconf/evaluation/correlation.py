"""Correlation of a confidence signal with the true IoU: how well does it rank boxes by localization?

DIR (seed 002, Figure 4) matches each box to its ground truth and correlates the true IoU with the
detector's confidence: the classification score correlates poorly (Pearson 0.209 for Faster R-CNN)
for boxes with IoU > 0.5, a predicted IoU much better (0.755). :func:`confidence_correlation`
computes those numbers for any candidates (:mod:`.matching` for the matching and the signals;
:func:`locconf.evaluation.plots.plot_confidence` draws them).

Pearson and Spearman correlations are implemented here in float64 torch (Spearman with average
ranks for ties); an undefined correlation (fewer than two samples, or a constant input) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .matching import CONFIDENCE_SIGNALS, matched_signals

__all__ = ["rankdata", "pearson", "spearman", "confidence_correlation"]


def as_vector(x: Any, name: str) -> np.ndarray:
    """``x`` as an (n,) float64 array: a ``ValueError`` naming ``name`` unless it is 1-D and finite.

    A tensor is detached and moved to the CPU; anything else is read by ``numpy.asarray`` in float64
    (Python floats exactly, not through torch's float32 default). Shares memory where it can.
    """
    a = x.detach().cpu().to(torch.float64).numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return a


def as_pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Two vectors of the same length (:func:`as_vector`) as float64 CPU tensors."""
    x, y = torch.from_numpy(as_vector(x, "x")), torch.from_numpy(as_vector(y, "y"))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.numel()} and {y.numel()}")
    return x, y


def rankdata(x: Tensor | Sequence[float]) -> Tensor:
    """Ranks 1..n of ``x`` (n,), ties getting the average of the ranks they span. Returns float64 (n,)."""
    x = torch.from_numpy(as_vector(x, "x"))
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # rank of the last element of each group
    first = last - counts + 1
    return ((first + last) / 2)[inverse]


def pearson(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Pearson correlation of ``x`` and ``y`` (n,) each; NaN when n < 2 or either is constant."""
    x, y = as_pair(x, y)
    if x.numel() < 2 or x.min() == x.max() or y.min() == y.max():
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float(r.clamp(-1.0, 1.0))


def spearman(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when n < 2 or either is constant."""
    x, y = as_pair(x, y)
    if x.numel() < 2:
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def signal_correlations(iou: Tensor, values: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """``{signal: {"pearson", "spearman", "n"}}`` of each signal's values (n,) with the true ``iou`` (n,)."""
    return {
        s: {"pearson": pearson(v, iou), "spearman": spearman(v, iou), "n": int(iou.numel())}
        for s, v in values.items()
    }


def confidence_correlation(
    candidates: Sequence[Mapping],
    gts: Any,
    signals: Sequence[str] = CONFIDENCE_SIGNALS,
    min_iou: float = 0.5,
    min_score: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Correlation of each confidence signal with the true IoU (DIR, Fig. 4).

    Args:
        candidates: per-image :class:`locconf.candidates.Candidates` (raw candidates or
            post-processed detections; ``boxes``, ``labels``, ``scores``, optional ``quality``).
        gts: per-image targets (``boxes`` (M, 4), ``labels`` (M,), ``image_id``) or a data set
            with ``target(i)``; paired by ``image_id`` (else by position).
        signals: any of ``"score"``, ``"quality"``, ``"combined"``; missing ones are skipped.
        min_iou: only candidates whose true IoU is greater than this are used.
        min_score: only candidates with a score at least this are used.

    Returns:
        ``{signal: {"pearson": r, "spearman": rho, "n": n}}`` (NaN where undefined).
    """
    iou, values = matched_signals(candidates, gts, signals, min_iou, min_score)
    return signal_correlations(iou, values)
