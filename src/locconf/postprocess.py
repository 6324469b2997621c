"""Localization-aware post-processing: the NMS family and one entry point that applies a method.

Every function takes candidate ``boxes`` (N, 4) xyxy, ``scores`` (N,) and optional integer
``labels`` (N,) (suppression is then per class), and returns the kept indices in selection order
together with the output scores (and boxes, where the method changes them). Empty input gives
empty output; bad input raises a ``ValueError`` that names the argument.

Semantics (see ``DESIGN.md`` for the papers behind them):

* ``nms``: a box is suppressed when its IoU with a kept box is **greater than** the threshold
  (torchvision).
* ``soft_nms`` (Bodla et al. 2017): linear decay by ``1 - IoU`` where ``IoU >= iou_threshold``
  (mmcv's convention); Gaussian decay by ``exp(-IoU^2 / sigma)`` for every overlap. A box is
  dropped as soon as its decayed score falls below ``min_score``; boxes that start below it are
  never output. We return the **decayed** scores (as mmcv; ensemble-boxes returns undecayed ones).
* ``iou_guided_nms`` (IoU-Net): rank by predicted quality, suppress as hard NMS, and give every
  kept box the maximum classification score of the boxes it suppresses (itself included).
* ``quality_nms`` (DIR, PAA): rank and score by ``scores^(1-weight) * quality^weight``.
* ``var_voting`` (KL-Loss): suppression as hard NMS or Gaussian Soft-NMS on the original boxes;
  each selected box is replaced by the per-coordinate average of the candidates still remaining
  when it is selected (itself included) that overlap it (IoU > 0), weighted by
  ``exp(-(1 - IoU)^2 / sigma_t) / variance``. As in the original KL-Loss code, the voted box never
  changes the later suppression.

Ties in the ranking score are broken by the lower input index, so the result is deterministic.

How the sequential methods stay exact and fast
----------------------------------------------
Soft-NMS, IoU-guided NMS and variance voting are greedy: pick the best remaining box, update its
neighbours, repeat. Two facts make them cheap:

1. Only boxes that overlap interact, so the work is over the sparse graph of overlapping pairs
   (found by a sort-and-sweep over ``x1``), not over all N^2 pairs.
2. A box whose (score, index) key beats that of every remaining neighbour it interacts with is
   selected, with its current score, before any of those neighbours, and the decays that
   different boxes apply to a common neighbour commute. Keys at selection time strictly decrease,
   so the selection order is the order of the output scores.

On CPU a compiled numba kernel runs the greedy loop over the graph with a lazy max-heap. On other
devices (CUDA) a vectorised torch version selects, in each round, every box that beats all its
remaining neighbours at once (exact by fact 2); it synchronises with the host once per round,
never per box, and reconstructs the selection times that voting needs from the round results.
Both backends can be chosen explicitly with ``backend="numba" | "torch"``.
"""

from __future__ import annotations

import math
from typing import Optional

import numba
import numpy as np
import torch
import torchvision
from torch import Tensor

from .boxes import check_boxes

__all__ = [
    "nms",
    "soft_nms",
    "iou_guided_nms",
    "quality_nms",
    "var_voting",
    "postprocess",
    "METHODS",
]

_HARD, _LINEAR, _GAUSSIAN = 0, 1, 2
_SOFT_MODES = {"linear": _LINEAR, "gaussian": _GAUSSIAN}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


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
        if variances.device != dev or not variances.is_floating_point():
            raise ValueError("variances must be a floating-point tensor on the device of boxes")
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


def _check_threshold(value: float, name: str, low: float = 0.0, high: float = 1.0) -> None:
    if not (isinstance(value, (int, float)) and low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _empty_long(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------
# Hard NMS (torchvision) with a deterministic tie-break
# --------------------------------------------------------------------------------------------


def _hard_nms(boxes: Tensor, rank_scores: Tensor, labels: Optional[Tensor], iou_threshold: float) -> Tensor:
    """torchvision's (batched) NMS, ties in ``rank_scores`` broken by the lower index."""
    order = torch.sort(rank_scores, descending=True, stable=True).indices
    # Strictly decreasing surrogate scores fix the order; float64 keeps batched_nms's per-class
    # coordinate offsets exact.
    surrogate = torch.arange(order.numel(), 0, -1, device=boxes.device, dtype=torch.float64)
    b = boxes[order].to(torch.float64)
    if labels is None:
        keep = torchvision.ops.nms(b, surrogate, iou_threshold)
    else:
        keep = torchvision.ops.batched_nms(b, surrogate, labels[order], iou_threshold)
    return order[keep]


def nms(boxes: Tensor, scores: Tensor, labels: Optional[Tensor] = None, iou_threshold: float = 0.5) -> Tensor:
    """Hard NMS: suppress a box whose IoU with a kept box is greater than ``iou_threshold``.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). labels: optional (N,) integer classes (per-class NMS).
        iou_threshold: in [0, 1].

    Returns:
        (K,) int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    _check_inputs(boxes, scores, labels)
    _check_threshold(iou_threshold, "iou_threshold")
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device)
    return _hard_nms(boxes, scores, labels, iou_threshold)


# --------------------------------------------------------------------------------------------
# The greedy core, CPU: a numba kernel over the sparse overlap graph
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _nb_before(k1, i1, k2, i2):
    return k1 > k2 or (k1 == k2 and i1 < i2)


@numba.njit(cache=True)
def _nb_push(hk, hi, size, key, idx):
    pos = size
    hk[pos] = key
    hi[pos] = idx
    while pos > 0:
        parent = (pos - 1) // 2
        if _nb_before(hk[pos], hi[pos], hk[parent], hi[parent]):
            hk[pos], hk[parent] = hk[parent], hk[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        else:
            break
    return size + 1


@numba.njit(cache=True)
def _nb_pop(hk, hi, size):
    size -= 1
    hk[0] = hk[size]
    hi[0] = hi[size]
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= size:
            break
        best = left
        right = left + 1
        if right < size and _nb_before(hk[right], hi[right], hk[left], hi[left]):
            best = right
        if _nb_before(hk[best], hi[best], hk[pos], hi[pos]):
            hk[pos], hk[best] = hk[best], hk[pos]
            hi[pos], hi[best] = hi[best], hi[pos]
            pos = best
        else:
            break
    return size


@numba.njit(cache=True, inline="always")
def _nb_decay(mode, iou, iou_threshold, sigma):
    if mode == 0:
        return 0.0 if iou > iou_threshold else 1.0
    if mode == 1:
        return 1.0 - iou if iou >= iou_threshold else 1.0
    return math.exp(-(iou * iou) / sigma)


@numba.njit(cache=True)
def _nb_greedy(b, s, lab, sweep, mode, iou_threshold, sigma, min_score, var, sigma_t, vote):
    """Greedy suppression (hard, linear or Gaussian decay), optionally with variance voting.

    ``sweep`` orders the boxes by (label, x1). Returns the selected indices and scores in
    selection order, the index of the selected box that removed each box (-1 if none), and the
    voted boxes of the selected ones (empty without ``vote``).
    """
    n = s.shape[0]
    # 1. Interacting pairs by sort-and-sweep: within a class, boxes sorted by x1 can only
    #    overlap box a while x1 < x2[a].
    cap = max(16, 4 * n)
    ea = np.empty(cap, np.int64)
    eb = np.empty(cap, np.int64)
    ev = np.empty(cap, np.float64)
    ne = 0
    for pa in range(n):
        a = sweep[pa]
        area_a = (b[a, 2] - b[a, 0]) * (b[a, 3] - b[a, 1])
        for pb in range(pa + 1, n):
            c = sweep[pb]
            if lab[c] != lab[a] or b[c, 0] >= b[a, 2]:
                break
            iw = min(b[a, 2], b[c, 2]) - max(b[a, 0], b[c, 0])
            ih = min(b[a, 3], b[c, 3]) - max(b[a, 1], b[c, 1])
            if iw <= 0.0 or ih <= 0.0:
                continue
            inter = iw * ih
            union = area_a + (b[c, 2] - b[c, 0]) * (b[c, 3] - b[c, 1]) - inter
            iou = inter / union if union > 0.0 else 0.0
            if not vote and _nb_decay(mode, iou, iou_threshold, sigma) >= 1.0:
                continue
            if iou <= 0.0:
                continue
            if ne == cap:
                cap *= 2
                ea2 = np.empty(cap, np.int64)
                eb2 = np.empty(cap, np.int64)
                ev2 = np.empty(cap, np.float64)
                ea2[:ne] = ea[:ne]
                eb2[:ne] = eb[:ne]
                ev2[:ne] = ev[:ne]
                ea, eb, ev = ea2, eb2, ev2
            ea[ne] = a
            eb[ne] = c
            ev[ne] = iou
            ne += 1
    # 2. Symmetric adjacency (CSR).
    ptr = np.zeros(n + 1, np.int64)
    for e in range(ne):
        ptr[ea[e] + 1] += 1
        ptr[eb[e] + 1] += 1
    for i in range(n):
        ptr[i + 1] += ptr[i]
    fill = ptr[:-1].copy()
    nbr = np.empty(2 * ne, np.int64)
    nio = np.empty(2 * ne, np.float64)
    for e in range(ne):
        nbr[fill[ea[e]]] = eb[e]
        nio[fill[ea[e]]] = ev[e]
        fill[ea[e]] += 1
        nbr[fill[eb[e]]] = ea[e]
        nio[fill[eb[e]]] = ev[e]
        fill[eb[e]] += 1
    # 3. Greedy selection with a lazy max-heap keyed by (score, -index): each remaining box has
    #    one entry whose key bounds its current score from above; an entry that reaches the top
    #    with a stale key is pushed back with the current score, a fresh one is the true maximum.
    cur = s.copy()
    state = np.zeros(n, np.int8)  # 0 remaining, 1 selected, 2 removed
    dropper = np.full(n, -1, np.int64)
    hk = np.empty(n, np.float64)
    hi = np.empty(n, np.int64)
    size = 0
    for i in range(n):
        if cur[i] >= min_score:
            size = _nb_push(hk, hi, size, cur[i], i)
        else:
            state[i] = 2
    sel = np.empty(n, np.int64)
    sel_score = np.empty(n, np.float64)
    voted = np.empty((n if vote else 0, 4), np.float64)
    ns = 0
    while size > 0:
        key = hk[0]
        i = hi[0]
        size = _nb_pop(hk, hi, size)
        if state[i] != 0:
            continue
        if key != cur[i]:
            size = _nb_push(hk, hi, size, cur[i], i)
            continue
        state[i] = 1
        sel[ns] = i
        sel_score[ns] = cur[i]
        if vote:
            num = np.empty(4, np.float64)
            den = np.empty(4, np.float64)
            for k in range(4):
                den[k] = 1.0 / var[i, k]
                num[k] = b[i, k] * den[k]
            for e in range(ptr[i], ptr[i + 1]):
                m = nbr[e]
                if state[m] != 0:
                    continue
                p = math.exp(-((1.0 - nio[e]) ** 2) / sigma_t)
                for k in range(4):
                    w = p / var[m, k]
                    num[k] += w * b[m, k]
                    den[k] += w
            for k in range(4):
                voted[ns, k] = num[k] / den[k]
        ns += 1
        for e in range(ptr[i], ptr[i + 1]):
            m = nbr[e]
            if state[m] != 0:
                continue
            f = _nb_decay(mode, nio[e], iou_threshold, sigma)
            if f >= 1.0:
                continue
            new = cur[m] * f
            if f == 0.0 or new < min_score:
                state[m] = 2
                dropper[m] = i
            else:
                cur[m] = new
    return sel[:ns], sel_score[:ns], dropper, voted[:ns]


def _greedy_numba(boxes, scores, labels, mode, iou_threshold, sigma, min_score, variances, sigma_t):
    b = boxes.detach().to(torch.float64).contiguous().numpy()
    s = scores.detach().to(torch.float64).contiguous().numpy()
    lab = labels.detach().to(torch.int64).contiguous().numpy()
    sweep = np.lexsort((b[:, 0], lab)).astype(np.int64)
    vote = variances is not None
    var = variances.detach().to(torch.float64).contiguous().numpy() if vote else np.ones((0, 4))
    sel, sel_score, dropper, voted = _nb_greedy(
        b, s, lab, sweep, mode, float(iou_threshold), float(sigma), float(min_score), var, float(sigma_t), vote
    )
    return (
        torch.from_numpy(sel),
        torch.from_numpy(sel_score),
        torch.from_numpy(dropper),
        torch.from_numpy(voted) if vote else None,
    )


# --------------------------------------------------------------------------------------------
# The greedy core, any device: vectorised rounds in torch
# --------------------------------------------------------------------------------------------


def _overlap_pairs(boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All same-class pairs with IoU > 0, by a vectorised sort-and-sweep over x1.

    Args:
        boxes: (N, 4) float64. labels: (N,) int64.

    Returns:
        ``(i, j, iou)``, each (E,), one entry per unordered pair.
    """
    n = boxes.shape[0]
    dev = boxes.device
    by_x = torch.sort(boxes[:, 0], stable=True).indices
    order = by_x[torch.sort(labels[by_x], stable=True).indices]
    b, lab = boxes[order], labels[order]
    x0 = b[:, 0].min()
    span = (b[:, 2].max() - x0) + 1.0
    lab_off = (lab - lab.min()).to(torch.float64) * span
    keys = lab_off + (b[:, 0] - x0)
    ends = torch.searchsorted(keys, lab_off + (b[:, 2] - x0), side="left")
    starts = torch.arange(1, n + 1, device=dev)
    counts = (ends - starts).clamp(min=0)
    total = int(counts.sum())
    a = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    c = starts[a] + torch.arange(total, device=dev) - first[a]
    ba, bc = b[a], b[c]
    iw = (torch.minimum(ba[:, 2], bc[:, 2]) - torch.maximum(ba[:, 0], bc[:, 0])).clamp(min=0)
    ih = (torch.minimum(ba[:, 3], bc[:, 3]) - torch.maximum(ba[:, 1], bc[:, 1])).clamp(min=0)
    inter = iw * ih
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area[a] + area[c] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(inter))
    keep = (iou > 0) & (lab[a] == lab[c])
    return order[a[keep]], order[c[keep]], iou[keep]


def _decay_factor(mode: int, iou: Tensor, iou_threshold: float, sigma: float) -> Tensor:
    if mode == _HARD:
        return torch.where(iou > iou_threshold, 0.0, 1.0).to(iou.dtype)
    if mode == _LINEAR:
        return torch.where(iou >= iou_threshold, 1.0 - iou, torch.ones_like(iou))
    return torch.exp(-(iou * iou) / sigma)


def _greedy_torch(boxes, scores, labels, mode, iou_threshold, sigma, min_score, variances, sigma_t):
    n, dev = boxes.shape[0], boxes.device
    b = boxes.detach().to(torch.float64)
    cur = scores.detach().to(torch.float64).clone()
    i_pair, j_pair, iou_pair = _overlap_pairs(b, labels)
    f_pair = _decay_factor(mode, iou_pair, iou_threshold, sigma)
    interacts = f_pair < 1
    src = torch.cat([i_pair[interacts], j_pair[interacts]])
    dst = torch.cat([j_pair[interacts], i_pair[interacts]])
    fac = torch.cat([f_pair[interacts], f_pair[interacts]])
    alive = cur >= min_score
    selected = torch.zeros(n, dtype=torch.bool, device=dev)
    idx = torch.arange(n, device=dev)
    all_src, all_dst, all_fac = src, dst, fac
    while bool(alive.any()):  # one host synchronisation per round
        live = alive[src] & alive[dst]
        src, dst, fac = src[live], dst[live], fac[live]
        # A box is selected this round when no remaining interacting neighbour beats its key.
        beats = (cur[dst] > cur[src]) | ((cur[dst] == cur[src]) & (dst < src))
        beaten = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, src[beats], True)
        pick = alive & ~beaten
        selected |= pick
        alive &= ~pick
        hit = pick[src] & alive[dst]
        hd, hf = dst[hit], fac[hit]
        cur = cur.scatter_reduce(0, hd, hf, reduce="prod")
        killed = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, hd[hf == 0], True)
        alive &= ~(killed | (cur < min_score))
    sel = idx[selected]
    sel = sel[torch.sort(-cur[sel], stable=True).indices]
    sel_score = cur[sel]
    dropper = _droppers(scores.detach().to(torch.float64), sel, all_src, all_dst, all_fac, min_score)
    voted = None
    if variances is not None:
        voted = _vote_torch(b, variances.detach().to(torch.float64), sel, dropper, i_pair, j_pair, iou_pair, sigma_t)
    return sel, sel_score, dropper, voted


def _droppers(scores: Tensor, sel: Tensor, src: Tensor, dst: Tensor, fac: Tensor, min_score: float) -> Tensor:
    """The selected box that removed each removed box (-1 for the others).

    Replays, for every box, the decays of its selected neighbours in selection order (the
    order of the output scores) and finds where its score first fell below ``min_score``.
    Args: scores (N,) initial; sel (K,) selection order; src, dst, fac (E,) directed
    interacting pairs and their decay factors.
    """
    n, dev = scores.shape[0], scores.device
    t_sel = torch.full((n,), -1, dtype=torch.long, device=dev)
    t_sel[sel] = torch.arange(sel.numel(), device=dev)
    removed = (t_sel < 0) & (scores >= min_score)  # boxes below min_score were never candidates
    e = (t_sel[src] >= 0) & removed[dst]
    src, dst, fac = src[e], dst[e], fac[e]
    order = torch.argsort(dst * n + t_sel[src])
    src, dst, fac = src[order], dst[order], fac[order]
    seg_first = torch.searchsorted(dst, dst, side="left")
    logs = torch.cumsum(torch.log(fac.clamp(min=1e-300)), 0)
    zeros = torch.cumsum((fac == 0).to(torch.long), 0)
    prev_logs = torch.where(seg_first > 0, logs[seg_first - 1], torch.zeros_like(logs))
    prev_zeros = torch.where(seg_first > 0, zeros[seg_first - 1], torch.zeros_like(zeros))
    running = scores[dst] * torch.exp(logs - prev_logs)
    gone = ((zeros - prev_zeros) > 0) | (running < min_score * (1 + 1e-9))
    pos = torch.arange(dst.numel(), device=dev)
    first = torch.full((n,), dst.numel(), dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, dst, torch.where(gone, pos, dst.numel()), reduce="amin")
    # Rounding at the boundary may hide the crossing: fall back to the last selected neighbour.
    first = first.scatter_reduce(0, dst, torch.searchsorted(dst, dst, side="right") - 1, reduce="amin")
    has = first < dst.numel()
    dropper = torch.full((n,), -1, dtype=torch.long, device=dev)
    dropper[has] = src[first[has]]
    return dropper


def _vote_torch(b, var, sel, dropper, i_pair, j_pair, iou_pair, sigma_t):
    """Variance voting from the selection order, with every vote decided at once.

    A candidate m votes for the selected box s when it overlaps s and was still remaining when
    s was selected: selected after s, or removed by a box selected no earlier than s.
    """
    n, dev = b.shape[0], b.device
    t_sel = torch.full((n,), -1.0, dtype=torch.float64, device=dev)
    t_sel[sel] = torch.arange(sel.numel(), device=dev, dtype=torch.float64)
    t_removed = t_sel.clone()
    removed = dropper >= 0
    t_removed[removed] = t_sel[dropper[removed]] + 0.5
    src = torch.cat([i_pair, j_pair])
    dst = torch.cat([j_pair, i_pair])
    iou = torch.cat([iou_pair, iou_pair])
    votes = (t_sel[src] >= 0) & (t_removed[dst] > t_sel[src])
    src, dst, iou = src[votes], dst[votes], iou[votes]
    w = torch.exp(-((1.0 - iou) ** 2) / sigma_t)[:, None] / var[dst]
    den = (1.0 / var).index_add(0, src, w)
    num = (b / var).index_add(0, src, w * b[dst])
    return (num / den)[sel]


def _greedy(boxes, scores, labels, mode, iou_threshold=0.5, sigma=0.5, min_score=-math.inf,
            variances=None, sigma_t=0.02, backend=None):
    """Dispatch the greedy core. Returns ``(sel, sel_scores, dropper, voted)`` on boxes' device."""
    dev = boxes.device
    if labels is None:
        labels = torch.zeros(boxes.shape[0], dtype=torch.long, device=dev)
    if backend is None:
        backend = "numba" if dev.type == "cpu" else "torch"
    if backend not in ("numba", "torch"):
        raise ValueError(f"backend must be 'numba', 'torch' or None, got {backend!r}")
    if backend == "numba":
        out = _greedy_numba(boxes.cpu(), scores.cpu(), labels.cpu(), mode, iou_threshold, sigma, min_score,
                            None if variances is None else variances.cpu(), sigma_t)
        return tuple(None if t is None else t.to(dev) for t in out)
    return _greedy_torch(boxes, scores, labels, mode, iou_threshold, sigma, min_score, variances, sigma_t)


# --------------------------------------------------------------------------------------------
# Public methods
# --------------------------------------------------------------------------------------------


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Optional[Tensor] = None,
    method: str = "gaussian",
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017), exact.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). labels: optional (N,) integer classes.
        method: ``"linear"`` (decay by ``1 - IoU`` where ``IoU >= iou_threshold``) or
            ``"gaussian"`` (decay by ``exp(-IoU^2 / sigma)``, no threshold).
        iou_threshold: linear decay threshold. sigma: Gaussian width.
        min_score: a box is dropped once its (decayed) score is below this.
        backend: ``"numba"`` (CPU kernel), ``"torch"`` (vectorised rounds) or None (by device).

    Returns:
        ``(keep, new_scores)``: (K,) int64 indices in selection order and their (K,) decayed
        scores, which are non-increasing.
    """
    _check_inputs(boxes, scores, labels)
    if method not in _SOFT_MODES:
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    _check_threshold(iou_threshold, "iou_threshold")
    _check_positive(sigma, "sigma")
    _check_threshold(min_score, "min_score", 0.0, math.inf)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    cd = _compute_dtype(boxes)
    sel, sel_scores, _, _ = _greedy(boxes.to(cd), scores.to(cd), labels, _SOFT_MODES[method],
                                    iou_threshold, sigma, min_score, backend=backend)
    return sel, sel_scores.to(scores.dtype)


def iou_guided_nms(
    boxes: Tensor,
    scores: Tensor,
    quality: Tensor,
    labels: Optional[Tensor] = None,
    iou_threshold: float = 0.5,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """IoU-guided NMS (IoU-Net, Algorithm 1).

    Boxes are ranked by the predicted localization ``quality``; hard NMS at ``iou_threshold``;
    every kept box takes the maximum classification score of the boxes it suppresses, itself
    included.

    Args:
        boxes: (N, 4). scores: (N,) classification scores. quality: (N,) predicted IoU.
        labels: optional (N,) classes.

    Returns:
        ``(keep, new_scores)``: (K,) indices in selection (quality) order and (K,) scores.
    """
    _check_inputs(boxes, scores, labels, quality=quality)
    _check_threshold(iou_threshold, "iou_threshold")
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    cd = _compute_dtype(boxes)
    sel, _, dropper, _ = _greedy(boxes.to(cd), quality.to(cd), labels, _HARD, iou_threshold, backend=backend)
    suppressed = dropper >= 0
    cluster_max = scores.clone().scatter_reduce(0, dropper[suppressed], scores[suppressed], reduce="amax")
    return sel, cluster_max[sel]


def quality_nms(
    boxes: Tensor,
    scores: Tensor,
    quality: Tensor,
    labels: Optional[Tensor] = None,
    iou_threshold: float = 0.5,
    weight: float = 0.5,
    soft: Optional[str] = None,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Quality-ranked NMS (DIR, PAA, FCOS): rank and score by ``scores^(1-weight) * quality^weight``.

    ``weight=0.5`` is the geometric mean ``sqrt(cls * IoU)``. Scores and quality are clamped to
    [0, 1] before combining. Hard NMS at ``iou_threshold`` unless ``soft`` is ``"linear"`` or
    ``"gaussian"``, which applies :func:`soft_nms` to the combined score instead.

    Returns:
        ``(keep, new_scores)``: (K,) indices in selection order and their (K,) combined scores.
    """
    _check_inputs(boxes, scores, labels, quality=quality)
    _check_threshold(iou_threshold, "iou_threshold")
    _check_threshold(weight, "weight")
    if soft not in (None, "linear", "gaussian"):
        raise ValueError(f"soft must be None, 'linear' or 'gaussian', got {soft!r}")
    combined = scores.clamp(0, 1) ** (1 - weight) * quality.to(scores.dtype).clamp(0, 1) ** weight
    if soft is not None:
        return soft_nms(boxes, combined, labels, method=soft, iou_threshold=iou_threshold, sigma=sigma,
                        min_score=min_score, backend=backend)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    keep = _hard_nms(boxes, combined, labels, iou_threshold)
    return keep, combined[keep]


def var_voting(
    boxes: Tensor,
    scores: Tensor,
    variances: Tensor,
    labels: Optional[Tensor] = None,
    iou_threshold: float = 0.5,
    sigma_t: float = 0.02,
    suppression: str = "hard",
    soft_sigma: float = 0.5,
    min_score: float = 1e-3,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Variance voting (KL-Loss, He et al. 2019) with hard or Gaussian-soft suppression.

    Each selected box becomes the per-coordinate weighted mean of the remaining same-class
    candidates that overlap it (IoU > 0, itself included), weights ``p / variance`` with
    ``p = exp(-(1 - IoU)^2 / sigma_t)``. Suppression uses the original boxes: hard NMS at
    ``iou_threshold``, or Gaussian Soft-NMS (``soft_sigma``, ``min_score``).

    Args:
        boxes: (N, 4). scores: (N,). variances: (N, 4) positive predicted variances sigma^2
            of ``(x1, y1, x2, y2)``. labels: optional (N,) classes.
        sigma_t: voting temperature (0.02 in the paper, 0.01 in its code).
        suppression: ``"hard"`` or ``"soft"``.

    Returns:
        ``(keep, new_boxes, new_scores)``: (K,) indices, (K, 4) voted boxes, (K,) scores.
    """
    _check_inputs(boxes, scores, labels, variances=variances)
    _check_threshold(iou_threshold, "iou_threshold")
    _check_positive(sigma_t, "sigma_t")
    _check_positive(soft_sigma, "soft_sigma")
    if suppression not in ("hard", "soft"):
        raise ValueError(f"suppression must be 'hard' or 'soft', got {suppression!r}")
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), boxes.new_empty(0, 4), scores.new_empty(0)
    cd = _compute_dtype(boxes)
    mode, floor = (_HARD, -math.inf) if suppression == "hard" else (_GAUSSIAN, min_score)
    sel, sel_scores, _, voted = _greedy(boxes.to(cd), scores.to(cd), labels, mode, iou_threshold, soft_sigma,
                                        floor, variances=variances.to(cd), sigma_t=sigma_t, backend=backend)
    return sel, voted.to(boxes.dtype), sel_scores.to(scores.dtype)


# --------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------

METHODS = (
    "nms",
    "soft-linear",
    "soft-gaussian",
    "iou-guided",
    "quality",
    "quality+soft-linear",
    "quality+soft-gaussian",
    "var-voting",
    "var-voting+soft",
)


def postprocess(candidates: dict, method: str = "nms", max_detections: int = 100, **params) -> dict:
    """Turn one image's candidates into detections with a named method.

    Args:
        candidates: dict with ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,), and
            ``quality`` (N,) and/or ``variances`` (N, 4) where the detector predicts them.
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(max_detections, int) or max_detections < 0:
        raise ValueError(f"max_detections must be a non-negative int, got {max_detections!r}")
    boxes, scores, labels = candidates["boxes"], candidates["scores"], candidates.get("labels")
    needs = {"iou-guided": "quality", "quality": "quality", "var-voting": "variances"}
    need = needs.get(method.split("+")[0])
    if need is not None and candidates.get(need) is None:
        raise ValueError(f"method {method!r} needs candidates[{need!r}], which this detector does not predict")
    new_boxes = None
    if method == "nms":
        keep = nms(boxes, scores, labels, **params)
        new_scores = scores[keep]
    elif method.startswith("soft-"):
        keep, new_scores = soft_nms(boxes, scores, labels, method=method[5:], **params)
    elif method == "iou-guided":
        keep, new_scores = iou_guided_nms(boxes, scores, candidates["quality"], labels, **params)
    elif method.startswith("quality"):
        soft = method.split("+soft-")[1] if "+" in method else None
        keep, new_scores = quality_nms(boxes, scores, candidates["quality"], labels, soft=soft, **params)
    else:
        suppression = "soft" if method.endswith("+soft") else "hard"
        keep, new_boxes, new_scores = var_voting(boxes, scores, candidates["variances"], labels,
                                                 suppression=suppression, **params)
    order = torch.sort(new_scores, descending=True, stable=True).indices[:max_detections]
    keep = keep[order]
    out = {k: v[keep] for k, v in candidates.items() if isinstance(v, Tensor) and v.shape[:1] == boxes.shape[:1]}
    out["boxes"] = boxes[keep] if new_boxes is None else new_boxes[order]
    out["scores"] = new_scores[order]
    return out
