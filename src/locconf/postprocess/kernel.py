"""The greedy core on CPU: a numba kernel that computes overlaps on the fly.

Memory is O(N): no pair is ever stored. The remaining boxes of each class are split into
horizontal bands by y1 and packed by (class, band, x1) into "slots". A selected box p can only
overlap, in a band whose y-extent reaches its own, the slots with x1[p] - (widest box of the
band) < x1 < x2[p], found by two binary searches and filtered by a vectorised pass. A box
that leaves gets y1 = +inf, y2 = -inf, so it never passes the filter, and the slots are
re-packed once half of them are dead. Every IoU and decay is computed with the operations of
the plain sequential algorithm, in the same order, so output scores are bit-identical to it.

This module imports numba: :mod:`.greedy` imports it at the first call of a kernel, not before.
The kernels are compiled once (10-30 s, announced on the ``locconf.jit`` logger) and cached on
disk in ``$LOCCONF_CACHE/numba``, else ``~/.cache/locconf/numba``, never in the package folder
(:mod:`locconf.jit`: read-only installs, several users, loading without numba's compiler set-up).

``mode`` is 0 (hard suppression), 1 (linear decay) or 2 (Gaussian decay), as in :mod:`.modes`
(literals here: numba's disk cache would not notice a change of a constant imported from
another file).
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
import torch

from ..jit import njit

_BAND_SIZE = 512  # about how many boxes of a class the numba kernel puts in one horizontal band


def _njit(**options):
    """``numba.njit`` with locconf's on-disk cache (:func:`locconf.jit.njit`)."""
    return njit("post-processing kernels", **options)


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


#: The remaining boxes packed into "slots" by (class, band, x1), each field (N,): the box, its area,
#: its current score, its inverse variances (N, 4) (0 rows without voting), its original index and
#: its segment (a class's band).
_Slots = namedtuple("_Slots", "x1 y1 x2 y2 area cur iv box seg")
#: The segments, each field (N,): its slots [lo, hi), its widest box ``w``, its lowest y1 and
#: highest y2, its class (numbered from 0); segments [cls_lo[c], cls_lo[c + 1]) are class c's.
_Segments = namedtuple("_Segments", "lo hi w y1 y2 cls cls_lo")

# The steps of ``_nb_greedy``. The two that allocate (``_nb_layout``, ``_nb_queue``) run once per
# call and are inlined into it at numba's IR level (``inline="always"``). The others allocate
# nothing and are compiled without reference counting (``_njit_light``); LLVM inlines them into
# the caller, and the kernel runs as fast as the single 229-line function it was written as:
# new / old time 0.99-1.02 on 2,000 and 5,000 detector-like boxes of 1 and 80 classes (hard NMS,
# variance voting, Gaussian Soft-NMS; interleaved runs, one thread). Inlined at the IR level
# instead, every array argument of a per-selection step costs an increment and a decrement of its
# reference count at each call: 1.5-1.9 times the time on 2,000 boxes of 80 classes, where most
# boxes are selected. Their small helpers above stay ``inline="always"``.
# Every step stays in this file: numba's disk cache checks only the source file of the cached
# function, so a step changed in another file would leave a stale kernel in the cache.


def _njit_light(fn):
    """A step of the kernel that allocates nothing: compiled without reference counting (numba's
    ``_nrt=False``), so that passing it arrays costs nothing once LLVM has inlined it."""
    return _njit(_nrt=False)(fn)


@_njit_light
def _nb_class_end(lab, sweep, p):
    """End of the run of one class that starts at sweep[p] (all of ``sweep`` without labels)."""
    n = sweep.shape[0]
    e = p + 1
    if lab.shape[0] == n:
        while e < n and lab[sweep[e]] == lab[sweep[p]]:
            e += 1
    else:
        e = n
    return e


@_njit_light
def _nb_bands(b, sweep, alive, p, e, band_size, band, count):
    """Split the alive boxes of the class run sweep[p:e] into ``nb`` bands of equal height in y1
    (about ``band_size`` boxes each, 64 at most): ``band[t]`` of each, ``count[g + 1]`` the boxes
    of band g. Returns ``(nb, number of alive boxes)``."""
    lo_y = np.inf
    hi_y = -np.inf
    cnt = 0
    for t in range(p, e):
        i = sweep[t]
        if alive[i]:
            cnt += 1
            lo_y = min(lo_y, b[i, 1])
            hi_y = max(hi_y, b[i, 1])
    nb = max(1, min(cnt // band_size, 64))
    span = hi_y - lo_y
    if not (span > 0.0 and span < np.inf):
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
    return nb, cnt


@_njit_light
def _nb_open_segments(sg, count, nseg, nb, ncls, m):
    """Open the ``nb`` empty segments of class ``ncls`` from segment ``nseg`` and slot ``m``; turns
    ``count`` into the first slot of each band (from ``m``)."""
    sg.cls_lo[ncls] = nseg
    for g in range(nb):
        count[g + 1] += count[g]
        sg.lo[nseg + g] = m + count[g]
        sg.hi[nseg + g] = m + count[g + 1]
        sg.w[nseg + g] = 0.0
        sg.y1[nseg + g] = np.inf
        sg.y2[nseg + g] = -np.inf
        sg.cls[nseg + g] = ncls


@_njit_light
def _nb_fill_slots(b, s, var, vote, sweep, alive, p, e, band, count, nseg, m, sl, sg, slot):
    """Put the alive boxes of sweep[p:e] into their band's slots (a stable counting sort by band
    keeps each band sorted by x1); grow each segment's width and y-extent."""
    for t in range(p, e):
        i = sweep[t]
        if alive[i]:
            g = nseg + band[t]
            q = m + count[band[t]]
            count[band[t]] += 1
            sl.x1[q], sl.y1[q], sl.x2[q], sl.y2[q] = b[i, 0], b[i, 1], b[i, 2], b[i, 3]
            sl.area[q] = (b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1])
            sl.cur[q] = s[i]
            if vote:
                for c in range(4):
                    sl.iv[q, c] = 1.0 / var[i, c]
            sl.box[q] = i
            sl.seg[q] = g
            slot[i] = q
            sg.w[g] = max(sg.w[g], b[i, 2] - b[i, 0])
            sg.y1[g] = min(sg.y1[g], b[i, 1])
            sg.y2[g] = max(sg.y2[g], b[i, 3])


@_njit(inline="always")
def _nb_layout(b, s, lab, sweep, alive, var, vote, band_size):
    """Pack the alive boxes into slots by (class, band, x1).

    Returns ``(slots, segments, slot of each original index, number of segments, of slots)``."""
    n = s.shape[0]
    sl = _Slots(np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n),
                np.empty((n if vote else 0, 4)), np.empty(n, np.int64), np.empty(n, np.int64))
    sg = _Segments(np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n), np.empty(n), np.empty(n),
                   np.empty(n, np.int64), np.empty(n + 1, np.int64))
    slot = np.empty(n, np.int64)
    band = np.empty(n, np.int64)
    count = np.empty(66, np.int64)
    nseg = 0
    ncls = 0
    m = 0
    p = 0
    while p < n:
        e = _nb_class_end(lab, sweep, p)
        nb, cnt = _nb_bands(b, sweep, alive, p, e, band_size, band, count)
        _nb_open_segments(sg, count, nseg, nb, ncls, m)
        _nb_fill_slots(b, s, var, vote, sweep, alive, p, e, band, count, nseg, m, sl, sg, slot)
        m += cnt
        nseg += nb
        ncls += 1
        p = e
    sg.cls_lo[ncls] = nseg
    return sl, sg, slot, nseg, m


@_njit(inline="always")
def _nb_queue(s, rank, alive):
    """The alive boxes by decreasing score, ties by lower index: keys ``hk`` and indices ``ht``,
    already a valid max-heap. Returns ``(hk, ht, size)``."""
    n = s.shape[0]
    hk = np.empty(n)
    ht = np.empty(n, np.int64)
    size = 0
    for r in range(n):
        if alive[rank[r]]:
            hk[size] = s[rank[r]]
            ht[size] = rank[r]
            size += 1
    r = 0
    while r < size:
        e = r + 1
        while e < size and hk[e] == hk[r]:
            e += 1
        if e - r > 1:
            ht[r:e] = np.sort(ht[r:e])
        r = e
    return hk, ht, size


@_njit_light
def _nb_next_in_order(ht, size, r, alive):
    """Hard suppression never changes a score: the next box is the queue's next alive one, read
    from position ``r``. Returns ``(box or -1, r)``."""
    while r < size and not alive[ht[r]]:
        r += 1
    if r == size:
        return -1, r
    return ht[r], r + 1


@_njit_light
def _nb_pop(hk, ht, size, alive, cur, slot):
    """With decays the queue (``hk``, ``ht``, ``size``) is a lazy max-heap whose key bounds each
    box's current score from above: the top's stale key is replaced by its current score, a
    removed box is dropped, until the top is alive and current. Returns ``(box or -1, size)``."""
    while size > 0:
        i = ht[0]
        stale = alive[i] and hk[0] != cur[slot[i]]
        if stale:
            hk[0] = cur[slot[i]]
        else:
            size -= 1
            hk[0] = hk[size]
            ht[0] = ht[size]
        _nb_sift_down(hk, ht, size, 0)
        if not stale and alive[i]:
            return i, size
    return -1, size


@_njit(inline="always")
def _nb_leave(alive, sl, q):
    """The box of slot ``q`` leaves (selected or removed): y1 = +inf, y2 = -inf fail every overlap test."""
    alive[sl.box[q]] = False
    sl.y1[q] = np.inf
    sl.y2[q] = -np.inf


@_njit_light
def _nb_take(alive, sl, q):
    """Select the box of slot ``q``: it leaves; returns its (x1, y1, x2, y2, area)."""
    p = (sl.x1[q], sl.y1[q], sl.x2[q], sl.y2[q], sl.area[q])
    _nb_leave(alive, sl, q)
    return p


@_njit_light
def _nb_overlapping(sl, sg, sp, p, mask, buf):
    """Into ``buf`` the remaining slots of slot ``sp``'s class that may overlap box ``p``
    (x1, y1, x2, y2, area); returns how many."""
    px1, py1, px2, py2, _ = p
    k = 0
    c = sg.cls[sl.seg[sp]]
    for g in range(sg.cls_lo[c], sg.cls_lo[c + 1]):
        lo, hi = sg.lo[g], sg.hi[g]
        if lo == hi or sg.y1[g] >= py2 or sg.y2[g] <= py1:
            continue
        lim = px1 - sg.w[g] * 1.000001 - abs(px1) * 1e-15  # <= x1 of any box reaching past px1
        lo = _nb_lower_bound(sl.x1, lo, hi, lim)
        a = _nb_lower_bound(sl.x1, lo, hi, px2)
        k = _nb_candidates(sl.x2, sl.y1, sl.y2, lo, a, px1, py1, py2, mask, buf, k)
    return k


@_njit_light
def _nb_vote_start(num, den, b, sl, i, q):
    """Start the vote of selected box ``i`` (slot ``q``) with itself, weights 1 / variance."""
    for c in range(4):
        den[c] = sl.iv[q, c]
        num[c] = b[i, c] * den[c]


@_njit(inline="always")
def _nb_vote_add(num, den, c, w, x):
    """Add coordinate ``x`` with weight ``w`` to coordinate ``c`` of the vote."""
    num[c] += w * x
    den[c] += w


@_njit_light
def _nb_visit(rule, vote, sigma_t, sl, buf, k, i, p, alive, dropper, num, den):
    """The operations of the sequential algorithm between selected box ``i`` (``p``: x1, y1, x2,
    y2, area) and each slot of buf[:k], in order: vote, then decay or remove (``rule``: mode,
    iou_threshold, sigma, min_score). Returns how many boxes were removed."""
    mode, iou_threshold, sigma, min_score = rule
    px1, py1, px2, py2, pa = p
    removed = 0
    for t in range(k):
        q = buf[t]
        iw = min(px2, sl.x2[q]) - max(px1, sl.x1[q])
        ih = min(py2, sl.y2[q]) - max(py1, sl.y1[q])
        inter = iw * ih
        union = pa + sl.area[q] - inter
        iou = inter / union if union > 0.0 else 0.0
        if iou > 0.0:
            if vote:
                pv = math.exp(-((1.0 - iou) ** 2) / sigma_t)
                _nb_vote_add(num, den, 0, pv * sl.iv[q, 0], sl.x1[q])
                _nb_vote_add(num, den, 1, pv * sl.iv[q, 1], sl.y1[q])
                _nb_vote_add(num, den, 2, pv * sl.iv[q, 2], sl.x2[q])
                _nb_vote_add(num, den, 3, pv * sl.iv[q, 3], sl.y2[q])
            f = _nb_decay(mode, iou, iou_threshold, sigma)
            if f < 1.0:
                new = sl.cur[q] * f
                if f == 0.0 or new < min_score:
                    _nb_leave(alive, sl, q)
                    dropper[sl.box[q]] = i
                    removed += 1
                else:
                    sl.cur[q] = new
    return removed


@_njit_light
def _nb_repack(alive, sl, sg, nseg, m, slot, vote):
    """Move the alive slots of [0, m) to the front, in order, and fix ``slot`` and the segments'
    ranges. Returns the new number of slots."""
    w2 = 0
    for q in range(m):
        if alive[sl.box[q]]:
            sl.x1[w2], sl.y1[w2], sl.x2[w2], sl.y2[w2] = sl.x1[q], sl.y1[q], sl.x2[q], sl.y2[q]
            sl.area[w2] = sl.area[q]
            sl.cur[w2] = sl.cur[q]
            if vote:
                for c in range(4):
                    sl.iv[w2, c] = sl.iv[q, c]
            sl.box[w2] = sl.box[q]
            sl.seg[w2] = sl.seg[q]
            slot[sl.box[q]] = w2
            w2 += 1
    sg.lo[:nseg] = 0
    sg.hi[:nseg] = 0
    for q in range(w2 - 1, -1, -1):
        sg.lo[sl.seg[q]] = q
    for q in range(w2):
        sg.hi[sl.seg[q]] = q + 1
    return w2


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
    alive = np.empty(n, np.bool_)  # remaining, by original index
    for i in range(n):
        alive[i] = s[i] >= min_score  # boxes that start below min_score are never candidates
    sl, sg, slot, nseg, m = _nb_layout(b, s, lab, sweep, alive, var, vote, band_size)
    n_alive = m
    cur = sl.cur
    hk, ht, size = _nb_queue(s, rank, alive)
    rule = (mode, iou_threshold, sigma, min_score)
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
            i, r = _nb_next_in_order(ht, size, r, alive)
        else:
            i, size = _nb_pop(hk, ht, size, alive, cur, slot)
        if i < 0:
            break
        sp = slot[i]
        sel[ns] = i
        sel_score[ns] = cur[sp]
        p = _nb_take(alive, sl, sp)
        n_alive -= 1
        if vote:
            _nb_vote_start(num, den, b, sl, i, sp)
        k = _nb_overlapping(sl, sg, sp, p, mask, buf)
        n_alive -= _nb_visit(rule, vote, sigma_t, sl, buf, k, i, p, alive, dropper, num, den)
        if vote:
            for c in range(4):
                voted[ns, c] = num[c] / den[c]
        ns += 1
        if m - n_alive > max(n_alive, 32):  # re-pack once more than half of the slots are dead (O(N) in all)
            m = _nb_repack(alive, sl, sg, nseg, m, slot, vote)
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
