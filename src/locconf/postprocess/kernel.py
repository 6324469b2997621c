"""The greedy core on CPU: a numba kernel that computes overlaps on the fly.

Memory is O(N): no pair is ever stored. The remaining boxes of each class are split into
horizontal bands by y1 and packed by (class, band, x1) into "slots". A selected box p can only
overlap, in a band whose y-extent reaches its own, the slots with x1[p] - (widest box of the
band) < x1 < x2[p], found by two binary searches and filtered by a vectorised pass. A box
that leaves gets y1 = +inf, y2 = -inf, so it never passes the filter, and the slots are
re-packed once half of them are dead. Every IoU and decay is computed with the operations of
the plain sequential algorithm, in the same order, so output scores are bit-identical to it.

The kernels are compiled once and cached on disk (``cache=True``): in ``__pycache__`` beside
this file when that is writable, else in numba's user-wide cache directory
(``$NUMBA_CACHE_DIR`` if set, else ``~/.cache/numba``). Where no cache location is writable
they are compiled in every process (a few seconds at the first call).

``mode`` is 0 (hard suppression), 1 (linear decay) or 2 (Gaussian decay), as in :mod:`.modes`
(literals here: numba's disk cache would not notice a change of a constant imported from
another file).
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch

_BAND_SIZE = 512  # about how many boxes of a class the numba kernel puts in one horizontal band


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
