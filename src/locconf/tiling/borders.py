"""Candidates cut by an interior tile border: which to drop, down-weight or keep before merging.

A candidate is cut on a side when its box comes within ``margin`` pixels of an interior edge of
its tile (:func:`locconf.tiling.grid.cut_sides`). The ``border`` modes:

* ``"none"``: every candidate is merged as it is (plain NMS over the pooled tiles, as DeepForest's
  ``predict_tile`` does).
* ``"drop"`` (default): a cut candidate ``c`` is dropped when a neighbouring tile sees the whole
  object, that is when there is a candidate ``f`` that is not cut, of the same label, such that
  (1) ``f`` covers ``c``: ``area(c & f) / area(c) >= cover`` (intersection over the cut box's
  area, which is the smaller of the two when ``f`` is the whole object); (2) ``f`` reaches past
  ``c``'s tile on a side where ``c`` is cut (``f`` comes from a tile that sees beyond that edge,
  so it is not a neighbour of ``c`` inside the same tile; a box merely near an edge where the
  object ends is flagged as cut too, which is why one side suffices); (3) ``f`` ranks at least
  ``score_ratio`` times as high as ``c``, ranking by ``sqrt(score x quality)`` where the detector
  predicts a quality (so the box whose predicted quality is higher is preferred) and by the score
  otherwise. A cut candidate without such a counterpart (the neighbour missed the object, or the
  object is larger than the overlap and is cut in every tile) is kept and merged as usual.
* ``"down-weight"``: the score of every cut candidate is multiplied by ``cut_weight`` before
  merging, so that a whole counterpart wins the suppression where there is one, and the cut box
  survives, ranked lower, where there is none.

Cut pieces are never joined into one box: an object larger than the overlap is cut in every tile
that sees it, and its pieces survive side by side unless their IoU exceeds the method's
threshold. Choose ``overlap`` at least as large as the largest object.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..boxes import box_area
from .checks import _check_candidates, _check_fraction, _check_windows, _is_num
from .grid import cut_sides

#: Ways to handle candidates cut by an interior tile border (see the module docstring).
BORDERS = ("none", "drop", "down-weight")

_PAIR_CHUNK = 1 << 22  # at most this many (cut, counterpart) pairs are compared at once


def _rank(cands: Mapping[str, Tensor]) -> Tensor:
    """The ranking signal that compares a cut box with its counterpart: sqrt(score x quality) or score."""
    scores = cands["scores"].double()
    if cands.get("quality") is None:
        return scores
    return torch.sqrt(scores.clamp(0, 1) * cands["quality"].double().clamp(0, 1))


def _superseded(cands: Mapping[str, Tensor], tile: Tensor, windows: Tensor, cut: Tensor, cover: float,
                score_ratio: float) -> Tensor:
    """(N,) bool: cut candidates that a whole counterpart from a neighbouring tile supersedes."""
    boxes = cands["boxes"].double()
    labels = cands["labels"]
    rank = _rank(cands)
    is_cut = cut.any(dim=1)
    full = ~is_cut
    area = box_area(boxes)
    win = windows.to(torch.float64)
    out = torch.zeros(boxes.shape[0], dtype=torch.bool)
    for t in torch.unique(tile[is_cut]).tolist():
        w = win[t]
        cs = torch.nonzero(is_cut & (tile == t)).flatten()
        # counterparts: whole boxes of other tiles that overlap this tile's window
        fs = torch.nonzero(full & (tile != t) & (boxes[:, 0] < w[2]) & (boxes[:, 2] > w[0])
                           & (boxes[:, 1] < w[3]) & (boxes[:, 3] > w[1])).flatten()
        if fs.numel() == 0:
            continue
        fb = boxes[fs]
        beyond = torch.stack([fb[:, 0] < w[0], fb[:, 1] < w[1], fb[:, 2] > w[2], fb[:, 3] > w[3]], dim=1)  # (F, 4)
        step = max(1, _PAIR_CHUNK // fs.numel())
        for lo in range(0, cs.numel(), step):
            c = cs[lo:lo + step]
            cb = boxes[c]
            lt = torch.maximum(cb[:, None, :2], fb[None, :, :2])
            rb = torch.minimum(cb[:, None, 2:], fb[None, :, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=2)  # (C, F)
            covered = inter >= cover * area[c][:, None]
            covered &= area[c][:, None] > 0
            reaches = (cut[c][:, None, :] & beyond[None, :, :]).any(dim=2)
            match = covered & reaches & (labels[c][:, None] == labels[fs][None, :])
            match &= rank[fs][None, :] >= score_ratio * rank[c][:, None]
            out[c] = match.any(dim=1)
    return out


def resolve_borders(
    candidates: Mapping[str, Tensor],
    tile: Tensor,
    windows: Tensor,
    image_size: tuple[int, int],
    border: str = "drop",
    margin: float = 4.0,
    cover: float = 0.7,
    score_ratio: float = 0.5,
    cut_weight: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Handle the candidates that interior tile edges cut (``border`` mode, see the module docstring).

    Args:
        candidates: the pooled candidates of several tiles in image coordinates: ``boxes``
            (N, 4), ``scores`` (N,), ``labels`` (N,), optional ``quality`` (N,).
        tile: (N,) int64, the tile (row of ``windows``) each candidate comes from.
        windows: (T, 4) tile windows (:func:`tile_grid`).
        image_size: ``(height, width)``.
        border: ``"none"``, ``"drop"`` or ``"down-weight"``.
        margin: pixels within which a box touching a tile edge is cut.
        cover: ``"drop"``: least fraction of the cut box that its counterpart covers.
        score_ratio: ``"drop"``: least rank of the counterpart, relative to the cut box's.
        cut_weight: ``"down-weight"``: factor on the scores of cut boxes.

    Returns:
        ``(keep, scores)``: (N,) bool, the candidates to merge, and (N,) their scores for merging.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    cands = _check_candidates(candidates, "candidates")
    windows = _check_windows(windows)
    n = cands["boxes"].shape[0]
    if not isinstance(tile, Tensor) or tuple(tile.shape) != (n,) or tile.is_floating_point():
        raise ValueError(f"tile must be an integer tensor of shape ({n},)")
    if n and (int(tile.min()) < 0 or int(tile.max()) >= windows.shape[0]):
        raise ValueError(f"tile holds indices outside the {windows.shape[0]} windows")
    _check_fraction(cover, "cover", low_open=True)
    if not _is_num(score_ratio) or score_ratio < 0:
        raise ValueError(f"score_ratio must be a non-negative number, got {score_ratio!r}")
    _check_fraction(cut_weight, "cut_weight")
    scores = cands["scores"]
    keep = torch.ones(n, dtype=torch.bool)
    cut = cut_sides(cands["boxes"], windows[tile], image_size, margin)  # also checks margin
    if border == "none" or n == 0:
        return keep, scores
    if border == "down-weight":
        return keep, torch.where(cut.any(dim=1), scores * cut_weight, scores)
    return ~_superseded(cands, tile, windows, cut, cover, score_ratio), scores
