"""Localization-aware box fusion: weighted boxes fusion (WBF) with the weight of each box chosen by name.

Weighted boxes fusion (Solovyev, Wang and Gabruseva, "Weighted boxes fusion: Ensembling boxes from
different object detection models", 2021) merges the detections of several models, or of several
test-time-augmented passes of one model, of **one image**:

1. All boxes of one class, taken in decreasing order of ``score * model_weight``, are clustered
   greedily: a box joins the cluster whose *current fused box* it overlaps most, if that IoU is
   greater than ``iou_threshold``; otherwise it starts a new cluster.
2. A cluster's fused box is the weighted per-coordinate mean of its members' boxes. Classic WBF
   weighs every box by its (model-weighted) classification score. :func:`fuse` also weighs by
   localization confidence:

   * ``weight="score"``: ``w = score * model_weight`` (classic WBF);
   * ``weight="quality"``: ``w = quality * model_weight``, ``quality`` the predicted IoU clamped
     to [0, 1] (IoU-Net, DIR);
   * ``weight="variance"``: ``w_k = model_weight / variance_k`` for each coordinate ``k`` of
     ``(x1, y1, x2, y2)``: inverse-variance weighting, i.e. KL-Loss's variance voting across
     models (a model weight of 2 counts a model as two independent observations).

   Should every weight of a coordinate in a cluster be 0 (e.g. all scores 0), that coordinate is
   the unweighted mean.
3. Reported per fused box:

   * ``scores``: WBF's confidence of the cluster, from the classification scores whatever the
     ``weight``, by ``conf_type`` (``s_i`` a member's score, ``w_i`` its model's weight, ``n``
     the members, ``M`` the number of candidate lists, ``W`` their weights):
     ``"avg"``: ``sum(s_i w_i) / n * min(n, M) / sum(W)`` (``n`` instead of ``min(n, M)`` with
     ``allows_overflow``); ``"max"``: ``max(s_i w_i) / max(W)``; ``"box_and_model_avg"``:
     ``sum(s_i w_i) / sum(w_i) * sum(W of the models present) / sum(W)``;
     ``"absent_model_aware_avg"``: ``sum(s_i w_i) / (sum(w_i) + sum(W of the models absent))``;
   * ``quality`` (when every list has it): the model-weighted mean ``sum(w_i q_i) / sum(w_i)`` of
     the members' predicted IoU;
   * ``variances`` (when every list has them): ``sum_i a_ik^2 v_ik``, where ``a_ik`` are the
     normalised weights of coordinate ``k``: the variance of the fused coordinate if the
     members' errors were independent. With ``weight="variance"`` and unit model weights this is
     ``1 / sum_i (1 / v_ik)``, the product-of-Gaussians variance. Models trained on the same data
     make correlated errors, so read it as a lower bound.

Against ensemble-boxes (``ensemble_boxes.weighted_boxes_fusion``, v1.0.9), with ``weight="score"``
the fused boxes, scores and labels agree to 1e-6 (tests/test_fusion.py) where inputs are valid for
both. Differences:

* ensemble-boxes expects coordinates normalised to [0, 1]: it clips every coordinate into [0, 1],
  swaps ``x2 < x1`` and skips zero-area boxes, each with only a warning (pixel boxes are clipped
  to 1 rather than refused). We take boxes in any unit
  (pixels), reject ``x2 < x1`` with a ``ValueError``, and keep zero-area boxes (they match
  nothing, IoU 0, and form clusters of their own).
* ensemble-boxes accumulates fused boxes in float32; we compute in float64 and return the input's
  floating dtype. Where a box's IoU with two clusters (or with the threshold) differs by less than
  float32 rounding, the box can therefore join a different cluster there: in
  ``benchmarks/fusion.py``'s scene of 3 x 20,000 raw candidates one box of 60,000 does, and two
  fused boxes differ by up to 0.011 (in [0, 1] units); with ensemble-boxes' fused boxes
  accumulated in float64 instead, the outputs agree to 2.2e-15.
* A cluster whose scores are all 0 gets NaN coordinates in ensemble-boxes; here the unweighted mean.
* Among equal ``score * model_weight``, we take boxes by list, then by position in the list;
  ensemble-boxes' order among ties follows numpy's (unstable) ``argsort``. Among clusters that a box
  overlaps equally, both take the oldest. The output is sorted by decreasing score, ties in
  cluster-creation order.
* Bad input (shapes, NaN/inf, unknown ``conf_type``) is a ``ValueError`` naming the argument here;
  ensemble-boxes prints a message and exits the interpreter for some of these.

How the clustering stays fast
-----------------------------
The greedy clustering is sequential: which cluster a box joins depends on the fused boxes that the
boxes before it produced. It runs in one compiled numba loop over the boxes (on the CPU, whatever the
tensors' device), and finds the clusters a box may join through a uniform grid. A fused box is a
per-coordinate mean of its members, so each of its coordinates stays within the members' range of
that coordinate, and that range only grows. A cluster is listed in every grid cell of a region that
must meet box ``j`` for IoU > ``iou_threshold``:

* ``iou_threshold >= 0.5``: the region its fused box's centre can reach. If the centre of a box F
  is not strictly inside box j, their intersection is at most half of F's area (and at most j's),
  so IoU <= 1/2.
* otherwise: the members' hull, which contains the fused box (any overlap needs it to meet j).

A box is compared only with the clusters listed in the cells it covers, not with every cluster, so
the cost grows about linearly with the number of boxes rather than quadratically
(``benchmarks/fusion.py``). Everything else (weights, fused coordinates, scores, quality,
variances) is vectorised torch on the tensors' device.
"""


from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from .checks import _check_lists, _check_model_weights

__all__ = ["fuse", "WEIGHTS", "CONF_TYPES"]

#: What a box's weight in its cluster's fused box is.
WEIGHTS = ("score", "quality", "variance")

#: How a cluster's fused score is computed (ensemble-boxes' names).
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


def _check_options(weight: str, iou_threshold: float, skip_box_threshold: float, conf_type: str,
                   allows_overflow: bool) -> None:
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
    if (isinstance(skip_box_threshold, bool) or not isinstance(skip_box_threshold, (int, float))
            or not (math.isfinite(skip_box_threshold) and skip_box_threshold >= 0)):
        raise ValueError(f"skip_box_threshold must be a finite number >= 0, got {skip_box_threshold!r}")
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
    if not isinstance(allows_overflow, bool):
        raise ValueError(f"allows_overflow must be a bool, got {allows_overflow!r}")


def _empty(device, dtype, label_dtype, quality: bool, variances: bool) -> dict:
    out = {"boxes": torch.empty(0, 4, device=device, dtype=dtype),
           "scores": torch.empty(0, device=device, dtype=dtype),
           "labels": torch.empty(0, device=device, dtype=label_dtype)}
    if quality:
        out["quality"] = torch.empty(0, device=device, dtype=dtype)
    if variances:
        out["variances"] = torch.empty(0, 4, device=device, dtype=dtype)
    return out


def _concat(lists: list[dict], device: torch.device) -> tuple:
    """The rows of all lists: boxes (n, 4), scores (n,), labels (n,) int64, model (n,) the list of
    each row, quality (n,) and variances (n, 4) where every list has them (else None); float64."""
    has_q = all("quality" in c for c in lists)
    has_v = all("variances" in c for c in lists)
    boxes = torch.cat([c["boxes"].to(torch.float64) for c in lists])
    scores = torch.cat([c["scores"].to(torch.float64) for c in lists])
    labels = torch.cat([c["labels"].to(torch.int64) for c in lists])
    model = torch.cat([torch.full((c["boxes"].shape[0],), i, device=device, dtype=torch.long)
                       for i, c in enumerate(lists)])
    quality = torch.cat([c["quality"].to(torch.float64) for c in lists]) if has_q else None
    variances = torch.cat([c["variances"].to(torch.float64) for c in lists]) if has_v else None
    return boxes, scores, labels, model, quality, variances


def _rank(keep: Tensor, scores: Tensor, labels: Tensor, model: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """The rows ``keep`` ordered by (label, decreasing score * model weight, list, position), and
    the model weight of each, in that order."""
    w_box = W[model[keep]]
    rank = scores[keep] * w_box
    order = torch.sort(rank, descending=True, stable=True).indices
    order = order[torch.sort(labels[keep][order], stable=True).indices]
    return keep[order], w_box[order]


def _box_weights(weight: str, s: Tensor, wb: Tensor, quality: Optional[Tensor], variances: Optional[Tensor]) -> Tensor:
    """(n, 4) weight of each box's coordinates in its cluster's fused box (see the module docstring)."""
    if weight == "score":
        return (s * wb)[:, None].expand(-1, 4)
    if weight == "quality":
        return (quality.clamp(0, 1) * wb)[:, None].expand(-1, 4)
    return wb[:, None] / variances


def _csum(x: Tensor, cl: Tensor, k: int) -> Tensor:
    """Per-cluster sums (k, ...) of the rows of ``x`` (n,) or (n, 4); ``cl`` (n,) the cluster of each row."""
    return torch.zeros((k,) + tuple(x.shape[1:]), device=cl.device, dtype=torch.float64).index_add_(0, cl, x)


def _fuse_boxes(b: Tensor, cw: Tensor, cl: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused boxes (k, 4): per-coordinate weighted means of the members, the plain mean where a
    coordinate's weights sum to 0. Also returns each member's normalised weights (n, 4) and the
    member count of each cluster (k,)."""
    n_members = _csum(torch.ones(b.shape[0], device=b.device, dtype=torch.float64), cl, k)
    den = _csum(cw, cl, k)
    mean = _csum(b, cl, k) / n_members[:, None]
    fused_boxes = torch.where(den > 0, _csum(cw * b, cl, k) / den.clamp(min=1e-300), mean)
    a = torch.where(den[cl] > 0, cw / den[cl].clamp(min=1e-300), 1.0 / n_members[cl][:, None])
    return fused_boxes, a, n_members


def _fused_scores(conf_type: str, allows_overflow: bool, sw: Tensor, sum_sw: Tensor, sum_w: Tensor,
                  n_members: Tensor, cl: Tensor, mod: Tensor, W: Tensor) -> Tensor:
    """(k,) WBF confidence of each cluster by ``conf_type`` (see the module docstring): ``sw`` (n,)
    score * model weight of each member, ``sum_sw`` and ``sum_w`` (k,) their and the model
    weights' sums per cluster, ``mod`` (n,) the list of each member, ``W`` (M,) the lists' weights."""
    m, k, w_sum = W.shape[0], n_members.shape[0], W.sum()
    if conf_type == "avg":
        factor = n_members if allows_overflow else n_members.clamp(max=m)
        return sum_sw / n_members * factor / w_sum
    if conf_type == "max":
        best = torch.zeros(k, device=cl.device, dtype=torch.float64)
        return best.scatter_reduce_(0, cl, sw, reduce="amax", include_self=False) / W.max()
    present = torch.zeros(k, m, dtype=torch.bool, device=cl.device)
    present[cl, mod] = True
    w_present = (present.to(torch.float64) * W).sum(1)
    if conf_type == "box_and_model_avg":
        return sum_sw / sum_w * w_present / w_sum
    return sum_sw / (sum_w + (w_sum - w_present))


def fuse(
    candidate_lists: Sequence[Mapping],
    weight: str = "score",
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
    model_weights: Optional[Sequence[float]] = None,
    conf_type: str = "avg",
    allows_overflow: bool = False,
) -> dict:
    """Fuse the candidates of several models (or test-time passes) of one image into one set.

    Args:
        candidate_lists: M dicts, one per model or pass, each with ``boxes`` (N_m, 4) xyxy in any
            unit (pixels), ``scores`` (N_m,), integer ``labels`` (N_m,) and optionally
            ``quality`` (N_m,) (predicted IoU) and ``variances`` (N_m, 4) (predicted sigma^2 of
            x1, y1, x2, y2, positive). All on one device.
        weight: a box's weight in its cluster's fused box: ``"score"`` (classic WBF),
            ``"quality"`` or ``"variance"`` (see the module docstring).
        iou_threshold: a box joins the cluster whose fused box it overlaps most when that IoU is
            greater than this; in [0, 1].
        skip_box_threshold: boxes with a score below this are ignored; a number >= 0.
        model_weights: M positive weights of the lists (default: all 1).
        conf_type: how the fused score is computed, one of :data:`CONF_TYPES`.
        allows_overflow: with ``conf_type="avg"``, do not cap the number of members at M when
            rescaling (the score may then exceed the largest input score).

    Returns:
        dict with ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,), and ``quality`` (K,) /
        ``variances`` (K, 4) when every list has them; by decreasing score. Floating tensors in
        the promoted dtype of the inputs' boxes, labels in the first list's label dtype, on the
        inputs' device. No candidate list (or no box) gives empty tensors.
    """
    _check_options(weight, iou_threshold, skip_box_threshold, conf_type, allows_overflow)
    device, lists = _check_lists(candidate_lists, weight)
    mw = _check_model_weights(model_weights, len(lists))
    if not lists:
        return _empty(torch.device("cpu"), torch.float32, torch.int64, False, False)
    dtype = lists[0]["boxes"].dtype
    for c in lists[1:]:
        dtype = torch.promote_types(dtype, c["boxes"].dtype)
    label_dtype = lists[0]["labels"].dtype
    boxes, scores, labels, model, quality, variances = _concat(lists, device)

    keep = torch.nonzero(scores >= skip_box_threshold).flatten()  # skip low scores
    if keep.numel() == 0:
        return _empty(device, dtype, label_dtype, quality is not None, variances is not None)
    W = torch.tensor(mw, device=device, dtype=torch.float64)
    idx, wb = _rank(keep, scores, labels, model, W)
    b, s, lab, mod = boxes[idx], scores[idx], labels[idx], model[idx]
    q = None if quality is None else quality[idx]
    v = None if variances is None else variances[idx]
    cw = _box_weights(weight, s, wb, q, v)

    from .assign import _assign  # here: it imports numba, which only this step needs

    cl = _assign(b, cw, lab, iou_threshold).to(device)
    k = int(cl.max()) + 1
    fused_boxes, a, n_members = _fuse_boxes(b, cw, cl, k)
    sw = s * wb
    sum_sw, sum_w = _csum(sw, cl, k), _csum(wb, cl, k)
    fused_scores = _fused_scores(conf_type, allows_overflow, sw, sum_sw, sum_w, n_members, cl, mod, W)

    order = torch.sort(fused_scores, descending=True, stable=True).indices
    cluster_labels = torch.empty(k, dtype=torch.long, device=device).scatter_(0, cl, lab)  # one label each
    out = {"boxes": fused_boxes[order].to(dtype), "scores": fused_scores[order].to(dtype),
           "labels": cluster_labels[order].to(label_dtype)}
    if q is not None:
        out["quality"] = (_csum(wb * q, cl, k) / sum_w)[order].to(dtype)
    if v is not None:
        out["variances"] = _csum(a * a * v, cl, k)[order].to(dtype)
    return out
