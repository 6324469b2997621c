"""Validation of :func:`locconf.fusion.fuse`'s candidate lists and model weights: a bad one raises a
``ValueError`` that names it (``candidate_lists[i]['field']``, ``model_weights[i]``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from ..boxes import check_boxes


def _check_field(x: object, name: str, shape: tuple, device: torch.device, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} to match the boxes, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but candidate_lists[0]['boxes'] is on {device}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def _check_values(out: dict, where: str) -> None:
    """Scores and quality finite, variances finite and positive (one host synchronisation)."""
    checks = {k: torch.isfinite(out[k]).all() for k in ("scores", "quality", "variances") if k in out}
    if "variances" in out:
        checks["variances"] = checks["variances"] & (out["variances"] > 0).all()
    for key, ok in zip(checks, torch.stack(list(checks.values())).tolist()):
        if not ok:
            what = "finite and positive" if key == "variances" else "finite (no NaN or inf)"
            raise ValueError(f"{where}[{key!r}] must be {what}")


def _check_list(cand: object, where: str, device: Optional[torch.device], weight: str) -> dict:
    """One candidate list as a dict of checked tensors, on ``device`` (None: its own)."""
    if not isinstance(cand, Mapping):
        raise ValueError(f"{where} must be a dict with 'boxes', 'scores' and 'labels', got {type(cand).__name__}")
    for key in ("boxes", "scores", "labels"):
        if key not in cand:
            raise ValueError(f"{where} has no {key!r}")
    boxes = check_boxes(cand["boxes"], f"{where}['boxes']")
    device = boxes.device if device is None else device
    if boxes.device != device:
        raise ValueError(f"{where}['boxes'] is on {boxes.device} but candidate_lists[0]['boxes'] is on {device}")
    n = boxes.shape[0]
    out = {"boxes": boxes,
           "scores": _check_field(cand["scores"], f"{where}['scores']", (n,), device),
           "labels": _check_field(cand["labels"], f"{where}['labels']", (n,), device, floating=False)}
    if cand.get("quality") is not None:
        out["quality"] = _check_field(cand["quality"], f"{where}['quality']", (n,), device)
    if cand.get("variances") is not None:
        out["variances"] = _check_field(cand["variances"], f"{where}['variances']", (n, 4), device)
    need = {"quality": "quality", "variance": "variances"}.get(weight)
    if need is not None and need not in out:
        raise ValueError(f"weight={weight!r} needs {where}[{need!r}], which is missing")
    if n:
        _check_values(out, where)
    return out


def _check_lists(candidate_lists: Sequence[Mapping], weight: str) -> tuple[torch.device, list[dict]]:
    """Validate every list; returns the device and the lists as dicts of checked tensors."""
    if isinstance(candidate_lists, (Mapping, str)) or not isinstance(candidate_lists, Sequence):
        raise ValueError("candidate_lists must be a list of candidate dicts (one per model or pass), "
                         f"got {type(candidate_lists).__name__}")
    device = None
    checked = []
    for i, cand in enumerate(candidate_lists):
        checked.append(_check_list(cand, f"candidate_lists[{i}]", device, weight))
        device = checked[-1]["boxes"].device
    return device, checked


def _check_model_weights(model_weights: Optional[Sequence[float]], m: int) -> list[float]:
    if model_weights is None:
        return [1.0] * m
    if isinstance(model_weights, Tensor):
        model_weights = model_weights.tolist()
    if isinstance(model_weights, (str, Mapping)) or not isinstance(model_weights, Sequence):
        raise ValueError(f"model_weights must be a list of {m} positive numbers, got {type(model_weights).__name__}")
    if len(model_weights) != m:
        raise ValueError(f"model_weights must have one weight per candidate list ({m}), got {len(model_weights)}")
    for i, w in enumerate(model_weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ValueError(f"model_weights[{i}] must be a positive finite number, got {w!r}")
    return [float(w) for w in model_weights]
