"""CSV files of boxes: DeepForest's columns, read by name, and the schema locconf writes.

Reading. Columns are found by name (case and surrounding spaces ignored), never by position, so
both orders found in the wild (``xmin, ymin, xmax, ymax`` and ``xmin, xmax, ymin, ymax``) read the
same:

* ``xmin``, ``ymin``, ``xmax``, ``ymax`` (required): the box in pixels of its image;
* ``image_path`` (a string key, mapped to an image id by :class:`locconf.io.keys.ImageKeys`), or
  ``image_id`` (integers); neither: the file holds one image;
* ``label``: a category name or an integer (DeepForest's ``0`` included; see
  :class:`locconf.io.keys.Categories`); missing: every box is ``default_label`` (``"Tree"``, as
  DeepForest assumes for shapefiles without one);
* ``score`` or DeepForest's ``scores`` (required for detections, ignored in ground truth);
* ``quality`` and ``var_x1, var_y1, var_x2, var_y2`` (optional: the predicted IoU and the variance
  of each coordinate in pixels², as locconf's detectors predict them);
* ``geometry`` (DeepForest's WKT of the same box) is dropped: it is derived from the box. Every
  other column is kept, as text, and written back beside the detections.

A row whose four coordinates are all 0 (DeepForest's mark of an image without objects) gives its
image and no box. Errors name the file, the line and the column.

Writing: :data:`COLUMNS`, pixel coordinates, numbers written in full (``repr``), so that a file
written here reads back to the same floats.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .rows import BoxRow

__all__ = ["COLUMNS", "SIGNAL_COLUMNS", "read_csv", "format_number"]

#: The columns locconf writes, in order (``quality`` and the variances where predicted).
COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label", "score")
#: The optional signal columns, in order.
SIGNAL_COLUMNS = ("quality", "var_x1", "var_y1", "var_x2", "var_y2")

_BOX = ("xmin", "ymin", "xmax", "ymax")
_VAR = SIGNAL_COLUMNS[1:]
_DROPPED = ("geometry",)
_KNOWN = {"image_path", "image_id", *_BOX, "label", "score", "scores", *SIGNAL_COLUMNS, *_DROPPED}


def format_number(v: float) -> str:
    """A float written in full (shortest text that reads back to the same float)."""
    return repr(float(v))


def _columns(path: Path, header: Sequence[str]) -> dict[str, int]:
    cols: dict[str, int] = {}
    for i, name in enumerate(header):
        key = name.strip().lower()
        if key in _KNOWN and key in cols:
            raise ValueError(f"{path}: column {key!r} appears twice in the header")
        if key in _KNOWN:
            cols[key] = i
    missing = [c for c in _BOX if c not in cols]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(repr(c) for c in missing)} in the header {list(header)}; a CSV of "
                         "boxes needs xmin, ymin, xmax, ymax (in any order) and optionally image_path, label, score")
    if "score" in cols and "scores" in cols:
        raise ValueError(f"{path}: both 'score' and 'scores' columns; keep one")
    if "image_path" in cols and "image_id" in cols:
        raise ValueError(f"{path}: both 'image_path' and 'image_id' columns; keep one")
    var = [c for c in _VAR if c in cols]
    if var and len(var) != 4:
        raise ValueError(f"{path}: variance columns {var} without {[c for c in _VAR if c not in cols]}: "
                         "give all of var_x1, var_y1, var_x2, var_y2 or none")
    return cols


def _number(text: str, where: str, column: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: column {column!r} must be finite (no NaN or inf), got {text!r}")
    return v


def read_csv(path: str | os.PathLike, need_score: bool, default_label: str = "Tree") -> list[BoxRow]:
    """Every row of a CSV of boxes (see the module docstring), checked.

    Args:
        need_score: detections (a ``score`` / ``scores`` column is required) or ground truth.
        default_label: the label of every row when there is no ``label`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _read_rows(path, csv.reader(f), need_score, default_label)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save the CSV as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a valid CSV file ({e})") from None


def _read_rows(path: Path, reader: Iterable[list[str]], need_score: bool, default_label: str) -> list[BoxRow]:
    it = iter(reader)
    header = next(it, None)
    if header is None:
        raise ValueError(f"{path}: empty file (a CSV of boxes needs a header: {', '.join(COLUMNS)})")
    cols = _columns(path, header)
    score_col = "score" if "score" in cols else "scores" if "scores" in cols else None
    if need_score and score_col is None:
        raise ValueError(f"{path}: no 'score' (or 'scores') column in the header {header}: detections need a score")
    extras = [(i, name) for i, name in enumerate(header) if name.strip().lower() not in _KNOWN and name.strip()]
    key_col = "image_path" if "image_path" in cols else "image_id" if "image_id" in cols else None
    rows = []
    for line, values in enumerate(it, start=2):
        if not values or not any(v.strip() for v in values):
            continue
        where = f"{path}: line {line}"
        if len(values) != len(header):
            raise ValueError(f"{where}: {len(values)} values for the {len(header)} columns of the header")
        box = [_number(values[cols[c]], where, c) for c in _BOX]
        key: Any = None
        if key_col == "image_path":
            key = values[cols["image_path"]]
            if not key.strip():
                raise ValueError(f"{where}: empty 'image_path'")
        elif key_col == "image_id":
            text = values[cols["image_id"]].strip()
            if not text.lstrip("+-").isdigit():
                raise ValueError(f"{where}: 'image_id' must be an integer, got {text!r}")
            key = int(text)
        label = values[cols["label"]].strip() if "label" in cols else default_label
        if box == [0.0, 0.0, 0.0, 0.0]:  # DeepForest's row for an image without objects
            rows.append(BoxRow(where, line, key, None, label))
            continue
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: the box has xmax < xmin or ymax < ymin: {dict(zip(_BOX, box))}")
        if "label" in cols and not label:
            raise ValueError(f"{where}: empty 'label'")
        row = BoxRow(where, line, key, box, label, extra={name: values[i] for i, name in extras})
        if score_col is not None and (need_score or values[cols[score_col]].strip()):
            row.score = _number(values[cols[score_col]], where, score_col)
        if "quality" in cols:
            row.quality = _number(values[cols["quality"]], where, "quality")
        if "var_x1" in cols:
            row.variance = [_number(values[cols[c]], where, c) for c in _VAR]
            if min(row.variance) <= 0:
                raise ValueError(f"{where}: variances must be positive, got {row.variance}")
        rows.append(row)
    return rows
