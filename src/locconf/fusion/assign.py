"""The greedy WBF clustering: one compiled numba pass over the boxes, candidate clusters from a grid.

How it stays fast: see "How the clustering stays fast" in :mod:`locconf.fusion`. This module imports
numba; :mod:`locconf.fusion` imports it at the first fusion (cache: :mod:`locconf.jit`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..jit import njit


@njit("box-fusion kernel", inline="always")
def _nb_cell(v, origin, cell, g):
    c = int(math.floor((v - origin) / cell))
    return min(max(c, 0), g - 1)


@njit("box-fusion kernel")
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

    One long loop on purpose: cut into steps (compiled without reference counting, as in
    :mod:`locconf.postprocess.kernel`), it took 1.15-1.35 times as long on 3 x 5,000 and
    3 x 20,000 boxes (``benchmarks/fusion.py`` scenes, one thread), as LLVM did not inline every
    step.
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
