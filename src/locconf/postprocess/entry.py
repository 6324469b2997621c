"""One entry point: one image's candidates to detections, with a method named in :data:`.methods.METHODS`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..candidates import SIGNALS, Candidates, check_fields
from .methods import check_method


def postprocess(candidates: Candidates, method: str = "nms", max_detections: int = 100, **params) -> dict:
    """Turn one image's candidates into detections with a named method.

    Args:
        candidates: one image's candidates, a dict as :class:`locconf.candidates.Candidates`
            (``boxes``, ``scores``, ``labels`` and the signals the method needs; without
            ``labels`` the suppression is class-agnostic).
        method: one of :data:`METHODS`.
        max_detections: keep at most this many detections, the highest scoring.
        **params: keyword arguments of the underlying function (e.g. ``iou_threshold``,
            ``sigma``, ``weight``, ``sigma_t``).

    Returns:
        dict of the same keys, holding the kept detections by decreasing score; ``boxes`` are the
        voted boxes for variance voting and ``scores`` the method's output scores.
    """
    if not isinstance(candidates, dict) or "boxes" not in candidates or "scores" not in candidates:
        raise ValueError("candidates must be a dict with at least 'boxes' and 'scores'")
    spec = check_method(method)
    if not isinstance(max_detections, int) or isinstance(max_detections, bool) or max_detections < 0:
        raise ValueError(f"max_detections must be a non-negative int, got {max_detections!r}")
    boxes, scores, labels = candidates["boxes"], candidates["scores"], candidates.get("labels")
    for need in spec.needs:
        if candidates.get(need) is None:
            raise ValueError(f"method {method!r} needs candidates[{need!r}], which this detector does not predict")
    # The method validates what it uses; the other signals are validated here, so that a malformed
    # one is reported rather than silently dropped from the output.
    unused = {k: candidates.get(k) for k in SIGNALS if k not in spec.needs}
    check_fields(boxes, scores, labels, **unused)
    result = spec.function(boxes, scores, *(candidates[k] for k in spec.needs), labels, **spec.fixed, **params)
    new_boxes = None
    if isinstance(result, Tensor):
        keep, new_scores = result, scores[result]
    elif spec.moves_boxes:
        keep, new_boxes, new_scores = result
    else:
        keep, new_scores = result
    order = torch.sort(new_scores, descending=True, stable=True).indices[:max_detections]
    keep = keep[order]
    out = {k: v[keep] for k, v in candidates.items() if isinstance(v, Tensor) and v.shape[:1] == boxes.shape[:1]}
    out["boxes"] = boxes[keep] if new_boxes is None else new_boxes[order]
    out["scores"] = new_scores[order]
    return out
