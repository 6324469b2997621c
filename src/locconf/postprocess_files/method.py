"""Post-processing one image's candidates read from a file: the method, its checks and the calibration."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..postprocess import METHODS, postprocess
from .source import _Source

#: Methods accepted on files: those of :func:`locconf.postprocess.postprocess`, and ``"none"``
#: (keep every candidate; only the score threshold and the per-image cap apply).
FILE_METHODS = ("none",) + tuple(METHODS)


def _empty_candidates() -> dict:
    """No candidates, with every field a file may carry (float64, as the files are read)."""
    return {"boxes": torch.zeros(0, 4, dtype=torch.float64), "scores": torch.zeros(0, dtype=torch.float64),
            "labels": torch.zeros(0, dtype=torch.int64), "quality": torch.zeros(0, dtype=torch.float64),
            "variances": torch.zeros(0, 4, dtype=torch.float64)}


def _check_method(method: str, params: Mapping, max_detections: int, score_threshold: float) -> dict:
    if method not in FILE_METHODS:
        raise ValueError(f"method must be one of {', '.join(FILE_METHODS)}; got {method!r}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of keyword arguments, got {type(params).__name__}")
    params = dict(params)
    if method == "none" and params:
        raise ValueError(f"params: method 'none' takes no parameters, got {sorted(params)}")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive int, got {max_detections!r}")
    if (isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float))
            or not math.isfinite(score_threshold)):
        raise ValueError(f"score_threshold must be a finite number, got {score_threshold!r}")
    if method != "none":  # a dry run on no boxes checks the parameters' names and values
        try:
            postprocess(_empty_candidates(), method, max_detections, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"params: {e}") from None
    return params


def _apply(cand: dict, method: str, params: dict, max_detections: int, score_threshold: float,
           class_agnostic: bool) -> dict:
    """Threshold, post-process and cap one image's candidates; carries ``row`` (input position)."""
    n = cand["scores"].shape[0]
    fields = {k: cand[k] for k in ("boxes", "scores", "category", "quality", "variances") if k in cand}
    fields["row"] = torch.arange(n)
    keep = torch.nonzero(fields["scores"] >= score_threshold).flatten()
    if keep.numel() < n:
        fields = {k: v[keep] for k, v in fields.items()}
    if method == "none":
        order = torch.sort(fields["scores"], descending=True, stable=True).indices[:max_detections]
        return {k: v[order] for k, v in fields.items()}
    if not class_agnostic:
        fields["labels"] = fields["category"]
    return postprocess(fields, method, max_detections, **params)


def _load_calibration(calibration: Any, sources: Sequence[_Source]) -> Any:
    """``calibration`` (a :class:`locconf.evaluation.Calibration` or its JSON file) checked against the files."""
    if calibration is None:
        return None
    from ..evaluation.calibration import Calibration

    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    for src in sources:
        if "quality" in cal.knots and not src.has_quality and src.num_records:
            raise ValueError(f"{src.path}: the calibration maps 'quality' but record 0 has none")
    return cal


def _check_signals(src: _Source, method: str) -> None:
    has = {"quality": src.has_quality, "variances": src.has_variance}  # by candidate signal
    field = {"quality": "quality", "variances": "variance"}  # a signal's name in a record
    for need in METHODS[method].needs if method in METHODS else ():
        if not has[need] and src.num_records:
            raise ValueError(f"{src.path}: method {method!r} needs a {field[need]!r} in every record; "
                             "record 0 has none")
