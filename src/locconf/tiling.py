"""Whole images: tiled prediction, boxes cut by tile borders, and merging the tiles' candidates.

An orthomosaic thousands of pixels wide is cut into square tiles that overlap (:func:`tile_grid`);
the detector runs on batches of tiles and returns its raw candidates (before any NMS); each tile's
candidates are shifted to image coordinates (:func:`shift_candidates`), the candidates cut by an
interior tile border are handled (:func:`resolve_borders`) and everything is merged with a
:mod:`locconf.postprocess` method (:class:`TileMerger`). :func:`predict_tiled` does all of it.

Tile grid
---------
Tiles of ``tile_size`` pixels start every ``tile_size - overlap`` pixels; the last row and column
are pushed back to end exactly at the image's edge (the convention of the NEON training tiles,
:func:`locconf.data.neon.tile_starts`), so every tile has the full size unless the image is smaller
than a tile in that direction (one tile then spans it). Tiles are numbered row by row (rows by
increasing ``y1``, tiles of a row by increasing ``x1``).

Boxes cut by a tile border
--------------------------
A tile's *interior* edges are those that are not an edge of the image. A candidate is **cut** on a
side when its box comes within ``margin`` pixels of an interior edge of its tile on that side (the
object may continue in the neighbouring tile; candidates are first clipped to their tile). The
``border`` modes:

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

Merging progressively, with bounded memory
------------------------------------------
:class:`TileMerger` receives the tiles in grid order and keeps a buffer of candidates. After each
row of tiles, with ``Y`` the top of the next row (everything below ``Y`` is still unseen), it runs
the border handling and the post-processing method on the whole buffer and *decides* the
candidates whose box ends at least ``context`` pixels above ``Y`` (``y2 <= Y - context``): those
kept by the method become detections, the others are dropped. A candidate stays in the buffer, as
context for its neighbours' decisions, until its ``y2`` is more than ``2 * context + tile height +
row step`` above ``Y``. So every candidate is decided in a run that held every candidate lying
within ``context`` pixels of it vertically (the rows are the image's full width), and the buffer
holds a horizontal strip of about ``2 * context + 2 * tile_size`` pixels, whatever the image's
height. With ``context >= `` the largest box (candidates are clipped to their tile, so
``tile_size`` by default), the result equals merging the whole image at once (``context=inf``)
unless a chain of boxes each overlapping the next, whose suppression decisions depend on each
other, spans more than ``context`` pixels; the tests check the equality on generated scenes.
Detections are kept, best first, up to ``max_detections`` (default: 100 per tile, the usual cap of
one image), and each tile's candidates are capped at ``candidates_per_tile``.

Reading images
--------------
PNG and JPEG files have no random access: they are decoded whole, once, in their own pixel format
(3 bytes a pixel for 8-bit RGB), with :func:`locconf.data.load_image`'s conversion applied to each
tile (8-bit / 255, 16-bit grey / 65535); Pillow's decompression-bomb limit is lifted for this file
only (orthomosaics are legitimately huge). GeoTIFFs are read tile by tile (windowed reads) with
rasterio when it is installed (an optional dependency), which also gives the geotransform: boxes
are then written in map coordinates as well. Without rasterio a TIFF is read whole with Pillow and
has no geotransform. Only the tiles of one batch are held as float tensors.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from .boxes import box_area, check_boxes
from .files import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "BORDERS",
    "tile_grid",
    "shift_candidates",
    "cut_sides",
    "resolve_borders",
    "merge_candidates",
    "TileMerger",
    "open_raster",
    "tile_candidates",
    "predict_tiled",
    "write_csv",
    "write_coco_results",
    "draw_overview",
    "map_boxes",
]

#: Ways to handle candidates cut by an interior tile border (see the module docstring).
BORDERS = ("none", "drop", "down-weight")

#: Candidate fields carried through tiling (others a detector returns are ignored).
_FIELDS = ("boxes", "scores", "labels", "quality", "variances")

_PAIR_CHUNK = 1 << 22  # at most this many (cut, counterpart) pairs are compared at once


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _check_int(value: Any, name: str, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_fraction(value: Any, name: str, low_open: bool = False) -> None:
    ok = _is_num(value) and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def _check_image_size(image_size: Any) -> tuple[int, int]:
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(_is_int(v) and v >= 0 for v in image_size)):
        raise ValueError(f"image_size must be (height, width) of non-negative integers, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _check_windows(windows: Any) -> Tensor:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.shape[1] != 4:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a (T, 4) tensor of tile windows (x1, y1, x2, y2), got {shape}")
    if windows.numel() and not bool(((windows[:, 2:] >= windows[:, :2])).all()):
        raise ValueError("windows must have x2 >= x1 and y2 >= y1")
    return windows


def _check_candidates(cands: Any, name: str) -> dict[str, Tensor]:
    """The candidate fields of one tile or image, checked for shapes; returns them (no copy)."""
    if not isinstance(cands, Mapping):
        raise ValueError(f"{name} must be a dict with 'boxes', 'scores' and 'labels', got {type(cands).__name__}")
    for key in ("boxes", "scores", "labels"):
        if not isinstance(cands.get(key), Tensor):
            raise ValueError(f"{name} needs a tensor {key!r}")
    boxes = check_boxes(cands["boxes"], f"{name}['boxes']")
    n = boxes.shape[0]
    out = {}
    for key in _FIELDS:
        v = cands.get(key)
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise ValueError(f"{name}[{key!r}] must be a tensor, got {type(v).__name__}")
        want = (n, 4) if key in ("boxes", "variances") else (n,)
        if tuple(v.shape) != want:
            raise ValueError(f"{name}[{key!r}] must have shape {want}, got {tuple(v.shape)}")
        out[key] = v
    if out["labels"].is_floating_point() or out["labels"].dtype == torch.bool:
        raise ValueError(f"{name}['labels'] must be an integer tensor, got {out['labels'].dtype}")
    return out


# --------------------------------------------------------------------------------------------
# Tile grid, shifting, cut sides
# --------------------------------------------------------------------------------------------


def tile_grid(height: int, width: int, tile_size: int = 400, overlap: int = 100) -> Tensor:
    """Tile windows covering an image, row by row.

    Args:
        height, width: image size in pixels (0 gives no tiles).
        tile_size: side of a tile in pixels.
        overlap: least overlap of neighbouring tiles in pixels, ``0 <= overlap < tile_size``.

    Returns:
        (T, 4) int64 windows ``(x1, y1, x2, y2)`` (pixels ``x1 <= x < x2``), sorted by ``y1`` then
        ``x1``. Every tile has ``tile_size`` pixels on a side unless the image is smaller.
    """
    from .data.neon import tile_starts

    _check_int(height, "height", 0)
    _check_int(width, "width", 0)
    _check_int(tile_size, "tile_size", 1)
    if not _is_int(overlap) or not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be an integer in [0, tile_size={tile_size}), got {overlap!r}")
    if height == 0 or width == 0:
        return torch.zeros(0, 4, dtype=torch.int64)
    ys = torch.tensor(tile_starts(0, height, tile_size, overlap), dtype=torch.int64)
    xs = torch.tensor(tile_starts(0, width, tile_size, overlap), dtype=torch.int64)
    y1, x1 = torch.meshgrid(ys, xs, indexing="ij")
    x1, y1 = x1.reshape(-1), y1.reshape(-1)
    return torch.stack([x1, y1, (x1 + tile_size).clamp(max=width), (y1 + tile_size).clamp(max=height)], dim=1)


def shift_candidates(candidates: Mapping, window: Sequence[int] | Tensor) -> dict[str, Tensor]:
    """One tile's candidates in image coordinates: boxes clipped to the tile and shifted by its origin.

    Args:
        candidates: ``boxes`` (N, 4) in tile coordinates, ``scores`` (N,), ``labels`` (N,),
            optional ``quality`` (N,) and ``variances`` (N, 4) (unchanged by a shift).
        window: the tile's ``(x1, y1, x2, y2)`` in the image.

    Returns:
        A new dict of the same fields (other keys are dropped).
    """
    cands = _check_candidates(candidates, "candidates")
    w = torch.as_tensor(window).reshape(-1)
    if w.numel() != 4:
        raise ValueError(f"window must be (x1, y1, x2, y2), got {window!r}")
    x1, y1, x2, y2 = (float(v) for v in w.tolist())
    boxes = cands["boxes"]
    clipped = torch.stack([boxes[:, 0].clamp(0, x2 - x1), boxes[:, 1].clamp(0, y2 - y1),
                           boxes[:, 2].clamp(0, x2 - x1), boxes[:, 3].clamp(0, y2 - y1)], dim=1)
    out = dict(cands)
    out["boxes"] = clipped + boxes.new_tensor([x1, y1, x1, y1])
    return out


def cut_sides(boxes: Tensor, windows: Tensor, image_size: tuple[int, int], margin: float = 4.0) -> Tensor:
    """Which sides of each box an interior tile edge cuts.

    Args:
        boxes: (N, 4) boxes in image coordinates.
        windows: (N, 4) the window of each box's tile (or (4,) for all of them).
        image_size: ``(height, width)`` of the image: edges on its border are not interior.
        margin: a side is cut when the box comes within this many pixels of the tile's edge.

    Returns:
        (N, 4) bool: cut on the ``(left, top, right, bottom)`` side.
    """
    check_boxes(boxes, "boxes")
    h, w = _check_image_size(image_size)
    if not _is_num(margin) or margin < 0:
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    win = torch.as_tensor(windows).to(boxes.dtype)
    if win.shape not in ((4,), (boxes.shape[0], 4)):
        raise ValueError(f"windows must have shape (4,) or ({boxes.shape[0]}, 4), got {tuple(win.shape)}")
    win = win.expand(boxes.shape[0], 4)
    interior = torch.stack([win[:, 0] > 0, win[:, 1] > 0, win[:, 2] < w, win[:, 3] < h], dim=1)
    near = torch.stack([boxes[:, 0] <= win[:, 0] + margin, boxes[:, 1] <= win[:, 1] + margin,
                        boxes[:, 2] >= win[:, 2] - margin, boxes[:, 3] >= win[:, 3] - margin], dim=1)
    return interior & near


# --------------------------------------------------------------------------------------------
# Border handling and merging
# --------------------------------------------------------------------------------------------


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


def _postprocess(pool: dict[str, Tensor], method: str, params: Mapping) -> dict[str, Tensor]:
    from .postprocess import postprocess

    return postprocess(pool, method, max_detections=pool["boxes"].shape[0], **params)


def merge_candidates(
    candidates: Mapping[str, Tensor],
    tile: Tensor,
    windows: Tensor,
    image_size: tuple[int, int],
    method: str = "nms",
    params: Optional[Mapping] = None,
    border: str = "drop",
    max_detections: Optional[int] = None,
    **border_args: Any,
) -> dict[str, Tensor]:
    """Merge pooled tile candidates at once: :func:`resolve_borders`, then the method on what is left.

    The reference that :class:`TileMerger` reproduces progressively. ``border_args``: ``margin``,
    ``cover``, ``score_ratio``, ``cut_weight``. Returns the detections (fields of the candidates and
    ``tile``), best first, at most ``max_detections`` (None: all).
    """
    keep, scores = resolve_borders(candidates, tile, windows, image_size, border, **border_args)
    pool = {k: v[keep] for k, v in _check_candidates(candidates, "candidates").items()}
    pool["scores"] = scores[keep]
    pool["tile"] = tile[keep]
    det = _postprocess(pool, method, params or {})
    return det if max_detections is None else {k: v[:max_detections] for k, v in det.items()}


def _cat(parts: list[dict[str, Tensor]], like: dict[str, Tensor]) -> dict[str, Tensor]:
    if not parts:
        return {k: v[:0] for k, v in like.items()}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _top(dets: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    order = torch.sort(dets["scores"], descending=True, stable=True).indices[:k]
    return {key: v[order] for key, v in dets.items()}


class TileMerger:
    """Merge the candidates of a tile grid progressively, one row of tiles at a time.

    See the module docstring for what is decided when and what the buffer holds.

    Args:
        windows: (T, 4) the grid (:func:`tile_grid`): tiles are added in this order.
        image_size: ``(height, width)``.
        method, params: the :func:`locconf.postprocess.postprocess` method and its keywords.
        border: ``"none"``, ``"drop"`` or ``"down-weight"`` (:func:`resolve_borders`);
            ``margin``, ``cover``, ``score_ratio``, ``cut_weight`` as there.
        context: pixels of vertical context around a candidate when it is decided (default
            ``tile_size``, the largest possible box; ``math.inf`` merges everything at the end).
        max_detections: detections kept, best first (default: 100 per tile).
        candidates_per_tile: each tile keeps at most this many candidates, the highest scoring
            (None: all that the detector returns).

    Usage: ``m = TileMerger(windows, (h, w)); m.add(0, cands0); ...; dets = m.finish()``.
    """

    def __init__(self, windows: Tensor, image_size: tuple[int, int], method: str = "nms",
                 params: Optional[Mapping] = None, border: str = "drop", margin: float = 4.0, cover: float = 0.7,
                 score_ratio: float = 0.5, cut_weight: float = 0.5, context: Optional[float] = None,
                 max_detections: Optional[int] = None, candidates_per_tile: Optional[int] = None) -> None:
        from .postprocess import METHODS

        self.windows = _check_windows(windows).to(torch.int64)
        self.image_size = _check_image_size(image_size)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if params is not None and not isinstance(params, Mapping):
            raise ValueError(f"params must be a dict of the method's keyword arguments, got {type(params).__name__}")
        self.method, self.params = method, dict(params or {})
        self.border_args = dict(border=border, margin=margin, cover=cover, score_ratio=score_ratio,
                                cut_weight=cut_weight)
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        resolve_borders(empty, torch.zeros(0, dtype=torch.int64), self.windows, self.image_size,
                        **self.border_args)  # checks the border arguments now
        try:  # a dry run on no boxes checks the method's keywords before any tile is run
            _postprocess(dict(empty, quality=torch.zeros(0), variances=torch.zeros(0, 4)), method, self.params)
        except TypeError as e:
            raise ValueError(f"params: {e}") from None
        sizes = (self.windows[:, 2:] - self.windows[:, :2]) if self.windows.numel() else torch.zeros(1, 2)
        tile_h = float(sizes[:, 1].max())
        if context is None:
            context = max(tile_h, float(sizes[:, 0].max()))
        if not _is_num(context) or context < 0:
            raise ValueError(f"context must be a non-negative number (or math.inf), got {context!r}")
        if max_detections is None:
            max_detections = 100 * max(1, self.windows.shape[0])
        _check_int(max_detections, "max_detections", 1)
        if candidates_per_tile is not None:
            _check_int(candidates_per_tile, "candidates_per_tile", 1)
        self.context, self.max_detections, self.candidates_per_tile = float(context), max_detections, candidates_per_tile
        y1 = self.windows[:, 1].tolist()
        rows = sorted(set(y1))
        step = max((b - a for a, b in zip(rows, rows[1:])), default=0)
        self._retain = 2 * self.context + tile_h + step
        # after tile i: the top of the next row when tile i ends its row, else None
        self._row_end: list[Optional[float]] = [
            (None if i + 1 < len(y1) and y1[i + 1] == y1[i] else (float(y1[i + 1]) if i + 1 < len(y1) else math.inf))
            for i in range(len(y1))
        ]
        if any(b < a for a, b in zip(y1, y1[1:])):
            raise ValueError("windows must be sorted by row (increasing y1), as tile_grid returns them")
        self._next = 0
        self._keys: Optional[tuple[str, ...]] = None
        self._pending: list[dict[str, Tensor]] = []
        self._buffer: Optional[dict[str, Tensor]] = None
        self._out: list[dict[str, Tensor]] = []
        self._out_count = 0
        self.peak_buffer = 0  # the most candidates the buffer held at once

    def add(self, index: int, candidates: Mapping) -> None:
        """Add tile ``index``'s candidates (tile coordinates, as the detector returns them)."""
        if index != self._next:
            raise ValueError(f"tiles must be added in grid order: expected tile {self._next}, got {index!r}")
        try:
            cands = shift_candidates(candidates, self.windows[index])
        except ValueError as e:
            raise ValueError(f"tile {index}: {e}") from None
        keys = tuple(k for k in _FIELDS if k in cands)
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            raise ValueError(f"tile {index} has the candidate fields {list(keys)} but earlier tiles have "
                             f"{list(self._keys)}")
        cap = self.candidates_per_tile
        if cap is not None and cands["scores"].shape[0] > cap:
            top = torch.topk(cands["scores"], cap).indices
            cands = {k: v[top] for k, v in cands.items()}
        cands["tile"] = torch.full((cands["boxes"].shape[0],), index, dtype=torch.int64)
        cands["decided"] = torch.zeros(cands["boxes"].shape[0], dtype=torch.bool)
        self._pending.append(cands)
        self._next += 1
        y_next = self._row_end[index]
        if y_next is not None:
            self._round(y_next)

    def _round(self, y_next: float) -> None:
        parts = ([self._buffer] if self._buffer is not None else []) + self._pending
        self._pending = []
        buf = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        n = buf["boxes"].shape[0]
        self.peak_buffer = max(self.peak_buffer, n)
        fields = {k: buf[k] for k in self._keys}
        last = math.isinf(y_next)
        y2 = buf["boxes"][:, 3].double()
        final = torch.ones(n, dtype=torch.bool) if last else y2 <= y_next - self.context
        newly = final & ~buf["decided"]
        if bool(newly.any()):
            keep, scores = resolve_borders(fields, buf["tile"], self.windows, self.image_size, **self.border_args)
            pool = {k: v[keep] for k, v in fields.items()}
            pool["scores"] = scores[keep]
            pool["tile"] = buf["tile"][keep]
            pool["row"] = torch.nonzero(keep).flatten()
            det = _postprocess(pool, self.method, self.params)
            sel = newly[det.pop("row")]
            if bool(sel.any()):
                self._emit({k: v[sel] for k, v in det.items()})
        buf["decided"] = buf["decided"] | final
        if last:
            self._buffer = None
            return
        stay = y2 > y_next - self._retain
        self._buffer = {k: v[stay] for k, v in buf.items()}

    def _emit(self, dets: dict[str, Tensor]) -> None:
        self._out.append(dets)
        self._out_count += dets["scores"].shape[0]
        if self._out_count > 2 * self.max_detections:  # bounded: keep the best max_detections so far
            merged = _top(_cat(self._out, dets), self.max_detections)
            self._out, self._out_count = [merged], merged["scores"].shape[0]

    def finish(self) -> dict[str, Tensor]:
        """The detections (image coordinates, fields of the candidates plus ``tile``), best first."""
        if self._next != self.windows.shape[0]:
            raise ValueError(f"finish() after {self._next} of {self.windows.shape[0]} tiles")
        if self._keys is None:  # no tiles (an empty image)
            return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                    "tile": torch.zeros(0, dtype=torch.int64)}
        like = {k: torch.zeros((0, 4) if k in ("boxes", "variances") else (0,),
                               dtype=torch.int64 if k == "labels" else torch.float32) for k in self._keys}
        like["tile"] = torch.zeros(0, dtype=torch.int64)
        return _top(_cat(self._out, like), self.max_detections)


# --------------------------------------------------------------------------------------------
# Reading images tile by tile
# --------------------------------------------------------------------------------------------


class _PillowRaster:
    """An image Pillow decodes whole (PNG, JPEG, ...); tiles are cropped from the decoded pixels."""

    def __init__(self, path: Path):
        from PIL import Image

        from .data.coco import _image_tensor

        self.path, self._to_tensor = path, _image_tensor
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # orthomosaics are legitimately huge
        try:
            im = Image.open(path)
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the image, the file is truncated or not an image "
                             f"({type(e).__name__}: {e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        self._im = im
        self.width, self.height = im.size
        self.transform: Optional[tuple[float, ...]] = None
        self.crs: Optional[str] = None
        self._to_tensor(im.crop((0, 0, min(1, self.width), min(1, self.height))), path)  # unsupported modes fail now

    def read(self, window: Sequence[int]) -> Tensor:
        x1, y1, x2, y2 = (int(v) for v in window)
        return self._to_tensor(self._im.crop((x1, y1, x2, y2)), self.path)

    def overview(self, max_side: int) -> tuple[Tensor, float]:
        scale = min(1.0, max_side / max(self.width, self.height, 1))
        im = self._im
        if scale < 1.0:
            size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
            if not (im.mode in ("RGB", "L") or im.mode.startswith("I;16")):  # 16-bit grey keeps its depth
                im = im.convert("RGB")
            im = im.resize(size, resample=3)  # bicubic
        return self._to_tensor(im, self.path), scale

    def close(self) -> None:
        self._im.close()


class _RasterioRaster:
    """A raster rasterio reads window by window (GeoTIFF), with its geotransform and CRS."""

    def __init__(self, path: Path, rasterio: Any):
        self.path, self._rio = path, rasterio
        try:
            self._ds = rasterio.open(path)
        except Exception as e:  # rasterio raises its own RasterioIOError
            raise ValueError(f"{path}: cannot read the raster ({type(e).__name__}: {e})") from e
        ds = self._ds
        self.width, self.height = ds.width, ds.height
        if ds.count >= 3:
            self._bands = [1, 2, 3]
        elif ds.count == 1:
            self._bands = [1, 1, 1]
        else:
            ds.close()
            raise ValueError(f"{path}: {ds.count} bands; expected 1 (grey) or at least 3 (RGB first)")
        dtype = ds.dtypes[0]
        if dtype not in ("uint8", "uint16"):
            ds.close()
            raise ValueError(f"{path}: pixel type {dtype} is not supported; expected uint8 or uint16")
        self._scale = 255.0 if dtype == "uint8" else 65535.0
        t = ds.transform
        self.transform = (t.a, t.b, t.c, t.d, t.e, t.f)
        self.crs = ds.crs.to_string() if ds.crs else None

    def _tensor(self, arr: Any) -> Tensor:
        return torch.from_numpy(arr.astype("float32")).div_(self._scale)

    def read(self, window: Sequence[int]) -> Tensor:
        from rasterio.windows import Window

        x1, y1, x2, y2 = (int(v) for v in window)
        return self._tensor(self._ds.read(self._bands, window=Window(x1, y1, x2 - x1, y2 - y1)))

    def overview(self, max_side: int) -> tuple[Tensor, float]:
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.width, self.height, 1))
        shape = (3, max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        return self._tensor(self._ds.read(self._bands, out_shape=shape, resampling=Resampling.average)), scale

    def close(self) -> None:
        self._ds.close()


@contextlib.contextmanager
def open_raster(path: str | os.PathLike):
    """Open an image for tiled reading: ``with open_raster(p) as r: r.read((x1, y1, x2, y2))``.

    The raster has ``width``, ``height``, ``transform`` (GDAL's six geotransform numbers
    ``(a, b, c, d, e, f)``: ``X = a * col + b * row + c``, ``Y = d * col + e * row + f``, or None),
    ``crs`` (a string or None), ``read(window) -> (3, h, w)`` float in [0, 1] and
    ``overview(max_side) -> (image, scale)``. TIFFs go through rasterio when it is installed
    (windowed reads), everything else (and TIFFs without rasterio) through Pillow (decoded whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    raster: Any = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import rasterio
        except ImportError:
            logger.warning("%s: rasterio is not installed; reading the TIFF whole with Pillow, without its "
                           "geotransform (pip install rasterio for windowed reads and map coordinates)", path)
        else:
            raster = _RasterioRaster(path, rasterio)
    if raster is None:
        raster = _PillowRaster(path)
    try:
        yield raster
    finally:
        raster.close()


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def tile_candidates(model: torch.nn.Module, raster: Any, windows: Tensor, batch_size: int = 4,
                    device: torch.device | str = "cpu", progress: bool = True,
                    calibration: Any = None) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Run ``model`` over the tiles of ``raster`` in batches; yield ``(tile index, candidates)`` in order.

    Candidates are in tile coordinates, on the CPU, with the fields of :data:`_FIELDS` the model
    returns; with ``calibration`` (:class:`locconf.evaluation.calibration.Calibration`) their quality is
    calibrated. Only one batch of tiles is held at a time. The model's training mode is restored.
    """
    _check_int(batch_size, "batch_size", 1)
    windows = _check_windows(windows)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=windows.shape[0], desc="tiles", unit="tile", disable=not progress)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].tolist()
            images = [raster.read(w).to(device) for w in batch]
            with torch.no_grad():
                outputs = model(images)
            if len(outputs) != len(images):
                raise ValueError(f"model returned {len(outputs)} outputs for {len(images)} tiles")
            for i, out in enumerate(outputs):
                cands = {k: out[k].detach().cpu() for k in _FIELDS if isinstance(out.get(k), Tensor)}
                if calibration is not None:
                    cands = calibration.apply(cands)
                yield start + i, cands
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)


def predict_tiled(model: torch.nn.Module, raster: Any, tile_size: int = 400, overlap: int = 100,
                  batch_size: int = 4, method: str = "nms", params: Optional[Mapping] = None,
                  border: str = "drop", device: torch.device | str = "cpu", progress: bool = True,
                  calibration: Any = None, **merger_args: Any) -> dict[str, Tensor]:
    """Detect objects in a whole image: tiles, the model, border handling and progressive merging.

    Args:
        model: a detector returning raw candidates (``model(images)`` in eval mode, a list of
            dicts with ``boxes``, ``scores``, ``labels`` and optional ``quality`` / ``variances``).
        raster: from :func:`open_raster`.
        tile_size, overlap: the grid (:func:`tile_grid`). batch_size: tiles per model call.
        method, params, border, **merger_args: as :class:`TileMerger` (``margin``, ``cover``,
            ``score_ratio``, ``cut_weight``, ``context``, ``max_detections``, ``candidates_per_tile``).
        calibration: optional :class:`locconf.evaluation.calibration.Calibration` applied to each tile's quality.

    Returns:
        Detections in image coordinates (``boxes``, ``scores``, ``labels``, ``quality`` /
        ``variances`` where predicted, ``tile``), best first.
    """
    windows = tile_grid(raster.height, raster.width, tile_size, overlap)
    merger = TileMerger(windows, (raster.height, raster.width), method, params, border, **merger_args)
    for index, cands in tile_candidates(model, raster, windows, batch_size, device, progress, calibration):
        merger.add(index, cands)
    return merger.finish()


# --------------------------------------------------------------------------------------------
# Writing detections
# --------------------------------------------------------------------------------------------


def map_boxes(boxes: Tensor, transform: Sequence[float]) -> Tensor:
    """Boxes (N, 4) in pixels -> (N, 4) ``(xmin, ymin, xmax, ymax)`` in map units (float64).

    ``transform`` is ``(a, b, c, d, e, f)``: ``X = a * col + b * row + c``, ``Y = d * col + e * row + f``.
    Each output box bounds the four mapped corners (exact for north-up rasters).
    """
    if len(transform) != 6 or not all(_is_num(v) for v in transform):
        raise ValueError(f"transform must be six numbers (a, b, c, d, e, f), got {transform!r}")
    a, b, c, d, e, f = (float(v) for v in transform)
    bx = check_boxes(boxes, "boxes").double()
    cols = bx[:, [0, 2, 0, 2]]
    rows = bx[:, [1, 1, 3, 3]]
    x, y = a * cols + b * rows + c, d * cols + e * rows + f
    return torch.stack([x.amin(1), y.amin(1), x.amax(1), y.amax(1)], dim=1)


def _label_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def write_csv(dets: Mapping[str, Tensor], path: str | os.PathLike, class_names: Optional[Sequence[str]] = None,
              transform: Optional[Sequence[float]] = None, crs: Optional[str] = None) -> Path:
    """Write detections as DeepForest's CSV: ``xmin, ymin, xmax, ymax, label, score`` (+ ``quality``).

    Pixel boxes; ``label`` is ``class_names[label]`` where given (else the label number). With a
    geotransform, the columns ``map_xmin, map_ymin, map_xmax, map_ymax`` (map units) and ``crs``
    follow. Written through a temporary file.
    """
    dets = _check_candidates(dets, "dets")
    boxes = dets["boxes"].double()
    header = ["xmin", "ymin", "xmax", "ymax", "label", "score"]
    quality = dets.get("quality")
    if quality is not None:
        header.append("quality")
    mapped = map_boxes(dets["boxes"], transform) if transform is not None else None
    if mapped is not None:
        header += ["map_xmin", "map_ymin", "map_xmax", "map_ymax", "crs"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, (box, label, score) in enumerate(zip(boxes.tolist(), dets["labels"].tolist(),
                                                        dets["scores"].tolist())):
                row = [f"{v:.2f}" for v in box] + [_label_name(label, class_names), f"{score:.5f}"]
                if quality is not None:
                    row.append(f"{float(quality[i]):.5f}")
                if mapped is not None:
                    row += [repr(v) for v in mapped[i].tolist()] + [crs or ""]
                w.writerow(row)

    return atomic_write(path, write)


def write_coco_results(dets: Mapping[str, Tensor], path: str | os.PathLike, image_id: int = 1,
                       label_to_cat_id: Optional[Mapping[int, int]] = None) -> Path:
    """Write detections as COCO results (a JSON array; ``bbox`` = ``[x, y, w, h]`` in pixels).

    Records carry ``quality`` / ``variance`` where predicted, so the file is also an input of
    ``locconf postprocess``. ``label_to_cat_id`` maps labels to category ids (default: the label).
    """
    dets = _check_candidates(dets, "dets")
    _check_int(image_id, "image_id", 0)
    boxes = dets["boxes"].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    quality, variances = dets.get("quality"), dets.get("variances")
    records = []
    for i, (box, label, score) in enumerate(zip(xywh, dets["labels"].tolist(), dets["scores"].tolist())):
        if label_to_cat_id is not None and label not in label_to_cat_id:
            raise ValueError(f"label {label} is not a key of label_to_cat_id")
        rec = {"image_id": image_id, "category_id": int(label_to_cat_id[label]) if label_to_cat_id else int(label),
               "bbox": box, "score": score}
        if quality is not None:
            rec["quality"] = float(quality[i])
        if variances is not None:
            rec["variance"] = variances[i].tolist()
        records.append(rec)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(records), encoding="utf-8"))


def draw_overview(raster: Any, dets: Mapping[str, Tensor], path: str | os.PathLike, max_side: int = 2000,
                  score_threshold: float = 0.3, class_names: Optional[Sequence[str]] = None) -> Path:
    """Draw the detections on the image, downscaled so that its longer side is at most ``max_side``."""
    from .evaluation.plots import draw_detections

    _check_int(max_side, "max_side", 16)
    image, scale = raster.overview(max_side)
    shown = {k: v for k, v in dets.items() if k in ("scores", "labels", "quality")}
    shown["boxes"] = dets["boxes"] * scale
    return atomic_write(path, lambda tmp: draw_detections(image, shown, tmp, score_threshold=score_threshold,
                                                     class_names=class_names))
