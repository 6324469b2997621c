"""The tile grid and a tile's geometry: windows, shifting candidates to the image, cut sides.

Tiles of ``tile_size`` pixels start every ``tile_size - overlap`` pixels; the last row and column
are pushed back to end exactly at the image's edge (the convention of the NEON training tiles,
:func:`locconf.data.neon.tile_starts`), so every tile has the full size unless the image is smaller
than a tile in that direction (one tile then spans it). Tiles are numbered row by row (rows by
increasing ``y1``, tiles of a row by increasing ``x1``).

A tile's *interior* edges are those that are not an edge of the image. A candidate is **cut** on a
side when its box comes within ``margin`` pixels of an interior edge of its tile on that side (the
object may continue in the neighbouring tile; candidates are first clipped to their tile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..boxes import check_boxes
from .checks import _check_candidates, _check_image_size, _check_int, _is_int, _is_num


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
    from ..data.neon import tile_starts

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
