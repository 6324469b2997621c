"""Rows of boxes read from CSV or vector files, turned into COCO: result records or an instances dict.

COCO stays the one representation inside locconf: a CSV or vector file becomes COCO result
records (detections) or a COCO instances dict (ground truth) as it is read, and everything after
(post-processing, fusion, scoring, training) sees COCO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .keys import Categories, ImageKeys

__all__ = ["BoxRow", "result_records", "instances"]


@dataclass
class BoxRow:
    """One box of a file: where it was read (for errors), its image key, box ``[x1, y1, x2, y2]`` in
    pixels (None: a row that marks an image without objects), label, signals and other fields."""

    where: str
    index: int
    key: Any
    box: Optional[list[float]]
    label: Any
    score: Optional[float] = None
    quality: Optional[float] = None
    variance: Optional[list[float]] = None
    extra: dict = field(default_factory=dict)


def _xywh(box: Sequence[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def result_records(rows: Sequence[BoxRow], keys: ImageKeys, categories: Categories) -> list[tuple[int, dict]]:
    """COCO result records ``(index, record)`` of the rows with a box: ``image_id`` (the key's id),
    ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``, ``quality`` / ``variance`` where the rows
    have them, ``image_path`` (a string key) and the rows' other fields."""
    boxed = [r for r in rows if r.box is not None]
    for r in rows:  # every image named, boxes or not, is known to the mapping (and checked against the ground truth)
        keys.id(r.key, r.where)
    cats = categories.ids([r.label for r in boxed], [r.where for r in boxed])
    out = []
    for r, cat in zip(boxed, cats):
        rec = {"image_id": keys.id(r.key, r.where), "category_id": cat, "bbox": _xywh(r.box), "score": r.score}
        if r.quality is not None:
            rec["quality"] = r.quality
        if r.variance is not None:
            rec["variance"] = list(r.variance)
        if isinstance(r.key, str):
            rec["image_path"] = r.key
        for k, v in r.extra.items():
            rec.setdefault(k, v)
        out.append((r.index, rec))
    return out


def _sort_key(key: Any) -> tuple:
    return (0, key, "") if isinstance(key, int) else (1, 0, "" if key is None else str(key))


def instances(rows: Sequence[BoxRow], image_record: Callable[[Any], dict], source: str,
              categories: Optional[Sequence[dict]] = None) -> dict:
    """A COCO instances dict of ground-truth rows.

    Images are the distinct keys (sorted: integer ids first, then names), numbered by their own id
    (integer keys) or 1, 2, ... (names); ``image_record(key)`` gives each one's ``file_name``,
    ``width``, ``height`` (those it knows). Categories: ``categories`` where given (labels must be
    theirs), else names numbered 1..K in sorted order and integer labels as they are
    (:class:`locconf.io.keys.Categories`). A ``site`` field of a row becomes its image's ``site``.
    Annotations keep the rows' other fields.
    """
    cats = Categories(categories)
    boxed = [r for r in rows if r.box is not None]
    cat_ids = cats.ids([r.label for r in boxed], [r.where for r in boxed])
    distinct = sorted({r.key for r in rows}, key=_sort_key)
    if any(isinstance(k, int) for k in distinct) and any(not isinstance(k, int) for k in distinct):
        raise ValueError(f"{source}: images are named both by integer ids and by paths; use one column")
    ids = {k: (k if isinstance(k, int) else n) for n, k in enumerate(distinct, start=1)}
    images = {}
    for k in distinct:
        rec = {"id": ids[k], **image_record(k)}
        images[k] = rec
    for r in rows:
        site = r.extra.get("site")
        if isinstance(site, str) and site and "site" not in images[r.key]:
            images[r.key]["site"] = site
    annotations = []
    for n, (r, cat) in enumerate(zip(boxed, cat_ids), start=1):
        x, y, w, h = _xywh(r.box)
        ann = {k: v for k, v in r.extra.items() if k not in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")}
        ann.update({"id": n, "image_id": ids[r.key], "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                    "iscrowd": 0})
        annotations.append(ann)
    categories = [{"id": i, "name": str(name)} for i, name in sorted(cats.names.items())]
    return {"images": list(images.values()), "annotations": annotations, "categories": categories}
