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

import numba
import numpy as np
import torch
from torch import Tensor

from .boxes import check_boxes

__all__ = ["fuse", "WEIGHTS", "CONF_TYPES"]

#: What a box's weight in its cluster's fused box is.
WEIGHTS = ("score", "quality", "variance")

#: How a cluster's fused score is computed (ensemble-boxes' names).
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


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


def _check_lists(candidate_lists: Sequence[Mapping], weight: str) -> tuple[torch.device, list[dict]]:
    """Validate every list; returns the device and the lists as dicts of checked tensors."""
    if isinstance(candidate_lists, (Mapping, str)) or not isinstance(candidate_lists, Sequence):
        raise ValueError("candidate_lists must be a list of candidate dicts (one per model or pass), "
                         f"got {type(candidate_lists).__name__}")
    device = None
    checked = []
    for i, cand in enumerate(candidate_lists):
        where = f"candidate_lists[{i}]"
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
            checks = {k: torch.isfinite(out[k]).all() for k in ("scores", "quality", "variances") if k in out}
            if "variances" in out:
                checks["variances"] = checks["variances"] & (out["variances"] > 0).all()
            for key, ok in zip(checks, torch.stack(list(checks.values())).tolist()):
                if not ok:
                    what = "finite and positive" if key == "variances" else "finite (no NaN or inf)"
                    raise ValueError(f"{where}[{key!r}] must be {what}")
        checked.append(out)
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


# --------------------------------------------------------------------------------------------
# Cluster assignment: one compiled pass over the boxes, candidate clusters from a grid
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _nb_cell(v, origin, cell, g):
    c = int(math.floor((v - origin) / cell))
    return min(max(c, 0), g - 1)


@numba.njit(cache=True)
def _nb_assign(b, cw, lab, iou_threshold, by_centre, x0, y0, cell, gx, gy, pad):
    """Greedy WBF clustering of boxes already sorted by (label, decreasing rank).

    Args:
        b: (n, 4) float64 boxes. cw: (n, 4) float64 non-negative weights per coordinate.
        lab: (n,) int64 labels (equal labels contiguous). iou_threshold: join when IoU > this.
        by_centre: list a cluster under the region its fused box's centre can reach (valid when
            ``iou_threshold >= 0.5``) instead of its members' hull.
        x0, y0, cell, gx, gy: the grid: origin, cell size and number of cells per axis.
        pad: margin added around a listed region against rounding.

    Returns:
        (n,) int64 cluster of each box; clusters numbered in creation order.
    """
    n = b.shape[0]
    cluster = np.empty(n, np.int64)
    num = np.zeros((n, 4))
    den = np.zeros((n, 4))
    tot = np.zeros((n, 4))
    cnt = np.zeros(n, np.int64)
    fused = np.empty((n, 4))
    lo = np.empty((n, 4))  # per-coordinate range of the members: a weighted mean stays inside it
    hi = np.empty((n, 4))
    span = np.empty((n, 4), np.int64)  # cells where the cluster is listed: cx0, cy0, cx1, cy1
    stamp = np.full(n, -1, np.int64)
    head = np.full(gx * gy, -1, np.int64)
    cap = max(16, 4 * n)
    e_next = np.empty(cap, np.int64)
    e_clu = np.empty(cap, np.int64)
    e_cell = np.empty(cap, np.int64)
    ne = 0
    nc = 0
    for j in range(n):
        if j > 0 and lab[j] != lab[j - 1]:  # a new class: empty the grid
            for e in range(ne):
                head[e_cell[e]] = -1
            ne = 0
        bx0, by0, bx1, by1 = b[j, 0], b[j, 1], b[j, 2], b[j, 3]
        area_j = (bx1 - bx0) * (by1 - by0)
        # 1. The cluster whose fused box overlaps box j most, among those listed where j lies.
        best = -1
        best_iou = -1.0
        for cy in range(_nb_cell(by0, y0, cell, gy), _nb_cell(by1, y0, cell, gy) + 1):
            for cx in range(_nb_cell(bx0, x0, cell, gx), _nb_cell(bx1, x0, cell, gx) + 1):
                e = head[cy * gx + cx]
                while e != -1:
                    c = e_clu[e]
                    e = e_next[e]
                    if stamp[c] == j:
                        continue
                    stamp[c] = j
                    iw = min(bx1, fused[c, 2]) - max(bx0, fused[c, 0])
                    ih = min(by1, fused[c, 3]) - max(by0, fused[c, 1])
                    if iw <= 0.0 or ih <= 0.0:
                        continue
                    inter = iw * ih
                    union = area_j + (fused[c, 2] - fused[c, 0]) * (fused[c, 3] - fused[c, 1]) - inter
                    iou = inter / union if union > 0.0 else 0.0
                    if iou > best_iou or (iou == best_iou and c < best):
                        best_iou = iou
                        best = c
        # 2. Join it, or start a cluster.
        if best != -1 and best_iou > iou_threshold:
            c = best
            old0, old1, old2, old3 = span[c, 0], span[c, 1], span[c, 2], span[c, 3]
            for k in range(4):
                lo[c, k] = min(lo[c, k], b[j, k])
                hi[c, k] = max(hi[c, k], b[j, k])
        else:
            c = nc
            nc += 1
            old0, old1, old2, old3 = 0, 0, -1, -1  # an empty cell range
            for k in range(4):
                lo[c, k] = b[j, k]
                hi[c, k] = b[j, k]
        cluster[j] = c
        cnt[c] += 1
        for k in range(4):
            num[c, k] += cw[j, k] * b[j, k]
            den[c, k] += cw[j, k]
            tot[c, k] += b[j, k]
            v = num[c, k] / den[c, k] if den[c, k] > 0.0 else tot[c, k] / cnt[c]
            fused[c, k] = min(max(v, lo[c, k]), hi[c, k])  # a mean lies in the range; rounding may not leave it
        # 3. List the cluster in the cells its region newly covers. IoU > t >= 0.5 needs the fused
        #    box's centre strictly inside box j (else IoU <= 1/2), and that centre stays in
        #    [(lo x1 + lo x2) / 2, (hi x1 + hi x2) / 2] (likewise y). Otherwise any overlap needs
        #    the fused box, so the members' hull, to meet box j.
        if by_centre:
            rx0, rx1 = 0.5 * (lo[c, 0] + lo[c, 2]), 0.5 * (hi[c, 0] + hi[c, 2])
            ry0, ry1 = 0.5 * (lo[c, 1] + lo[c, 3]), 0.5 * (hi[c, 1] + hi[c, 3])
        else:
            rx0, rx1, ry0, ry1 = lo[c, 0], hi[c, 2], lo[c, 1], hi[c, 3]
        n0 = _nb_cell(rx0 - pad, x0, cell, gx)
        n1 = _nb_cell(ry0 - pad, y0, cell, gy)
        n2 = _nb_cell(rx1 + pad, x0, cell, gx)
        n3 = _nb_cell(ry1 + pad, y0, cell, gy)
        span[c, 0], span[c, 1], span[c, 2], span[c, 3] = n0, n1, n2, n3
        for cy in range(n1, n3 + 1):
            for cx in range(n0, n2 + 1):
                if old0 <= cx <= old2 and old1 <= cy <= old3:
                    continue
                if ne == cap:
                    cap *= 2
                    a1 = np.empty(cap, np.int64)
                    a2 = np.empty(cap, np.int64)
                    a3 = np.empty(cap, np.int64)
                    a1[:ne] = e_next[:ne]
                    a2[:ne] = e_clu[:ne]
                    a3[:ne] = e_cell[:ne]
                    e_next, e_clu, e_cell = a1, a2, a3
                cid = cy * gx + cx
                e_next[ne] = head[cid]
                e_clu[ne] = c
                e_cell[ne] = cid
                head[cid] = ne
                ne += 1
    return cluster


def _grid(b: np.ndarray, scale: float) -> tuple[float, float, float, int, int, float]:
    """A grid over the boxes: cells of ``scale`` times the median box size, about 4 cells per box at most in all."""
    n = b.shape[0]
    x0, y0 = float(b[:, 0].min()), float(b[:, 1].min())
    ex, ey = float(b[:, 2].max()) - x0, float(b[:, 3].max()) - y0
    size = scale * float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
    extent = max(1.0, abs(x0), abs(y0), ex, ey)
    cell = max(size, ex / 4096, ey / 4096, math.sqrt(ex * ey / (4 * n + 64)), 1e-9 * extent)
    gx = min(int(ex / cell) + 1, 4097)
    gy = min(int(ey / cell) + 1, 4097)
    return x0, y0, cell, gx, gy, 1e-9 * extent


def _assign(boxes: Tensor, weights: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Cluster of each box, for boxes (n, 4) sorted by (label, rank); weights (n, 4); on the CPU."""
    b = boxes.detach().to("cpu", torch.float64).contiguous().numpy()
    w = weights.detach().to("cpu", torch.float64).contiguous().numpy()
    lab = labels.detach().to("cpu", torch.int64).contiguous().numpy()
    by_centre = iou_threshold >= 0.5
    # Cell sizes measured fastest on dense scenes (benchmarks/fusion.py): a listed centre region is
    # small, so finer cells pay; a listed hull is a box, so cells of a box's size do.
    x0, y0, cell, gx, gy, pad = _grid(b, 0.5 if by_centre else 1.0)
    return torch.from_numpy(_nb_assign(b, w, lab, float(iou_threshold), by_centre, x0, y0, cell, gx, gy, pad))


# --------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------


def _empty(device, dtype, label_dtype, quality: bool, variances: bool) -> dict:
    out = {"boxes": torch.empty(0, 4, device=device, dtype=dtype),
           "scores": torch.empty(0, device=device, dtype=dtype),
           "labels": torch.empty(0, device=device, dtype=label_dtype)}
    if quality:
        out["quality"] = torch.empty(0, device=device, dtype=dtype)
    if variances:
        out["variances"] = torch.empty(0, 4, device=device, dtype=dtype)
    return out


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
    device, lists = _check_lists(candidate_lists, weight)
    m = len(lists)
    mw = _check_model_weights(model_weights, m)
    if m == 0:
        return _empty(torch.device("cpu"), torch.float32, torch.int64, False, False)
    dtype = lists[0]["boxes"].dtype
    for c in lists[1:]:
        dtype = torch.promote_types(dtype, c["boxes"].dtype)
    label_dtype = lists[0]["labels"].dtype
    has_q = all("quality" in c for c in lists)
    has_v = all("variances" in c for c in lists)

    f64 = dict(device=device, dtype=torch.float64)
    boxes = torch.cat([c["boxes"].to(torch.float64) for c in lists])
    scores = torch.cat([c["scores"].to(torch.float64) for c in lists])
    labels = torch.cat([c["labels"].to(torch.int64) for c in lists])
    model = torch.cat([torch.full((c["boxes"].shape[0],), i, device=device, dtype=torch.long)
                       for i, c in enumerate(lists)])
    quality = torch.cat([c["quality"].to(torch.float64) for c in lists]) if has_q else None
    variances = torch.cat([c["variances"].to(torch.float64) for c in lists]) if has_v else None

    # Skip low scores, then order by (label, decreasing score * model weight, list, position).
    keep = torch.nonzero(scores >= skip_box_threshold).flatten()
    if keep.numel() == 0:
        return _empty(device, dtype, label_dtype, has_q, has_v)
    W = torch.tensor(mw, **f64)
    w_box = W[model[keep]]
    rank = scores[keep] * w_box
    order = torch.sort(rank, descending=True, stable=True).indices
    order = order[torch.sort(labels[keep][order], stable=True).indices]
    idx = keep[order]
    b, s, lab, mod, wb = boxes[idx], scores[idx], labels[idx], model[idx], w_box[order]
    if weight == "score":
        cw = (s * wb)[:, None].expand(-1, 4)
    elif weight == "quality":
        cw = (quality[idx].clamp(0, 1) * wb)[:, None].expand(-1, 4)
    else:
        cw = wb[:, None] / variances[idx]

    cl = _assign(b, cw, lab, iou_threshold).to(device)
    k = int(cl.max()) + 1

    def csum(x: Tensor) -> Tensor:  # per-cluster sums of (n,) or (n, 4)
        return torch.zeros((k,) + tuple(x.shape[1:]), **f64).index_add_(0, cl, x)

    n_members = csum(torch.ones_like(s))
    den = csum(cw)
    mean = csum(b) / n_members[:, None]
    fused_boxes = torch.where(den > 0, csum(cw * b) / den.clamp(min=1e-300), mean)
    a = torch.where(den[cl] > 0, cw / den[cl].clamp(min=1e-300), 1.0 / n_members[cl][:, None])  # normalised

    sw = s * wb
    sum_sw, sum_w, w_sum = csum(sw), csum(wb), W.sum()
    if conf_type == "avg":
        factor = n_members if allows_overflow else n_members.clamp(max=m)
        fused_scores = sum_sw / n_members * factor / w_sum
    elif conf_type == "max":
        fused_scores = torch.zeros(k, **f64).scatter_reduce_(0, cl, sw, reduce="amax", include_self=False) / W.max()
    else:
        present = torch.zeros(k, m, dtype=torch.bool, device=device)
        present[cl, mod] = True
        w_present = (present.to(torch.float64) * W).sum(1)
        if conf_type == "box_and_model_avg":
            fused_scores = sum_sw / sum_w * w_present / w_sum
        else:
            fused_scores = sum_sw / (sum_w + (w_sum - w_present))

    out_order = torch.sort(fused_scores, descending=True, stable=True).indices
    cluster_labels = torch.empty(k, dtype=torch.long, device=device).scatter_(0, cl, lab)  # one label each
    out = {"boxes": fused_boxes[out_order].to(dtype),
           "scores": fused_scores[out_order].to(dtype),
           "labels": cluster_labels[out_order].to(label_dtype)}
    if has_q:
        out["quality"] = (csum(wb * quality[idx]) / sum_w)[out_order].to(dtype)
    if has_v:
        out["variances"] = csum(a * a * variances[idx])[out_order].to(dtype)
    return out
