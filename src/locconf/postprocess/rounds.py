"""The greedy core on any device (used on CUDA): vectorised rounds in torch.

Each round selects every remaining box that beats all its remaining interacting neighbours (exact:
such a box is selected before any of them by the sequential algorithm), then the new selections
decay their neighbours. The selection times that voting needs are reconstructed from the rounds.

Memory is O(N) plus one chunk of pairs: the overlapping pairs are never all materialised but
enumerated, chunk by chunk, from a sort-and-sweep over x1 (``_pair_chunks``). Classes are
kept apart by exact integer search keys (class rank, rank of the coordinate among all
coordinates), so huge coordinates or labels lose nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .modes import _HARD, _LINEAR

_PAIR_CHUNK = 1 << 20  # the torch backend evaluates at most this many candidate pairs at once
_PAIR_STORE = 1 << 22  # and keeps the overlapping pairs across rounds only up to this many



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
