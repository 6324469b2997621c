"""Candidates: what a detector's ``candidates(images)`` returns, and what everything after it reads.

"A detector stops at candidates" (``docs/design.md``): every locconf detector's ``candidates``
(:class:`locconf.models.rcnn.RCNN`, :class:`locconf.models.one_stage.OneStageDetector`, a torchvision
detector wrapped by :func:`locconf.models.from_torchvision`) returns, per image, a plain ``dict`` of
tensors before any NMS (``model(images)`` in evaluation returns final detections, as torchvision's); :func:`locconf.postprocess.postprocess` turns
one into detections (a dict of the same fields, fewer rows), the evaluation
(:mod:`locconf.evaluation`) scores and analyses lists of them, and the file tools
(:mod:`locconf.postprocess_files`) read and write them as COCO result records. This module is the
one statement of that contract: :class:`Candidates` types it (a ``TypedDict``, so the runtime
objects stay plain dicts), :data:`SIGNALS` names the optional confidence signals,
:func:`signals` says which ones a dict carries, and :func:`check_fields` validates the fields.

The fields, for N candidates of one image (N may be 0: every tensor then has 0 rows):

* ``boxes`` (N, 4): xyxy, floating point, finite, ``x2 >= x1`` and ``y2 >= y1``, in the coordinates
  of the input image (of the ground-truth file, for evaluation).
* ``scores`` (N,): floating point, finite: what detections are ranked by (the class score, or the
  joint class x quality score of GFL / CLQ / ATSS's ``sigmoid(C) x centerness``).
* ``labels`` (N,): integer classes 1..K (0 is the background); post-processing is per class.
* ``quality`` (N,), optional: floating point, finite, in [0, 1]: the predicted localization
  quality (a predicted IoU for IoU-Net, DIR, IoU-direct and CLQ; centerness for ATSS).
* ``variances`` (N, 4), optional: floating point, positive: the predicted variance of each
  coordinate (KL-Loss), in pixels^2.
* ``cls_scores`` (N,), optional: the classification score alone, where ``scores`` also carries
  the quality (ATSS, CLQ); no post-processing method reads it.
* ``image_id`` (int): added by :func:`locconf.evaluation.collect_candidates` and the file readers.

A detector predicts at most the signals of its head (``quality`` or ``variances``); a
post-processing method names the signals it needs (``locconf.postprocess.METHODS[name].needs``).
Other tensor fields with one row per candidate are allowed: post-processing keeps them
row-aligned with the kept boxes (and drops fields that are not one row per candidate, such as
``image_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, TypedDict

import torch
from torch import Tensor

from .boxes import check_boxes

__all__ = ["Candidates", "SIGNALS", "signals", "check_fields", "candidates_of"]


class _RequiredFields(TypedDict):
    boxes: Tensor  # (N, 4) xyxy
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int, 1..K


class Candidates(_RequiredFields, total=False):
    """One image's candidates (see the module docstring for each field's shape and meaning).

    ``boxes``, ``scores`` and ``labels`` are always there; the others where the detector (or the
    evaluation) provides them. A ``TypedDict``: at runtime it is a plain ``dict``.
    """

    quality: Tensor  # (N,) predicted localization quality in [0, 1]
    variances: Tensor  # (N, 4) predicted coordinate variances, pixels^2, positive
    cls_scores: Tensor  # (N,) classification score alone (ATSS, CLQ)
    image_id: int  # set by collect_candidates and the file readers


#: The optional confidence signals a candidate may carry beyond its score, in a fixed order: the
#: fields that post-processing methods read (``locconf.postprocess.METHODS[name].needs``).
SIGNALS: tuple[str, ...] = ("quality", "variances")


def signals(candidates: Mapping[str, Any]) -> list[str]:
    """The confidence signals (of :data:`SIGNALS`, in that order) that one image's candidates carry as tensors."""
    return [k for k in SIGNALS if isinstance(candidates.get(k), Tensor)]


def candidates_of(model: Any, images: list[Tensor]) -> list[dict]:
    """One candidate dict per image from a detector in evaluation mode: the one place that asks a
    detector for its candidates (tiled prediction and test-time augmentation call it): its
    ``candidates(images)`` (every locconf detector, :func:`locconf.models.from_torchvision`'s
    wrapper and :class:`locconf.tta.TestTimeAugmentation` have one)."""
    if not callable(getattr(model, "candidates", None)):
        raise ValueError(f"model ({type(model).__name__}) has no candidates(images) method: use a locconf detector, "
                         "or wrap a torchvision one with locconf.models.from_torchvision")
    return model.candidates(images)


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


def check_fields(
    boxes: Tensor,
    scores: Tensor,
    labels: Optional[Tensor] = None,
    quality: Optional[Tensor] = None,
    variances: Optional[Tensor] = None,
) -> None:
    """Validate the fields of one image's candidates (None: absent); one host synchronisation for all value checks.

    A ``ValueError`` names the first bad field: shapes that do not match ``boxes``, another
    device, the wrong dtype, non-finite scores / quality, non-positive or non-finite variances.
    ``labels`` may be absent here (class-agnostic post-processing).
    """
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

