"""Localization-aware post-processing: the NMS family and one entry point that applies a method.

Every function takes candidate ``boxes`` (N, 4) xyxy, ``scores`` (N,) and optional integer
``labels`` (N,) (suppression is then per class), and returns the kept indices in selection order
together with the output scores (and boxes, where the method changes them). Empty input gives
empty output; bad input raises a ``ValueError`` that names the argument.

Semantics (see ``DESIGN.md`` for the papers behind them):

* ``nms``: a box is suppressed when its IoU with a kept box is **greater than** the threshold
  (as torchvision).
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
Suppression is per class for any finite coordinates and any integer labels: classes are grouped
by sorting, never by shifting coordinates by a per-class offset (which loses precision).

How the methods stay exact, fast and small
------------------------------------------
All methods are greedy: pick the best remaining box, update its neighbours, repeat (hard NMS is
the case where the update removes). Three facts make them cheap:

1. Only boxes that overlap interact. Overlaps are computed on the fly from the boxes sorted by
   x1 (and, on CPU, split into horizontal bands by y1), never stored, so memory is O(N) whatever
   the number of overlapping pairs (100,000 identical boxes overlap in 5e9 pairs).
2. Hard suppression never changes a score, so its selection order is the initial ranking; with
   decays a lazy max-heap finds the best remaining box (its keys bound the current scores).
3. A box whose (score, index) key beats that of every remaining neighbour it interacts with is
   selected, with its current score, before any of those neighbours, and the decays that
   different boxes apply to a common neighbour commute. Keys at selection time strictly decrease,
   so the selection order is the order of the output scores.

On CPU a compiled numba kernel runs the greedy loop; each IoU and decay uses the operations of
the plain sequential algorithm, so its output scores are bit-identical to it. The kernel is
cached on disk (see the kernel section below for where). On other devices (CUDA) a vectorised
torch version selects, in each round, every box that beats all its remaining neighbours at once
(exact by fact 3), enumerating the candidate pairs in chunks of at most ``_PAIR_CHUNK`` and
keeping the overlapping ones across rounds only while there are at most ``_PAIR_STORE``; it
synchronises with the host a few times per round, never per box, and reconstructs the selection
times that voting needs from the round results. Hard NMS on the torch backend uses torchvision
where shifting classes apart is exact (checked), else the rounds. Both backends can be chosen
explicitly with ``backend="numba" | "torch"``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numba
import numpy as np
import torch
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
_PAIR_CHUNK = 1 << 20  # the torch backend evaluates at most this many candidate pairs at once
_PAIR_STORE = 1 << 22  # and keeps the overlapping pairs across rounds only up to this many
_BAND_SIZE = 512  # about how many boxes of a class the numba kernel puts in one horizontal band
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


# --------------------------------------------------------------------------------------------
# Hard NMS with a deterministic tie-break
# --------------------------------------------------------------------------------------------


def _hard_nms(boxes: Tensor, rank_scores: Tensor, labels: Optional[Tensor], iou_threshold: float,
              backend: Optional[str] = None) -> Tensor:
    """Hard NMS ranked by ``rank_scores`` (ties: lower index first), exact for any finite input.

    CPU: the numba kernel. Otherwise torchvision's NMS, classes kept apart by shifting each
    class's boxes, but only where every shifted coordinate is exact (checked with an error-free
    sum), so that every IoU is the unshifted one; else the torch rounds.
    """
    if backend is None:
        backend = "numba" if boxes.device.type == "cpu" else "torch"
    if backend == "numba":
        return _greedy(boxes, rank_scores, labels, _HARD, iou_threshold, backend="numba")[0]
    import torchvision  # here: importing it costs seconds, and only this path needs it

    order = torch.sort(rank_scores, descending=True, stable=True).indices
    surrogate = torch.arange(order.numel(), 0, -1, device=boxes.device, dtype=torch.float64)  # fixes the order
    b = boxes[order].to(torch.float64)
    if labels is None:
        return order[torchvision.ops.nms(b, surrogate, iou_threshold)]
    cls = torch.unique(labels[order], return_inverse=True)[1].to(torch.float64)
    span = (b.max() - b.min()) * (1 + 1e-9) + 1.0  # a class's boxes fit in [b.min(), b.min() + span)
    offset = (cls * span)[:, None]
    shifted = b + offset
    back = shifted - b
    error = (b - (shifted - back)) + (offset - back)  # the exact rounding error of b + offset (TwoSum)
    if bool(torch.isfinite(shifted).all() & (error == 0).all()):
        return order[torchvision.ops.nms(shifted, surrogate, iou_threshold)]
    return _greedy(boxes, rank_scores, labels, _HARD, iou_threshold, backend="torch")[0]


def nms(boxes: Tensor, scores: Tensor, labels: Optional[Tensor] = None, iou_threshold: float = 0.5,
        backend: Optional[str] = None) -> Tensor:
    """Hard NMS: suppress a box whose IoU with a kept box is greater than ``iou_threshold``.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). labels: optional (N,) integer classes (per-class NMS).
        iou_threshold: in [0, 1].
        backend: ``"numba"`` (CPU kernel), ``"torch"`` (torchvision / vectorised rounds) or None
            (by device).

    Returns:
        (K,) int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    _check_inputs(boxes, scores, labels)
    _check_threshold(iou_threshold, "iou_threshold")
    _check_backend(backend)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device)
    return _hard_nms(boxes, scores, labels, iou_threshold, backend)


# --------------------------------------------------------------------------------------------
# The greedy core, CPU: a numba kernel that computes overlaps on the fly
# --------------------------------------------------------------------------------------------
#
# Memory is O(N): no pair is ever stored. The remaining boxes of each class are split into
# horizontal bands by y1 and packed by (class, band, x1) into "slots". A selected box p can only
# overlap, in a band whose y-extent reaches its own, the slots with x1[p] - (widest box of the
# band) < x1 < x2[p], found by two binary searches and filtered by a vectorised pass. A box
# that leaves gets y1 = +inf, y2 = -inf, so it never passes the filter, and the slots are
# re-packed once half of them are dead. Every IoU and decay is computed with the operations of
# the plain sequential algorithm, in the same order, so output scores are bit-identical to it.
#
# The kernels are compiled once and cached on disk (``cache=True``): in ``__pycache__`` beside
# this file when that is writable, else in numba's user-wide cache directory
# (``$NUMBA_CACHE_DIR`` if set, else ``~/.cache/numba``). Where no cache location is writable
# they are compiled in every process (a few seconds at the first call).


def _njit(**options):
    """``numba.njit`` with an on-disk cache where one can be written."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
            warnings.warn(f"locconf.postprocess: numba cannot cache {fn.__name__} ({e}); it will be compiled "
                          "in every process. Set NUMBA_CACHE_DIR to a writable directory to avoid this.",
                          RuntimeWarning, stacklevel=2)
            return numba.njit(**options)(fn)

    return wrap


@_njit(inline="always")
def _nb_before(k1, t1, k2, t2):
    """(key, tie) pair ordering of the selection: higher key first, then lower index."""
    return k1 > k2 or (k1 == k2 and t1 < t2)


@_njit(inline="always")
def _nb_sift_down(hk, ht, size, at):
    """Restore the max-heap (keys ``hk``, original indices ``ht``) below position ``at``.
    Unsigned positions spare numba's negative-index handling (a quarter of the time)."""
    one = np.uint64(1)
    at = np.uint64(at)
    size = np.uint64(size)
    k = hk[at]
    t = ht[at]
    while True:
        c = at + at + one
        if c >= size:
            break
        d = c + one
        if d < size and _nb_before(hk[d], ht[d], hk[c], ht[c]):
            c = d
        if _nb_before(hk[c], ht[c], k, t):
            hk[at] = hk[c]
            ht[at] = ht[c]
            at = c
        else:
            break
    hk[at] = k
    ht[at] = t


@_njit(inline="always")
def _nb_decay(mode, iou, iou_threshold, sigma):
    if mode == 0:
        return 0.0 if iou > iou_threshold else 1.0
    if mode == 1:
        return 1.0 - iou if iou >= iou_threshold else 1.0
    return math.exp(-(iou * iou) / sigma)


@_njit(inline="always")
def _nb_lower_bound(values, lo, hi, value):
    """First index in [lo, hi) of the sorted ``values`` whose value is not below ``value``."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if values[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_njit()
def _nb_candidates(cx2, cy1, cy2, lo, hi, px1, py1, py2, mask, buf, k):
    """Append to ``buf[k:]`` the slots in [lo, hi) whose box reaches past px1 and overlaps
    [py1, py2] vertically (the caller bounds x1 below px2); returns the new length. Two simple
    passes (a vectorised mask, then a compaction) run several times faster than one fused loop."""
    x2 = cx2[lo:hi]
    ya = cy1[lo:hi]
    yb = cy2[lo:hi]
    for t in range(hi - lo):
        mask[t] = (x2[t] > px1) & (ya[t] < py2) & (yb[t] > py1)
    for t in range(hi - lo):
        if mask[t]:
            buf[k] = lo + t
            k += 1
    return k


@_njit()
def _nb_greedy(b, s, lab, sweep, rank, mode, iou_threshold, sigma, min_score, var, sigma_t, vote, band_size):
    """Greedy suppression (hard, linear or Gaussian decay), optionally with variance voting.

    Args (numpy): b (N, 4) float64 boxes; s (N,) float64 scores; lab (N,) int64 classes, or an
    empty array for one class; sweep (N,) the boxes by (class, x1); rank (N,) the boxes by
    decreasing score (ties in any order); var (N, 4) float64 variances (only with ``vote``);
    band_size: about how many boxes of a class share a horizontal band.

    Returns the selected indices and scores in selection order, the index of the selected box
    that removed each box (-1 if none), and the voted boxes of the selected ones (empty without
    ``vote``).
    """
    n = s.shape[0]
    inf = np.inf
    alive = np.empty(n, np.bool_)  # remaining, by original index
    for i in range(n):
        alive[i] = s[i] >= min_score  # boxes that start below min_score are never candidates

    # 1. Layout: slots by (class, band, x1); a (class, band) is a segment. Per slot: the box,
    #    its area, its current score, its inverse variances (voting) and its original index.
    cx1 = np.empty(n)
    cy1 = np.empty(n)
    cx2 = np.empty(n)
    cy2 = np.empty(n)
    carea = np.empty(n)
    ccur = np.empty(n)
    civ = np.empty((n if vote else 0, 4))
    cid = np.empty(n, np.int64)
    cseg = np.empty(n, np.int64)  # segment of each slot
    slot = np.empty(n, np.int64)  # slot of each original index
    seg_lo = np.empty(n, np.int64)  # slots [seg_lo, seg_hi) of each segment
    seg_hi = np.empty(n, np.int64)
    seg_w = np.empty(n)  # its widest box
    seg_y1 = np.empty(n)  # its lowest y1
    seg_y2 = np.empty(n)  # its highest y2
    seg_cls = np.empty(n, np.int64)  # its class (numbered from 0)
    cls_lo = np.empty(n + 1, np.int64)  # segments [cls_lo[c], cls_lo[c + 1]) of class c
    band = np.empty(n, np.int64)
    count = np.empty(66, np.int64)
    nseg = 0
    ncls = 0
    m = 0
    p = 0
    while p < n:
        e = p + 1  # the class run sweep[p:e]
        if lab.shape[0] == n:
            while e < n and lab[sweep[e]] == lab[sweep[p]]:
                e += 1
        else:
            e = n
        lo_y = inf
        hi_y = -inf
        cnt = 0
        for t in range(p, e):
            i = sweep[t]
            if alive[i]:
                cnt += 1
                lo_y = min(lo_y, b[i, 1])
                hi_y = max(hi_y, b[i, 1])
        nb = max(1, min(cnt // band_size, 64))  # bands of equal height in y1
        span = hi_y - lo_y
        if not (span > 0.0 and span < inf):
            nb = 1
        count[: nb + 1] = 0
        for t in range(p, e):
            i = sweep[t]
            if alive[i]:
                g = 0
                if nb > 1:
                    g = min(nb - 1, int((b[i, 1] - lo_y) / span * nb))
                band[t] = g
                count[g + 1] += 1
        cls_lo[ncls] = nseg
        for g in range(nb):
            count[g + 1] += count[g]
            seg_lo[nseg + g] = m + count[g]
            seg_hi[nseg + g] = m + count[g + 1]
            seg_w[nseg + g] = 0.0
            seg_y1[nseg + g] = inf
            seg_y2[nseg + g] = -inf
            seg_cls[nseg + g] = ncls
        for t in range(p, e):  # a stable counting sort by band keeps each band sorted by x1
            i = sweep[t]
            if alive[i]:
                g = nseg + band[t]
                q = m + count[band[t]]
                count[band[t]] += 1
                cx1[q], cy1[q], cx2[q], cy2[q] = b[i, 0], b[i, 1], b[i, 2], b[i, 3]
                carea[q] = (b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1])
                ccur[q] = s[i]
                if vote:
                    for c in range(4):
                        civ[q, c] = 1.0 / var[i, c]
                cid[q] = i
                cseg[q] = g
                slot[i] = q
                seg_w[g] = max(seg_w[g], b[i, 2] - b[i, 0])
                seg_y1[g] = min(seg_y1[g], b[i, 1])
                seg_y2[g] = max(seg_y2[g], b[i, 3])
        m += cnt
        nseg += nb
        ncls += 1
        p = e
    cls_lo[ncls] = nseg
    n_alive = m

    # 2. Selection. Hard suppression never changes a score, so the order is ``rank``; with
    #    decays, a lazy max-heap keyed by (score, -index) holds one entry per remaining box whose
    #    key bounds its current score from above (``rank`` is then a valid heap).
    hk = np.empty(n)
    ht = np.empty(n, np.int64)
    size = 0
    for r in range(n):
        if alive[rank[r]]:
            hk[size] = s[rank[r]]
            ht[size] = rank[r]
            size += 1
    r = 0
    while r < size:  # ties in the score: lower index first
        e = r + 1
        while e < size and hk[e] == hk[r]:
            e += 1
        if e - r > 1:
            ht[r:e] = np.sort(ht[r:e])
        r = e
    sel = np.empty(n, np.int64)
    sel_score = np.empty(n)
    dropper = np.full(n, -1, np.int64)
    voted = np.empty((n if vote else 0, 4))
    num = np.empty(4)
    den = np.empty(4)
    buf = np.empty(n, np.int64)
    mask = np.empty(n, np.bool_)
    ns = 0
    r = 0
    while True:
        if mode == 0:
            while r < size and not alive[ht[r]]:
                r += 1
            if r == size:
                break
            i = ht[r]
            r += 1
        else:
            if size == 0:
                break
            i = ht[0]
            if alive[i] and hk[0] != ccur[slot[i]]:  # stale key: re-insert with the current score
                hk[0] = ccur[slot[i]]
                _nb_sift_down(hk, ht, size, 0)
                continue
            size -= 1
            hk[0] = hk[size]
            ht[0] = ht[size]
            _nb_sift_down(hk, ht, size, 0)
            if not alive[i]:  # removed since it was pushed
                continue
        # Select i.
        sp = slot[i]
        px1, py1, px2, py2, pa = cx1[sp], cy1[sp], cx2[sp], cy2[sp], carea[sp]
        alive[i] = False
        cy1[sp] = inf
        cy2[sp] = -inf
        n_alive -= 1
        sel[ns] = i
        sel_score[ns] = ccur[sp]
        if vote:
            for c in range(4):
                den[c] = civ[sp, c]
                num[c] = b[i, c] * den[c]
        # 3. The remaining boxes of its class that may overlap it.
        k = 0
        for g in range(cls_lo[seg_cls[cseg[sp]]], cls_lo[seg_cls[cseg[sp]] + 1]):
            lo, hi = seg_lo[g], seg_hi[g]
            if lo == hi or seg_y1[g] >= py2 or seg_y2[g] <= py1:
                continue
            lim = px1 - seg_w[g] * 1.000001 - abs(px1) * 1e-15  # <= x1 of any box reaching past px1
            lo = _nb_lower_bound(cx1, lo, hi, lim)
            a = _nb_lower_bound(cx1, lo, hi, px2)
            k = _nb_candidates(cx2, cy1, cy2, lo, a, px1, py1, py2, mask, buf, k)
        # 4. The operations of the sequential algorithm, pair by pair.
        for t in range(k):
            q = buf[t]
            iw = min(px2, cx2[q]) - max(px1, cx1[q])
            ih = min(py2, cy2[q]) - max(py1, cy1[q])
            inter = iw * ih
            union = pa + carea[q] - inter
            iou = inter / union if union > 0.0 else 0.0
            if iou > 0.0:
                if vote:
                    pv = math.exp(-((1.0 - iou) ** 2) / sigma_t)
                    w = pv * civ[q, 0]
                    num[0] += w * cx1[q]
                    den[0] += w
                    w = pv * civ[q, 1]
                    num[1] += w * cy1[q]
                    den[1] += w
                    w = pv * civ[q, 2]
                    num[2] += w * cx2[q]
                    den[2] += w
                    w = pv * civ[q, 3]
                    num[3] += w * cy2[q]
                    den[3] += w
                f = _nb_decay(mode, iou, iou_threshold, sigma)
                if f < 1.0:
                    new = ccur[q] * f
                    if f == 0.0 or new < min_score:
                        alive[cid[q]] = False
                        cy1[q] = inf
                        cy2[q] = -inf
                        n_alive -= 1
                        dropper[cid[q]] = i
                    else:
                        ccur[q] = new
        if vote:
            for c in range(4):
                voted[ns, c] = num[c] / den[c]
        ns += 1
        # Re-pack once more than half of the slots are dead (O(N) in all).
        if m - n_alive > max(n_alive, 32):
            w2 = 0
            for q in range(m):
                if alive[cid[q]]:
                    cx1[w2], cy1[w2], cx2[w2], cy2[w2] = cx1[q], cy1[q], cx2[q], cy2[q]
                    carea[w2] = carea[q]
                    ccur[w2] = ccur[q]
                    if vote:
                        for c in range(4):
                            civ[w2, c] = civ[q, c]
                    cid[w2] = cid[q]
                    cseg[w2] = cseg[q]
                    slot[cid[q]] = w2
                    w2 += 1
            m = w2
            seg_lo[:nseg] = 0
            seg_hi[:nseg] = 0
            for q in range(m - 1, -1, -1):
                seg_lo[cseg[q]] = q
            for q in range(m):
                seg_hi[cseg[q]] = q + 1
    return sel[:ns], sel_score[:ns], dropper, voted[:ns]


def _greedy_numba(boxes, scores, labels, mode, iou_threshold, sigma, min_score, variances, sigma_t,
                  band_size=None):
    b = boxes.detach().to(torch.float64).contiguous().numpy()
    s = scores.detach().to(torch.float64).contiguous().numpy()
    sweep = np.argsort(b[:, 0])
    if labels is not None:
        lab = labels.detach().to(torch.int64).contiguous().numpy()
        sweep = sweep[np.argsort(lab[sweep], kind="stable")]
    else:
        lab = np.empty(0, np.int64)
    vote = variances is not None
    var = variances.detach().to(torch.float64).contiguous().numpy() if vote else np.empty((0, 4))
    sel, sel_score, dropper, voted = _nb_greedy(
        b, s, lab, sweep, np.argsort(-s), mode, float(iou_threshold), float(sigma), float(min_score), var,
        float(sigma_t), vote, _BAND_SIZE if band_size is None else int(band_size),
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
#
# Memory is O(N) plus one chunk of pairs: the overlapping pairs are never all materialised but
# enumerated, chunk by chunk, from a sort-and-sweep over x1 (``_pair_chunks``). Classes are
# kept apart by exact integer search keys (class rank, rank of the coordinate among all
# coordinates), so huge coordinates or labels lose nothing.


class _Sweep:
    """Boxes sorted by (class, x1) with exact integer keys for windowed searches.

    ``order[p]`` is the box at sweep position p. A box q at position p can overlap box a only if
    ``key_low[a] <= key_x1[p] < key_x2[a]``, and every such q comes after position
    ``searchsorted(key_x1, key_low[a])``.
    """

    def __init__(self, boxes: Tensor, labels: Optional[Tensor]):
        n, dev = boxes.shape[0], boxes.device
        order = torch.sort(boxes[:, 0], stable=True).indices
        if labels is not None:
            order = order[torch.sort(labels[order], stable=True).indices]
            lab = labels[order]
            cls = torch.zeros(n, dtype=torch.long, device=dev)
            cls[1:] = torch.cumsum((lab[1:] != lab[:-1]).long(), 0)
        else:
            cls = torch.zeros(n, dtype=torch.long, device=dev)
        b = boxes[order]
        x1, x2 = b[:, 0].contiguous(), b[:, 2].contiguous()
        widest = torch.zeros(n, dtype=b.dtype, device=dev).scatter_reduce(0, cls, x2 - x1, "amax")
        low = x1 - widest[cls] * 1.000001 - x1.abs() * 1e-15  # <= x1 of any box reaching past x1
        values = torch.unique(torch.cat([x1, x2, low]))  # sorted
        scale = values.numel() + 1
        self.order, self.b = order, b
        self.area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        self.key_x1 = cls * scale + torch.searchsorted(values, x1)
        self.key_x2 = cls * scale + torch.searchsorted(values, x2)
        self.key_low = cls * scale + torch.searchsorted(values, low)

    def iou(self, p: Tensor, q: Tensor) -> Tensor:
        """IoU of the boxes at positions p and q, with the operations of the sequential code."""
        bp, bq = self.b[p], self.b[q]
        iw = (torch.minimum(bp[:, 2], bq[:, 2]) - torch.maximum(bp[:, 0], bq[:, 0])).clamp(min=0)
        ih = (torch.minimum(bp[:, 3], bq[:, 3]) - torch.maximum(bp[:, 1], bq[:, 1])).clamp(min=0)
        inter = iw * ih
        union = self.area[p] + self.area[q] - inter
        return torch.where(union > 0, inter / torch.where(union > 0, union, 1.0), 0.0)

    def windows(self, rows: Tensor, cands: Tensor) -> tuple[Tensor, Tensor]:
        """For each row position, the range [lo, hi) of ``cands`` (sorted positions) it may overlap."""
        keys = self.key_x1[cands]
        return torch.searchsorted(keys, self.key_low[rows]), torch.searchsorted(keys, self.key_x2[rows])


def _pair_chunks(lo: Tensor, hi: Tensor, chunk: int):
    """Enumerate the pairs (row r, column c) with lo[r] <= c < hi[r], at most ``chunk`` at a time,
    rows in order. One host synchronisation (the total), none per chunk."""
    counts = (hi - lo).clamp(min=0)
    if counts.numel() == 0:
        return
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])
    starts = ends - counts
    for k0 in range(0, total, chunk):
        k = torch.arange(k0, min(k0 + chunk, total), device=lo.device)
        r = torch.searchsorted(ends, k, right=True)
        yield r, lo[r] + (k - starts[r])


class _Pairs:
    """The overlapping pairs (IoU > 0) of a sweep, as the rounds ask for them.

    If there are at most ``store`` of them, they are found once (a chunk of candidates at a time)
    and kept; otherwise every query enumerates the candidates afresh, a chunk at a time. Either
    way memory is bounded: ``store`` pairs plus one chunk.
    """

    def __init__(self, sw: _Sweep, live: Tensor, chunk: int, store: int):
        self.sw, self.chunk, self.stored = sw, chunk, None
        pos = live.nonzero().squeeze(1)
        lo = torch.arange(1, pos.numel() + 1, device=pos.device)  # each pair once: later positions only
        found, count = [], 0
        for ra, rc in _pair_chunks(lo, sw.windows(pos, pos)[1], chunk):  # one synchronisation per chunk
            a, c = pos[ra], pos[rc]
            iou = sw.iou(a, c)
            keep = iou > 0
            found.append((a[keep], c[keep], iou[keep]))
            count += found[-1][0].numel()
            if count > store:
                return  # too many to keep: enumerate afresh at every query
        self.stored = tuple(torch.cat([f[k] for f in found]) if found else pos[:0].to(dt)
                            for k, dt in enumerate((torch.long, torch.long, torch.float64)))
        self.current = self.stored  # the pairs among the boxes still live, shrinking

    def among(self, live: Tensor):
        """Chunks ``(a, c, iou)`` of the pairs with both boxes live (a bool mask that may only
        shrink from one call to the next), each pair once."""
        if self.stored is not None:
            a, c, iou = self.current
            keep = live[a] & live[c]
            self.current = (a[keep], c[keep], iou[keep])
            yield self.current
            return
        pos = live.nonzero().squeeze(1)
        lo = torch.arange(1, pos.numel() + 1, device=pos.device)
        for ra, rc in _pair_chunks(lo, self.sw.windows(pos, pos)[1], self.chunk):
            a, c = pos[ra], pos[rc]
            yield a, c, self.sw.iou(a, c)

    def between(self, rows: Tensor, cols: Tensor, current: bool = False):
        """Chunks ``(r, q, iou)``: each overlapping pair of a box ``rows[r]`` (positions, in that
        order across chunks) and a box q with ``cols[q]`` (a bool mask). ``current``: only pairs
        among the boxes of the last :meth:`among`."""
        if self.stored is not None:
            a, c, iou = self.current if current else self.stored
            at = torch.full(cols.shape, -1, dtype=torch.long, device=cols.device)
            at[rows] = torch.arange(rows.numel(), device=cols.device)
            fw = (at[a] >= 0) & cols[c]  # a is the row
            bw = (at[c] >= 0) & cols[a]  # c is the row
            yield torch.cat([at[a][fw], at[c][bw]]), torch.cat([c[fw], a[bw]]), torch.cat([iou[fw], iou[bw]])
            return
        pos = cols.nonzero().squeeze(1)
        for rr, rq in _pair_chunks(*self.sw.windows(rows, pos), self.chunk):
            q = pos[rq]
            yield rr, q, self.sw.iou(rows[rr], q)


def _decay_factor(mode: int, iou: Tensor, iou_threshold: float, sigma: float) -> Tensor:
    if mode == _HARD:
        return torch.where(iou > iou_threshold, 0.0, 1.0).to(iou.dtype)
    if mode == _LINEAR:
        return torch.where(iou >= iou_threshold, 1.0 - iou, torch.ones_like(iou))
    return torch.exp(-(iou * iou) / sigma)


def _greedy_torch(boxes, scores, labels, mode, iou_threshold, sigma, min_score, variances, sigma_t):
    """Rounds: every remaining box that beats all its remaining interacting neighbours is
    selected at once (exact: such a box would be selected before any of them), then the new
    selections decay their neighbours. A few host synchronisations per round, none per box."""
    n, dev = boxes.shape[0], boxes.device
    sw = _Sweep(boxes.detach().to(torch.float64), labels)
    orig = sw.order
    cur = scores.detach().to(torch.float64)[orig].clone()  # by sweep position
    alive = cur >= min_score
    initially = alive.clone()
    pairs = _Pairs(sw, initially, _PAIR_CHUNK, _PAIR_STORE)
    pick_round = torch.full((n,), -1, dtype=torch.long, device=dev)
    death_round = torch.full((n,), -1, dtype=torch.long, device=dev)
    rnd = 0
    while bool(alive.any()):
        # 1. Which remaining boxes are beaten by a remaining interacting neighbour?
        beaten = torch.zeros(n, dtype=torch.uint8, device=dev)
        for a, c, iou in pairs.among(alive):
            inter = _decay_factor(mode, iou, iou_threshold, sigma) < 1
            c_wins = (cur[c] > cur[a]) | ((cur[c] == cur[a]) & (orig[c] < orig[a]))
            beaten.scatter_reduce_(0, a, (inter & c_wins).to(torch.uint8), "amax")
            beaten.scatter_reduce_(0, c, (inter & ~c_wins).to(torch.uint8), "amax")
        pick = alive & (beaten == 0)
        pick_round.masked_fill_(pick, rnd)
        alive &= ~pick
        # 2. The new selections decay (or remove) their remaining neighbours.
        killed = torch.zeros(n, dtype=torch.uint8, device=dev)
        for _, q, iou in pairs.between(pick.nonzero().squeeze(1), alive, current=True):
            f = _decay_factor(mode, iou, iou_threshold, sigma)
            cur.scatter_reduce_(0, q, f, "prod")
            killed.scatter_reduce_(0, q, (f == 0).to(torch.uint8), "amax")
        dead = alive & ((killed > 0) | (cur < min_score))
        death_round.masked_fill_(dead, rnd)
        alive &= ~dead
        rnd += 1
    # Selection order: by output score, ties by lower index.
    sel = (pick_round >= 0).nonzero().squeeze(1)
    sel = sel[torch.sort(orig[sel]).indices]
    sel = sel[torch.sort(-cur[sel], stable=True).indices]
    t_sel = torch.full((n,), -1, dtype=torch.long, device=dev)
    t_sel[sel] = torch.arange(sel.numel(), device=dev)
    removed = initially & (pick_round < 0)
    dropper = _droppers_torch(pairs, scores.detach().to(torch.float64)[orig], sel, pick_round, death_round,
                              removed, mode, iou_threshold, sigma, min_score)
    voted = None
    if variances is not None:
        var = variances.detach().to(torch.float64)[orig]
        voted = _vote_torch(pairs, var, sel, t_sel, dropper, initially, sigma_t)
    dropper_orig = torch.full((n,), -1, dtype=torch.long, device=dev)
    has = dropper >= 0
    dropper_orig[orig[has]] = orig[dropper[has]]
    return orig[sel], cur[sel], dropper_orig, voted


def _droppers_torch(pairs, scores, sel, pick_round, death_round, removed, mode, iou_threshold, sigma, min_score):
    """The selected box (sweep position) that removed each removed box, -1 for the others.

    The pairs (selected box s, removed box m) come with s in selection order, so the chunks hold
    the decays of each m in the order the sequential algorithm applies them: only those of boxes
    selected in a round no later than the one that removed m. Hard suppression: the first
    selected box that suppresses m. Decays: replays each m's score in log space from one chunk to
    the next and finds where it first falls below ``min_score``.
    """
    n, dev = scores.shape[0], scores.device
    big = torch.iinfo(torch.long).max
    first_t = torch.full((n,), big, dtype=torch.long, device=dev)
    if mode == _HARD:
        for rr, m, iou in pairs.between(sel, removed):
            first_t.scatter_reduce_(0, m, torch.where(iou > iou_threshold, rr, big), "amin")
    else:
        logs = torch.zeros(n, dtype=torch.float64, device=dev)  # running log-decay of each box
        last_t = torch.full((n,), -1, dtype=torch.long, device=dev)
        for rr, m, iou in pairs.between(sel, removed):
            f = _decay_factor(mode, iou, iou_threshold, sigma)
            applied = (f < 1) & (pick_round[sel[rr]] <= death_round[m]) & (first_t[m] == big)
            # This chunk's decays by (box, selection time); prefix sums per box.
            o = torch.argsort(torch.where(applied, m, n) * (sel.numel() + 1) + torch.where(applied, rr, 0))
            m_o, t_o, ok, f_o = m[o], rr[o], applied[o], f[o]
            lf = torch.where(ok, torch.log(f_o.clamp(min=1e-300)), 0.0)
            m_key = torch.where(ok, m_o, n)
            seg_first = torch.searchsorted(m_key, m_key, side="left")
            csum = torch.cumsum(lf, 0)
            zseen = torch.cumsum((ok & (f_o == 0)).long(), 0)
            prev = (seg_first - 1).clamp(min=0)
            before = torch.where(seg_first > 0, csum[prev], 0.0)
            zbefore = torch.where(seg_first > 0, zseen[prev], 0)
            running = scores[m_o] * torch.exp(logs[m_o] + csum - before)
            gone = ok & (((zseen - zbefore) > 0) | (running < min_score * (1 + 1e-9)))
            first_t.scatter_reduce_(0, m_o, torch.where(gone, t_o, big), "amin")
            logs.index_add_(0, m_o, lf)
            last_t.scatter_reduce_(0, m_o, torch.where(ok, t_o, -1), "amax")
        # Rounding at the boundary may hide the crossing: fall back to the last decay.
        first_t = torch.where((first_t == big) & (last_t >= 0), last_t, first_t)
    dropper = torch.full((n,), -1, dtype=torch.long, device=dev)
    found = first_t < big
    dropper[found] = sel[first_t[found]]
    return dropper


def _vote_torch(pairs, var, sel, t_sel, dropper, initially, sigma_t):
    """Variance voting from the selection order, chunk by chunk.

    A candidate m votes for the selected box s when it overlaps s and was still remaining when
    s was selected: selected after s, or removed by a box selected no earlier than s.
    """
    b = pairs.sw.b
    removed = dropper >= 0
    t_gone = t_sel.clone()
    t_gone[removed] = t_sel[dropper[removed]]  # removed when its dropper was selected
    num, den = b / var, 1.0 / var
    for rr, m, iou in pairs.between(sel, initially):
        s = sel[rr]
        votes = (iou > 0) & (m != s) & ((t_sel[m] > rr) | (removed[m] & (t_gone[m] >= rr)))
        w = torch.where(votes, torch.exp(-((1.0 - iou) ** 2) / sigma_t), 0.0)[:, None] / var[m]
        den.index_add_(0, s, w)
        num.index_add_(0, s, w * b[m])
    return (num / den)[sel]


def _greedy(boxes, scores, labels, mode, iou_threshold=0.5, sigma=0.5, min_score=-math.inf,
            variances=None, sigma_t=0.02, backend=None):
    """Dispatch the greedy core. Returns ``(sel, sel_scores, dropper, voted)`` on boxes' device."""
    dev = boxes.device
    if backend is None:
        backend = "numba" if dev.type == "cpu" else "torch"
    if backend == "numba":
        out = _greedy_numba(boxes.cpu(), scores.cpu(), None if labels is None else labels.cpu(), mode,
                            iou_threshold, sigma, min_score, None if variances is None else variances.cpu(), sigma_t)
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
    _check_backend(backend)
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
    _check_backend(backend)
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
    _check_positive(sigma, "sigma")
    _check_threshold(min_score, "min_score", 0.0, math.inf)
    _check_backend(backend)
    if soft not in (None, "linear", "gaussian"):
        raise ValueError(f"soft must be None, 'linear' or 'gaussian', got {soft!r}")
    combined = scores.clamp(0, 1) ** (1 - weight) * quality.to(scores.dtype).clamp(0, 1) ** weight
    if soft is not None:
        return soft_nms(boxes, combined, labels, method=soft, iou_threshold=iou_threshold, sigma=sigma,
                        min_score=min_score, backend=backend)
    if boxes.shape[0] == 0:
        return _empty_long(boxes.device), scores.new_empty(0)
    keep = _hard_nms(boxes, combined, labels, iou_threshold, backend)
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
    _check_threshold(min_score, "min_score", 0.0, math.inf)
    _check_backend(backend)
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
    if not isinstance(max_detections, int) or isinstance(max_detections, bool) or max_detections < 0:
        raise ValueError(f"max_detections must be a non-negative int, got {max_detections!r}")
    boxes, scores, labels = candidates["boxes"], candidates["scores"], candidates.get("labels")
    needs = {"iou-guided": "quality", "quality": "quality", "var-voting": "variances"}
    need = needs.get(method.split("+")[0])
    if need is not None and candidates.get(need) is None:
        raise ValueError(f"method {method!r} needs candidates[{need!r}], which this detector does not predict")
    # The method validates what it uses; the other signals are validated here, so that a malformed
    # one is reported rather than silently dropped from the output.
    unused = {k: candidates.get(k) for k in ("quality", "variances") if k != need}
    _check_inputs(boxes, scores, labels, **unused)
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
