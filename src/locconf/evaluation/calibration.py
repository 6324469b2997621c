"""Calibrated localization confidence: does a predicted IoU of 0.8 mean an IoU of 0.8?

A quality head predicts the IoU of each box with its object;
:func:`locconf.evaluation.correlation.confidence_correlation` says how well it *ranks* boxes,
:func:`reliability_diagram` whether its values *mean* what they say (:func:`calibration_bins`:
expected calibration error, ECE; :func:`locconf.evaluation.plots.plot_reliability` draws it). This
module measures that, fits a monotone map from a signal to the expected true IoU and applies it.

The map is an isotonic regression (:func:`isotonic_regression`, pool-adjacent-violators): the
non-decreasing step function closest to the true IoUs in least squares. Its blocks become knots
(each block's mean signal, its fitted IoU), and :meth:`Calibration.calibrate` interpolates linearly
between knots (constant beyond the first and last): strictly increasing between the first and last
knot, so a calibrated signal never reverses the order of two boxes, it can only tie boxes beyond
the end knots. Under ``iou-guided`` NMS (ranking by quality alone) the ranking therefore does not
change; under quality NMS the geometric mean ``sqrt(score x quality)`` does.

What is fitted: the candidates matched to a ground truth of their class with IoU > ``min_iou``
(0.5, as the correlation analysis: :func:`locconf.evaluation.matching.match_to_ground_truth`), so
a calibrated quality of 0.8 means "if this box is on an object, its IoU is 0.8 on average". Only
``quality`` is calibrated by default (the localization confidence); ``score`` can be (``signals=("score",)``),
which turns the score into the same expected IoU.

A map needs data: :func:`fit_calibration` refuses fewer than :data:`MIN_BOXES` matched boxes (a
map fitted on one box sends every value to that box's IoU), and a calibration's knots must be
values of [0, 1] (IoUs, and scores or qualities that predict them).

Files: :meth:`Calibration.save` writes a small JSON (the knots per signal and how they were
fitted), read back by :meth:`Calibration.load`; ``locconf eval`` writes one into its output folder
(``calibration.json``) and ``locconf predict`` / ``locconf postprocess`` take it with
``--calibration FILE``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write_text
from .correlation import as_pair, as_vector
from .matching import CONFIDENCE_SIGNALS, matched_signals, pair_with_targets

__all__ = [
    "calibration_bins",
    "reliability_diagram",
    "isotonic_regression",
    "Calibration",
    "fit_calibration",
    "calibrate_out_of_fold",
    "evaluate_calibration",
    "CALIBRATED_SIGNALS",
    "MIN_BOXES",
    "TooFewBoxesError",
]

logger = logging.getLogger(__name__)

#: Signals a calibration may map (the candidate fields of the same name).
CALIBRATED_SIGNALS = ("quality", "score")

#: The fewest matched boxes :func:`fit_calibration` fits a map on by default: an isotonic map of a
#: handful of boxes is a few steps that send whole ranges of values to one box's IoU.
MIN_BOXES = 50

_FORMAT = "locconf-calibration"
_VERSION = 1
_FIELD = {"quality": "quality", "score": "scores"}


# --------------------------------------------------------------------------------------------
# Measuring: reliability diagrams and the expected calibration error
# --------------------------------------------------------------------------------------------


def calibration_bins(pred: Tensor | Sequence[float], true: Tensor | Sequence[float], bins: int = 10) -> dict:
    """Reliability diagram of predictions ``pred`` (n,) of ``true`` (n,) values, and its ECE.

    ``bins`` equal-width bins of [0, 1] by ``pred`` (bin ``k`` holds ``k/bins <= pred < (k+1)/bins``,
    the last one includes 1; predictions outside [0, 1] fall into the end bins). The expected
    calibration error is ``sum_k n_k / n * |mean pred_k - mean true_k|``.

    Returns:
        JSON-ready ``{"edges": [bins + 1], "count": [bins], "mean_pred": [bins], "mean_true": [bins],
        "ece": float, "n": int}``; the means of an empty bin are None, the ECE of no data is NaN.
    """
    pred, true = as_pair(pred, true)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    index = (pred * bins).floor().clamp(0, bins - 1).long()
    count = torch.bincount(index, minlength=bins).to(torch.float64)
    sum_pred = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, pred)
    sum_true = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, true)
    n = int(pred.numel())
    ece = float((sum_pred - sum_true).abs().sum() / n) if n else math.nan
    safe = count.clamp(min=1)
    mean_pred, mean_true = (sum_pred / safe).tolist(), (sum_true / safe).tolist()
    empty = (count == 0).tolist()
    return {"edges": [k / bins for k in range(bins + 1)], "count": [int(c) for c in count.tolist()],
            "mean_pred": [None if e else m for m, e in zip(mean_pred, empty)],
            "mean_true": [None if e else m for m, e in zip(mean_true, empty)], "ece": ece, "n": n}


def reliability_diagram(
    candidates: Sequence[Mapping],
    gts: Any,
    signals: Sequence[str] = CONFIDENCE_SIGNALS,
    bins: int = 10,
    min_iou: float = 0.5,
    min_score: float = 0.0,
) -> dict[str, dict]:
    """Each confidence signal read as a predicted IoU: :func:`calibration_bins` against the true IoU.

    The candidates are matched as in :func:`locconf.evaluation.confidence_correlation` (best IoU
    with a ground truth of their class, kept when it is greater than ``min_iou`` and the score is at
    least ``min_score``); a signal the candidates lack is skipped.

    Returns:
        ``{signal: calibration_bins(...)}``.
    """
    iou, values = matched_signals(candidates, gts, signals, min_iou, min_score)
    return {s: calibration_bins(v, iou, bins) for s, v in values.items()}


# --------------------------------------------------------------------------------------------
# Fitting and applying a monotone map
# --------------------------------------------------------------------------------------------


def isotonic_regression(x: Any, y: Any, weights: Any = None) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression of ``y`` on ``x`` by pool-adjacent-violators.

    Minimises ``sum w_i (y_i - f_i)^2`` over ``f`` non-decreasing in ``x``; points with equal ``x``
    get the same value.

    Args:
        x, y: (N,) finite values. weights: (N,) positive weights (default: ones).

    Returns:
        (N,) float64 fitted values, in the input order.
    """
    x, y = as_vector(x, "x"), as_vector(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    w = np.ones_like(x) if weights is None else as_vector(weights, "weights")
    if w.shape != x.shape:
        raise ValueError(f"weights must have the length of x ({x.size}), got {w.size}")
    if (w <= 0).any():
        raise ValueError("weights must be positive")
    if x.size == 0:
        return np.zeros(0)
    ux, inverse = np.unique(x, return_inverse=True)  # ties in x pooled first: one value per distinct x
    sw = np.bincount(inverse, weights=w)
    sy = np.bincount(inverse, weights=w * y)
    # the stack of blocks: total weight, weighted sum of y, number of distinct x values
    bw, by, bn = [], [], []
    for wi, yi in zip(sw.tolist(), sy.tolist()):
        bw.append(wi), by.append(yi), bn.append(1)
        while len(bw) > 1 and by[-2] * bw[-1] >= by[-1] * bw[-2]:  # mean of previous >= mean of last: pool
            w2, y2, n2 = bw.pop(), by.pop(), bn.pop()
            bw[-1] += w2
            by[-1] += y2
            bn[-1] += n2
    values = np.repeat(np.asarray(by) / np.asarray(bw), bn)  # per distinct x
    return values[inverse]


def _knots(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots of the isotonic fit: per block of equal fitted value, its weighted mean ``x`` and value."""
    fitted = isotonic_regression(x, y, weights)
    order = np.argsort(x, kind="stable")
    xs, fs, ws = x[order], fitted[order], weights[order]
    starts = np.flatnonzero(np.r_[True, fs[1:] != fs[:-1]])
    kw = np.add.reduceat(ws, starts)
    kx = np.add.reduceat(ws * xs, starts) / kw
    return kx, fs[starts]


class Calibration:
    """Monotone maps from confidence signals to the expected true IoU (isotonic knots per signal).

    Attributes:
        knots: ``{signal: (x, y)}`` float64 (K,) arrays, ``x`` and ``y`` strictly increasing.
        info: how it was fitted (``min_iou``, ``min_score``, sample counts ``n``), saved with it.
    """

    def __init__(self, knots: Mapping[str, tuple[Any, Any]], info: Optional[Mapping[str, Any]] = None):
        self.knots: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for signal, pair in knots.items():
            if signal not in CALIBRATED_SIGNALS:
                raise ValueError(f"calibration signal must be one of {CALIBRATED_SIGNALS}, got {signal!r}")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"knots[{signal!r}] must be a pair (x, y)")
            kx, ky = as_vector(pair[0], f"knots[{signal!r}].x"), as_vector(pair[1], f"knots[{signal!r}].y")
            if kx.size == 0 or kx.shape != ky.shape:
                raise ValueError(f"knots[{signal!r}] must have as many x as y values, at least one, "
                                 f"got {kx.size} and {ky.size}")
            if (np.diff(kx) <= 0).any() or (np.diff(ky) < 0).any():
                raise ValueError(f"knots[{signal!r}]: x must be strictly increasing and y non-decreasing")
            for axis, values in (("x", kx), ("y", ky)):
                if values.min() < 0 or values.max() > 1:
                    what = "IoUs" if axis == "y" else f"{signal} values, which predict an IoU"
                    raise ValueError(f"knots[{signal!r}].{axis} must lie in [0, 1] ({what}), got values from "
                                     f"{values.min():g} to {values.max():g}")
            self.knots[signal] = (kx, ky)
        self.info = dict(info or {})

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}: {len(k[0])} knots" for s, k in self.knots.items())
        return f"Calibration({sizes})"

    def calibrate(self, signal: str, values: Tensor) -> Tensor:
        """Map ``values`` (N,) of ``signal`` to the expected true IoU (N,), same dtype and device."""
        if signal not in self.knots:
            raise ValueError(f"this calibration has no map for {signal!r} (it has {sorted(self.knots)})")
        kx, ky = self.knots[signal]
        v = values.detach().cpu().to(torch.float64).numpy()
        out = np.interp(v, kx, ky)
        return torch.from_numpy(out).to(device=values.device, dtype=values.dtype)

    def apply(self, candidates: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of one image's candidates with every signal this calibration maps replaced.

        ``quality`` (and ``scores`` for a ``score`` map) must be present: a missing one is a
        ``ValueError`` (a calibration of quality applied to a detector that predicts none).
        """
        out = dict(candidates)
        for signal in self.knots:
            field = _FIELD[signal]
            values = candidates.get(field)
            if not isinstance(values, Tensor):
                raise ValueError(f"the calibration maps {signal!r} but the candidates have no {field!r} "
                                 "(a calibration fitted on another detector?)")
            out[field] = self.calibrate(signal, values)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION, "kind": "isotonic",
                "signals": {s: {"x": kx.tolist(), "y": ky.tolist()} for s, (kx, ky) in self.knots.items()},
                "info": self.info}

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"{source}: not a locconf calibration (no \"format\": \"{_FORMAT}\")")
        if data.get("version") != _VERSION:
            raise ValueError(f"{source}: calibration version {data.get('version')!r} is not supported "
                             f"(expected {_VERSION})")
        signals = data.get("signals")
        if not isinstance(signals, Mapping) or not signals:
            raise ValueError(f"{source}: 'signals' must be a non-empty mapping {{signal: {{x, y}}}}")
        knots = {}
        for s, k in signals.items():
            if not isinstance(k, Mapping) or not isinstance(k.get("x"), list) or not isinstance(k.get("y"), list):
                raise ValueError(f"{source}: signals.{s} must have lists 'x' and 'y'")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in k["x"] + k["y"]):
                raise ValueError(f"{source}: signals.{s}.x and .y must hold numbers")
            knots[s] = (k["x"], k["y"])
        try:
            return cls(knots, data.get("info") or {})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON (through a temporary file renamed at the end)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        from ..data.coco import read_json

        from ..files import require_file

        path = require_file(path, "calibration file", "give the calibration.json that locconf eval wrote")
        cal = cls.from_dict(read_json(path), source=str(path))
        n = cal.info.get("n")
        if isinstance(n, int) and n < MIN_BOXES:
            logger.warning("%s was fitted on only %d matched boxes (fewer than %d): its map is coarse", path, n,
                           MIN_BOXES)
        return cal


def _check_signals(signals: Any) -> tuple[str, ...]:
    if isinstance(signals, str) or not isinstance(signals, Sequence) or not signals:
        raise ValueError(f"signals must be a non-empty list of {CALIBRATED_SIGNALS}, got {signals!r}")
    for s in signals:
        if s not in CALIBRATED_SIGNALS:
            raise ValueError(f"signals: {s!r} is not one of {CALIBRATED_SIGNALS}")
    return tuple(signals)


class TooFewBoxesError(ValueError):
    """Fewer matched boxes than a calibration needs (:func:`fit_calibration`'s ``min_boxes``)."""


def _check_min_boxes(min_boxes: Any) -> int:
    if isinstance(min_boxes, bool) or not isinstance(min_boxes, int) or min_boxes < 1:
        raise ValueError(f"min_boxes must be an int >= 1, got {min_boxes!r}")
    return min_boxes


def fit_calibration(candidates: Sequence[Mapping], gts: Any, signals: Sequence[str] = ("quality",),
                    min_iou: float = 0.5, min_score: float = 0.0, min_boxes: int = MIN_BOXES
                    ) -> Optional[Calibration]:
    """Fit an isotonic map per signal on the candidates matched to a ground truth (IoU > ``min_iou``).

    Args:
        candidates: per-image :class:`locconf.candidates.Candidates` (``quality`` optional).
        gts: their targets, or a data set with ``target(i)`` (as :func:`locconf.evaluation.confidence_correlation`).
        signals: ``"quality"`` and/or ``"score"``; a signal the candidates lack is skipped.
        min_iou, min_score: which candidates are fitted on.
        min_boxes: the fewest matched candidates a map is fitted on (:data:`MIN_BOXES`).

    Returns:
        A :class:`Calibration`, or None when no signal could be fitted (no quality predicted, or no
        candidate matched).

    Raises:
        TooFewBoxesError: some, but fewer than ``min_boxes``, candidates matched (a ``ValueError``; the
            message says how many).
    """
    signals = _check_signals(signals)
    min_boxes = _check_min_boxes(min_boxes)
    iou, values = matched_signals(candidates, gts, signals, min_iou, min_score)
    if iou.numel() == 0:
        return None
    if iou.numel() < min_boxes and any(s in values for s in signals):
        fitted = ", ".join(s for s in signals if s in values)
        raise TooFewBoxesError(f"a calibration of {fitted} needs at least {min_boxes} "
                               f"candidates matched to a ground truth (IoU > {min_iou}); {iou.numel()} matched in "
                               f"{len(candidates)} images: fit it on more images (or lower min_boxes)")
    y = iou.numpy()
    knots = {s: _knots(values[s].numpy(), y, np.ones_like(y)) for s in signals if s in values}
    if not knots:
        return None
    return Calibration(knots, {"min_iou": min_iou, "min_score": min_score, "n": int(iou.numel())})


def calibrate_out_of_fold(candidates: Sequence[Mapping], gts: Any, signals: Sequence[str] = ("quality",),
                          folds: int = 2, min_iou: float = 0.5, min_score: float = 0.0,
                          min_boxes: int = MIN_BOXES) -> Optional[list[dict]]:
    """Calibrated candidates where each image's map was fitted on the *other* images (cross-fitting).

    Images are split by position into ``folds`` interleaved folds (image ``i`` in fold ``i % folds``);
    each fold is calibrated with the map fitted on the others, so ECE and AP measured on the result
    are out-of-sample. Returns None when a fold's complement has nothing to fit; a complement with
    fewer than ``min_boxes`` matched boxes raises :class:`TooFewBoxesError`.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    pairs = pair_with_targets(candidates, gts)
    out: list[Optional[dict]] = [None] * len(pairs)
    for k in range(folds):
        rest = [i for i in range(len(pairs)) if i % folds != k]
        calibration = fit_calibration([pairs[i][0] for i in rest], [pairs[i][1] for i in rest], signals,
                                      min_iou, min_score, min_boxes)
        if calibration is None:
            return None
        for i in range(k, len(pairs), folds):
            out[i] = calibration.apply(pairs[i][0])
    return [o for o in out if o is not None]


def evaluate_calibration(candidates: Sequence[Mapping], gts: Any, bins: int = 10, min_iou: float = 0.5,
                         min_score: float = 0.0, folds: int = 2, min_boxes: int = MIN_BOXES) -> dict[str, Any]:
    """How calibrated each signal is, and how much an isotonic map fitted on other images helps.

    Every signal the candidates have (``score``, ``quality``, ``combined``) gets a reliability
    diagram (:func:`reliability_diagram`) as predicted, and one after out-of-fold
    isotonic calibration of ``score`` and ``quality`` (:func:`calibrate_out_of_fold`; ``combined``
    is then recomputed from the calibrated pair).

    Returns:
        ``{"diagrams": {"raw": {signal: bins}, "calibrated": {...}}``, ``"ece": {signal: {"raw",
        "calibrated", "n"}}`` (``calibrated`` None where nothing could be fitted), ``"calibration"``:
        the :class:`Calibration` of ``quality`` fitted on all images (None without quality, or with
        fewer than ``min_boxes`` matched boxes), ``"quality_calibrated"``: the candidates with
        out-of-fold calibrated quality only (None without quality, or when a fold has too few
        boxes), for scoring the quality-ranked methods, and ``"skipped"``: why a map was not fitted
        (None when nothing was skipped for lack of boxes).
    """
    min_boxes = _check_min_boxes(min_boxes)
    skipped: list[str] = []

    def attempt(fit, *args):
        try:
            return fit(*args)
        except TooFewBoxesError as e:
            skipped.append(str(e))
            return None

    raw = reliability_diagram(candidates, gts, CONFIDENCE_SIGNALS, bins, min_iou, min_score)
    both = attempt(calibrate_out_of_fold, candidates, gts, ("quality", "score"), folds, min_iou, min_score,
                   min_boxes) if raw else None
    calibrated = reliability_diagram(both, gts, CONFIDENCE_SIGNALS, bins, min_iou, min_score) if both else {}
    ece = {s: {"raw": d["ece"], "calibrated": calibrated[s]["ece"] if s in calibrated else None, "n": d["n"]}
           for s, d in raw.items()}
    has_quality = "quality" in raw
    calibration = attempt(fit_calibration, candidates, gts, ("quality",), min_iou, min_score, min_boxes) \
        if has_quality else None
    quality_calibrated = attempt(calibrate_out_of_fold, candidates, gts, ("quality",), folds, min_iou, min_score,
                                 min_boxes) if has_quality else None
    return {
        "diagrams": {"raw": raw, **({"calibrated": calibrated} if calibrated else {})},
        "ece": ece,
        "calibration": calibration,
        "quality_calibrated": quality_calibrated,
        "skipped": skipped[-1] if skipped else None,
    }
