"""Merging the tiles' candidates: all at once (:func:`merge_candidates`) or row by row (:class:`TileMerger`).

Both run the border handling (:mod:`locconf.tiling.borders`) and then a :mod:`locconf.postprocess`
method on what is left.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from .borders import resolve_borders
from .checks import _FIELDS, _check_candidates, _check_image_size, _check_int, _check_windows, _is_num
from .grid import shift_candidates


def _postprocess(pool: dict[str, Tensor], method: str, params: Mapping) -> dict[str, Tensor]:
    from ..postprocess import postprocess

    return postprocess(pool, method, max_detections=pool["boxes"].shape[0], **params)


def _border_pool(candidates: Mapping[str, Tensor], tile: Tensor, windows: Tensor, image_size: tuple[int, int],
                 border_args: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
    """The candidates left to merge after :func:`resolve_borders`, with their merging scores and ``tile``.

    Returns ``(pool, keep)``: the fields of the kept candidates plus ``tile``, and (N,) bool ``keep``.
    """
    keep, scores = resolve_borders(candidates, tile, windows, image_size, **border_args)
    pool = {k: v[keep] for k, v in _check_candidates(candidates, "candidates").items()}
    pool["scores"] = scores[keep]
    pool["tile"] = tile[keep]
    return pool, keep


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
    pool, _ = _border_pool(candidates, tile, windows, image_size, dict(border=border, **border_args))
    det = _postprocess(pool, method, params or {})
    return det if max_detections is None else {k: v[:max_detections] for k, v in det.items()}


def _empty() -> dict[str, Tensor]:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}


def _cat(parts: list[dict[str, Tensor]], like: dict[str, Tensor]) -> dict[str, Tensor]:
    if not parts:
        return {k: v[:0] for k, v in like.items()}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _top(dets: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    order = torch.sort(dets["scores"], descending=True, stable=True).indices[:k]
    return {key: v[order] for key, v in dets.items()}


def _check_method(method: str, params: Optional[Mapping]) -> dict:
    """The method's keyword arguments as a dict, once the method name and their type are checked."""
    from ..postprocess import METHODS

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of the method's keyword arguments, got {type(params).__name__}")
    return dict(params or {})


def _dry_run(windows: Tensor, image_size: tuple[int, int], method: str, params: dict,
             border_args: Mapping[str, Any]) -> None:
    """Check the border arguments and the method's keywords on no boxes, before any tile is run."""
    empty = _empty()
    resolve_borders(empty, torch.zeros(0, dtype=torch.int64), windows, image_size, **border_args)
    try:
        _postprocess(dict(empty, quality=torch.zeros(0), variances=torch.zeros(0, 4)), method, params)
    except TypeError as e:
        raise ValueError(f"params: {e}") from None


def _row_schedule(y1: list[int]) -> tuple[list[Optional[float]], int]:
    """When rows end, from the tiles' tops ``y1`` in grid order.

    Returns ``(row_end, step)``: after tile i, the top of the next row when tile i ends its row
    (``math.inf`` after the last tile), else None; and the largest step between two rows.
    """
    rows = sorted(set(y1))
    step = max((b - a for a, b in zip(rows, rows[1:])), default=0)
    row_end: list[Optional[float]] = [
        (None if i + 1 < len(y1) and y1[i + 1] == y1[i] else (float(y1[i + 1]) if i + 1 < len(y1) else math.inf))
        for i in range(len(y1))
    ]
    if any(b < a for a, b in zip(y1, y1[1:])):
        raise ValueError("windows must be sorted by row (increasing y1), as tile_grid returns them")
    return row_end, step


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
        self.windows = _check_windows(windows).to(torch.int64)
        self.image_size = _check_image_size(image_size)
        self.method, self.params = method, _check_method(method, params)
        self.border_args = dict(border=border, margin=margin, cover=cover, score_ratio=score_ratio,
                                cut_weight=cut_weight)
        _dry_run(self.windows, self.image_size, method, self.params, self.border_args)
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
        self._row_end, step = _row_schedule(self.windows[:, 1].tolist())
        self._retain = 2 * self.context + tile_h + step
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
            pool, keep = _border_pool(fields, buf["tile"], self.windows, self.image_size, self.border_args)
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
            return dict(_empty(), tile=torch.zeros(0, dtype=torch.int64))
        like = {k: torch.zeros((0, 4) if k in ("boxes", "variances") else (0,),
                               dtype=torch.int64 if k == "labels" else torch.float32) for k in self._keys}
        like["tile"] = torch.zeros(0, dtype=torch.int64)
        return _top(_cat(self._out, like), self.max_detections)
