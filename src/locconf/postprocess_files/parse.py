"""One image's COCO result records, checked, as candidate tensors.

Keys other than :data:`KNOWN_KEYS` (``segmentation``, ``keypoints``, custom ids, extra CSV
columns) are not read: they are handed on with the record (``extra``), for the output.

Errors: a bad record (not an object, a missing key, a wrong type, a negative width or height, NaN
or inf, a non-positive variance, an image or category id that the ground truth lacks) raises a
``ValueError`` naming the file, the record's index (0-based, in file order; JSON Lines also give
the line) and the key. Within a file, every record carries ``quality`` (and ``variance``) or none
does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

#: ``where(index, line)``: "file: record i (line l)", the start of an error message.
Where = Callable[[int, Optional[int]], str]

#: The record keys locconf reads; any other key of a record rides along to the output.
KNOWN_KEYS = frozenset(("image_id", "image_path", "category_id", "bbox", "score", "quality", "variance"))

_INT64 = 2**63


def _is_int(v: Any) -> bool:
    """An integer that fits in int64 (bools are not integers here)."""
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64


def _is_num(v: Any) -> bool:
    """A JSON number that float64 holds (an integer beyond ~1.8e308 is not)."""
    if isinstance(v, float):
        return True
    if not isinstance(v, int) or isinstance(v, bool):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


class _Where:
    """Formats "file: record i (line l)" only when an error message needs it."""

    __slots__ = ("where", "index", "line")

    def __init__(self, where: Where, index: int, line: Optional[int]):
        self.where, self.index, self.line = where, index, line

    def __format__(self, spec: str) -> str:
        return self.where(self.index, self.line)


def _check_record(rec: dict, w: _Where, has_quality: bool, has_variance: bool,
                  known_categories: Optional[set]) -> None:
    """Check the keys and the types of one record (``w`` names it); the values are checked as tensors."""
    for key in ("category_id", "bbox", "score"):
        if key not in rec:
            raise ValueError(f"{w}: missing key {key!r}")
    cat, bbox, score = rec["category_id"], rec["bbox"], rec["score"]
    if not _is_int(cat):
        raise ValueError(f"{w}: 'category_id' must be a 64-bit integer, got {cat!r}")
    if known_categories is not None and cat not in known_categories:
        raise ValueError(f"{w}: 'category_id' {cat} is not a category of the ground truth")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
        raise ValueError(f"{w}: 'bbox' must be a list of 4 numbers [x, y, w, h], got {bbox!r:.200}")
    if not _is_num(score):
        raise ValueError(f"{w}: 'score' must be a number, got {score!r}")
    for key, has in (("quality", has_quality), ("variance", has_variance)):
        if (key in rec) != has:
            first = "has" if has else "has no"
            raise ValueError(f"{w}: {'missing' if has else 'unexpected'} key {key!r}: the file's first "
                             f"record {first} {key!r}, and a file's records must all carry it or none")
        if not has:
            continue
        v = rec[key]
        if key == "quality" and not _is_num(v):
            raise ValueError(f"{w}: 'quality' must be a number, got {v!r}")
        if key == "variance" and (not isinstance(v, list) or len(v) != 4 or not all(_is_num(x) for x in v)):
            raise ValueError(f"{w}: 'variance' must be a list of 4 numbers (x1, y1, x2, y2), got {v!r:.200}")


def _check_values(cand: dict[str, Tensor], xywh: Tensor, boxes: list, recs: list, where: Where) -> None:
    """Raise for the first record whose values are not finite (or whose box has a negative size)."""
    bad = {"bbox": ~torch.isfinite(xywh).all(1), "score": ~torch.isfinite(cand["scores"])}
    size_bad = (xywh[:, 2:] < 0).any(1)
    if "quality" in cand:
        bad["quality"] = ~torch.isfinite(cand["quality"])
    if "variances" in cand:
        bad["variance"] = ~(torch.isfinite(cand["variances"]) & (cand["variances"] > 0)).all(1)
    for key, mask in bad.items():
        if bool(mask.any()):
            i = int(mask.nonzero()[0])
            what = "finite and positive" if key == "variance" else "finite (no NaN or inf)"
            raise ValueError(f"{where(*recs[i][:2])}: {key!r} must be {what}")
    if bool(size_bad.any()):
        i = int(size_bad.nonzero()[0])
        raise ValueError(f"{where(*recs[i][:2])}: 'bbox' has a negative width or height: {boxes[i]}")


def image_candidates(recs: list[tuple[int, Optional[int], dict]], where: Where, has_quality: bool,
                     has_variance: bool, known_categories: Optional[set] = None) -> dict:
    """One image's records ``(index, line or None, record)`` as checked candidate tensors.

    Returns the fields of :class:`locconf.candidates.Candidates` (float64 ``boxes`` (N, 4) xyxy,
    ``scores`` (N,), ``quality`` (N,) / ``variances`` (N, 4) when the file has them) with
    ``category`` (N,) int64, the COCO category ids, in place of ``labels``; and ``bbox``: the
    records' ``bbox`` lists, and ``extra``: each record's other keys (a list of dicts; None when no
    record has any).
    """
    n = len(recs)
    boxes, scores, cats, quality, variances = [], [], [], [], []
    for index, line, rec in recs:
        _check_record(rec, _Where(where, index, line), has_quality, has_variance, known_categories)
        if has_quality:
            quality.append(rec["quality"])
        if has_variance:
            variances.append(rec["variance"])
        boxes.append(rec["bbox"])
        scores.append(rec["score"])
        cats.append(rec["category_id"])
    f64 = torch.float64
    xywh = torch.tensor(boxes, dtype=f64).reshape(n, 4)
    cand = {"scores": torch.tensor(scores, dtype=f64).reshape(n),
            "category": torch.tensor(cats, dtype=torch.int64).reshape(n)}
    if has_quality:
        cand["quality"] = torch.tensor(quality, dtype=f64).reshape(n)
    if has_variance:
        cand["variances"] = torch.tensor(variances, dtype=f64).reshape(n, 4)
    _check_values(cand, xywh, boxes, recs, where)
    cand["boxes"] = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    cand["bbox"] = boxes
    extra = [{k: v for k, v in rec.items() if k not in KNOWN_KEYS} for _, _, rec in recs]
    cand["extra"] = extra if any(extra) else None
    return cand
