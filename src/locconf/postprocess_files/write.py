"""Writing detections: result records, streamed into a temporary file renamed at the end.

Each image's detections are written at once, images by increasing id, detections by decreasing
score. The output's format is told by its extension, or ``out_format`` (:mod:`locconf.io.formats`):

* COCO results: a JSON array (``.json``) or JSON Lines (``.jsonl`` / ``.ndjson``); ``image_id`` is
  the integer id, and records of an image that the input named by a string also carry it as
  ``image_path``;
* CSV: locconf's columns (:data:`locconf.io.csvfile.COLUMNS`: ``image_path`` (``image_id`` when
  the images have no names), ``xmin, ymin, xmax, ymax, label, score``, then ``quality``,
  ``var_x1 .. var_y2`` where the input has them), then the input's other fields;
* GeoJSON / GeoPackage / shapefile: the boxes as polygons, in the map coordinates of each image's
  raster when it is found among ``images`` (all in one CRS), else in pixels; fields as the CSV's.

Output records keep the kept candidate's ``quality`` / ``variance`` and every field of the input
record that locconf does not read (``segmentation``, ``keypoints``, custom ids, extra CSV
columns: in CSV and vector files as text, JSON for lists and objects); their ``bbox`` is the
input's unchanged unless the method moves boxes (variance voting, fusion). Fused detections merge
several records and carry no such fields. The output is written to a temporary file in the
output's folder (``.<name>.tmp.<pid>``, :func:`locconf.files.temp_path`) and renamed only once
everything succeeded; on any error or interruption the temporary file is deleted and an existing
output is left untouched; one left by a SIGKILL is removed by the next write.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..files import remove_stale_temp_files, temp_path
from ..io import VECTOR_FORMATS, format_of
from ..io.csvfile import format_number
from ..io.keys import Categories, ImageFinder, ImageKeys

logger = logging.getLogger(__name__)

_BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
_VAR_COLUMNS = ("var_x1", "var_y1", "var_x2", "var_y2")


class _AtomicWriter:
    """Write COCO result records as a JSON array (or JSON Lines) to a temporary file; rename on success only.

    ``keys``: where given, records of an image known by a string get ``image_path``.
    """

    def __init__(self, path: str | os.PathLike, jsonl: Optional[bool] = None, keys: Optional[ImageKeys] = None):
        self.path = Path(path)
        self.jsonl = format_of(self.path, None) == "jsonl" if jsonl is None else jsonl
        self.keys = keys
        self.count = 0

    def _open(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            raise ValueError(f"output folder {folder} does not exist")
        if self.path.is_dir():
            raise IsADirectoryError(f"output {self.path} is a folder: give a file name")
        remove_stale_temp_files(self.path)  # left by a run killed with SIGKILL
        # This process's name (locconf.files.temp_path), not mkstemp's, whose 0600 mode the renamed
        # output would keep.
        self._tmp = temp_path(self.path)
        try:
            self._f = open(self._tmp, "w", encoding="utf-8", newline="")
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise type(e)(e.errno, f"cannot write {self.path}: {e.strerror}") from None
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def __enter__(self) -> "_AtomicWriter":
        self._open()
        try:
            if not self.jsonl:
                self._f.write("[")
        except BaseException:
            self._f.close()
            self._tmp.unlink(missing_ok=True)
            raise
        return self

    def write(self, record: dict) -> None:
        if self.keys is not None and "image_path" not in record:
            name = self.keys.string_key(record["image_id"])
            if name is not None:
                record = {**record, "image_path": name}
        text = json.dumps(record, allow_nan=False)
        if self.jsonl:
            self._f.write(text + "\n")
        else:
            self._f.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def _finish(self) -> None:
        if not self.jsonl:
            self._f.write("\n]\n" if self.count else "]\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
            self._f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def _text(v: Any) -> str:
    """A field value as CSV / vector text: strings as they are, numbers in full, lists and objects as JSON."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return format_number(v)
    if isinstance(v, (bool, int)):
        return json.dumps(v)
    return json.dumps(v, allow_nan=False)


class _Rows:
    """What CSV and vector outputs share: the columns, and each record as the values of a row."""

    def __init__(self, keys: ImageKeys, categories: Categories, image_ids: Sequence[int], quality: bool,
                 variance: bool, extra_keys: Sequence[str]):
        self.keys, self.categories = keys, categories
        self.named = bool(image_ids) and all(keys.name(i) is not None for i in image_ids)
        self.quality, self.variance = quality, variance
        self.extra_keys = [k for k in extra_keys if k not in ("image_path", "image_id")]

    def header(self) -> list[str]:
        return ([("image_path" if self.named else "image_id"), *_BOX_COLUMNS, "label", "score"]
                + (["quality"] if self.quality else []) + (list(_VAR_COLUMNS) if self.variance else [])
                + self.extra_keys)

    def values(self, rec: dict) -> list[Any]:
        x, y, w, h = rec["bbox"]
        image = self.keys.name(rec["image_id"]) if self.named else rec["image_id"]
        out = [image, x, y, x + w, y + h, self.categories.name(rec["category_id"]), rec["score"]]
        if self.quality:
            out.append(rec.get("quality"))
        if self.variance:
            out += list(rec.get("variance") or [None] * 4)
        return out + [rec.get(k) for k in self.extra_keys]


class _CsvWriter(_AtomicWriter):
    """Detections as CSV rows (locconf's columns, then the input's other fields)."""

    def __init__(self, path: str | os.PathLike, rows: _Rows):
        super().__init__(path, jsonl=False)
        self.rows = rows

    def __enter__(self) -> "_CsvWriter":
        self._open()
        self._csv = csv.writer(self._f)
        self._csv.writerow(self.rows.header())
        return self

    def write(self, record: dict) -> None:
        self._csv.writerow([_text(v) for v in self.rows.values(record)])
        self.count += 1

    def _finish(self) -> None:
        pass


class _VectorWriter:
    """Detections as polygons (GeoJSON, GeoPackage, shapefile), written when all are collected."""

    def __init__(self, path: str | os.PathLike, fmt: str, rows: _Rows, finder: ImageFinder):
        self.path, self.fmt, self.rows, self.finder = Path(path), fmt, rows, finder
        self.count = 0
        self._records: list[dict] = []
        if not self.path.parent.is_dir():
            raise ValueError(f"output folder {self.path.parent} does not exist")

    def __enter__(self) -> "_VectorWriter":
        from ..io.geo import require

        require("shapely", "pyogrio", why=f"writing {self.path}")
        return self

    def write(self, record: dict) -> None:
        self._records.append(record)
        self.count += 1

    def _rasters(self, image_ids: list[int]) -> tuple[dict, Any]:
        """Each image's geotransform (where its raster is found), and their one CRS."""
        from ..io.geo import raster_info, same_crs

        infos = {}
        for image_id in image_ids:
            file = self.finder.find(self.rows.keys.name(image_id))
            if file is not None:
                info = raster_info(file)
                if info.transform is not None:
                    infos[image_id] = info
        if infos and len(infos) < len(image_ids):
            lost = next(i for i in image_ids if i not in infos)
            raise ValueError(f"{self.path}: the georeferenced raster of image {self.rows.keys.name(lost) or lost!r} is "
                             "not among the images given: vector output puts every image in map coordinates or none")
        crs = next(iter(infos.values())).crs if infos else None
        for info in infos.values():
            if (info.crs is None) != (crs is None) or (crs is not None and not same_crs(info.crs, crs)):
                raise ValueError(f"{self.path}: the images are in different CRSs ({crs} and {info.crs}); one vector file "
                                 "holds one CRS: write CSV or COCO, or one file per CRS")
        if not infos:
            logger.info("%s: no georeferenced raster found for the images (give them with images / --images): "
                        "polygons are written in pixel coordinates", self.path)
        return infos, crs

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        import numpy as np

        from ..io.geo import box_polygons, write_vector

        recs = self._records
        image_ids = sorted({r["image_id"] for r in recs})
        infos, crs = self._rasters(image_ids)
        header = self.rows.header()
        columns = list(zip(*[self.rows.values(r) for r in recs])) if recs else [[] for _ in header]
        fields: dict[str, np.ndarray] = {}
        for name, values in zip(header, columns):
            if name in _BOX_COLUMNS:
                continue
            fields[name] = _field_array(list(values))
        boxes = np.array([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                          for r in recs], dtype=np.float64).reshape(-1, 4)
        geoms = np.empty(len(recs), dtype=object)
        ids = np.array([r["image_id"] for r in recs], dtype=np.int64)
        for image_id in image_ids:
            idx = np.flatnonzero(ids == image_id)
            info = infos.get(image_id)
            geoms[idx] = box_polygons(boxes[idx], info.transform if info is not None else None)
        write_vector(self.path, self.fmt, geoms, fields, crs)


def _field_array(values: list) -> Any:
    """One field's values as a typed array: int64 or float64 where every value is one, else text."""
    import numpy as np

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.array(values, dtype=np.int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array([_text(v) for v in values], dtype=object)


def open_writer(path: str | os.PathLike, out_format: Optional[str], keys: ImageKeys, categories: Categories,
                image_ids: Sequence[int], quality: bool, variance: bool, extra_keys: Sequence[str],
                images: Any = None, base: Optional[Path] = None):
    """The writer of ``path`` in its format (``out_format``, else by extension): a context manager
    with ``write(record)`` and ``count``. ``images`` (and the folder ``base``) hold the rasters of
    a vector output."""
    fmt = format_of(path, out_format, "out_format")
    if fmt in ("json", "jsonl"):
        return _AtomicWriter(path, jsonl=fmt == "jsonl", keys=keys)
    rows = _Rows(keys, categories, image_ids, quality, variance, extra_keys)
    if fmt == "csv":
        return _CsvWriter(path, rows)
    assert fmt in VECTOR_FORMATS
    return _VectorWriter(path, fmt, rows, ImageFinder(images, base=base))


def _record(image_id: int, category_id: int, bbox: list, score: float, quality: Optional[Tensor],
            variances: Optional[Tensor], i: int, extra: Optional[dict] = None) -> dict:
    rec = {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
    if quality is not None:
        rec["quality"] = float(quality[i])
    if variances is not None:
        rec["variance"] = variances[i].tolist()
    if extra:
        for k, v in extra.items():
            rec.setdefault(k, v)
    return rec


def _records(image_id: int, det: dict, bbox: Optional[list] = None, extra: Optional[list] = None) -> list[dict]:
    """Result records of one image's detections (``bbox``: the input lists, where unchanged;
    ``extra``: the input records' other fields, by input row)."""
    n = det["scores"].shape[0]
    if n == 0:
        return []
    if bbox is None:
        b = det["boxes"].to(torch.float64)
        boxes = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
    else:
        boxes = [bbox[r] for r in det["row"].tolist()]
    extras = [extra[r] for r in det["row"].tolist()] if extra is not None else [None] * n
    scores, cats = det["scores"].tolist(), det["category"].tolist()
    q, v = det.get("quality"), det.get("variances")
    return [_record(image_id, cats[i], boxes[i], scores[i], q, v, i, extras[i]) for i in range(n)]
