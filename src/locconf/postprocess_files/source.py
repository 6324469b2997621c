"""Reading a candidates file: indexed by image, read back one image at a time.

Input, in any format of :mod:`locconf.io` (told by the extension, or ``format``):

* COCO results, the format MMDetection, detectron2 and ultralytics export, one record per
  candidate box::

    {"image_id": 42, "category_id": 3, "bbox": [x, y, w, h], "score": 0.83,
     "quality": 0.71,                       # optional: predicted IoU
     "variance": [vx1, vy1, vx2, vy2]}      # optional: predicted sigma^2 of x1, y1, x2, y2 (pixels^2)

  either as one JSON array (loaded whole: its size bounds the memory) or as JSON Lines, one record
  per line (streamed). Array or lines is told by the first non-blank character (``[`` or ``{``),
  not by the file name. ``image_id`` may also be a string (a path), and a record may name its
  image by ``image_path`` instead;
* CSV (DeepForest's columns) and GeoJSON / GeoPackage / shapefile: converted to COCO result
  records as they are read (:func:`locconf.io.detection_records`; loaded whole).

Within a file, every record carries ``quality`` (and ``variance``) or none does. Image keys (ids or
paths) and labels go through the run's one mapping (:mod:`locconf.io.keys`), shared with the
ground truth and the other inputs. Record keys that locconf does not read (``segmentation``,
``keypoints``, custom ids, extra CSV columns) ride along (:data:`KNOWN_KEYS`).

JSON Lines files are grouped by image with an external two-pass grouping, so records may come in
any order: a first pass parses each line for its image and keeps, per run of consecutive
records of one image, only the run's byte offset, first record index and length (three integers);
the second pass sorts the runs by image id and reads each image's records back by seeking to its
runs. A file whose records are grouped by image (as detectors write them) has one run per image,
so memory is bounded by the number of images plus one image's records, whatever the number of
records; a file in random order needs one run per record (24 bytes each).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..io import format_of
from ..io.keys import Categories, ImageKeys
from .parse import KNOWN_KEYS, _Where, image_candidates


class _Source:
    """One candidates file, indexed by image (the first pass); :meth:`records` reads one image back.

    Args:
        path: the file. keys, categories: the run's mappings of image keys and labels (fresh ones
            by default). format: its format (default: by extension). images: image files and
            folders, for the rasters of a vector file in map coordinates.

    Attributes:
        image_ids: sorted image ids. num_records: records in the file.
        has_quality, has_variance: whether the file's first record carries them.
        extra_keys: the keys of its records that locconf does not read, in order of appearance.
    """

    def __init__(self, path: str | os.PathLike, keys: Optional[ImageKeys] = None,
                 categories: Optional[Categories] = None, format: Optional[str] = None, images: Any = None):
        self.path = Path(path)
        self.format = format_of(self.path, format)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such file")
        self.keys = keys if keys is not None else ImageKeys()
        self.categories = categories if categories is not None else Categories()
        self._file = None
        self._line_numbers: Optional[list] = None
        self.has_quality = self.has_variance = False
        self.extra_keys: dict[str, None] = {}
        if self.format not in ("json", "jsonl"):
            self._index_converted(images)
            return
        with open(self.path, "rb") as f:
            first = b""
            while not first:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                first = chunk.lstrip()[:1]
        if first == b"[":
            self.jsonl = False
            self._index_array()
        elif first in (b"{", b""):
            self.jsonl = True
            self._index_lines()
        else:
            raise ValueError(f"{self.path}: neither a JSON array nor JSON Lines of objects "
                             f"(starts with {first.decode(errors='replace')!r})")

    def _where(self, index: int, line: Optional[int] = None) -> str:
        return f"{self.path}: record {index}" + (f" (line {line})" if line is not None else "")

    def _first_record(self, rec: dict) -> None:
        self.has_quality, self.has_variance = "quality" in rec, "variance" in rec

    def _image_id(self, rec: Any, index: int, line: Optional[int] = None) -> int:
        """The image id of a record: its ``image_path`` (a string) if it has one, else its
        ``image_id`` (an integer or a string), through the run's mapping."""
        where = _Where(self._where, index, line)  # formatted only in an error message
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: must be a JSON object, got {type(rec).__name__}")
        if isinstance(rec.get("image_path"), str):
            key = rec["image_path"]
        elif "image_id" in rec:
            key = rec["image_id"]
            if isinstance(key, bool) or not isinstance(key, (int, str)) or (
                    isinstance(key, int) and not -2**63 <= key < 2**63):
                raise ValueError(f"{where}: 'image_id' must be a 64-bit integer or a string (a path), got {key!r}")
        else:
            raise ValueError(f"{where}: missing key 'image_id'")
        image_id = self.keys.id(key, where)
        if index == 0:
            self._first_record(rec)
        for k in rec:
            if k not in KNOWN_KEYS and k not in self.extra_keys:
                self.extra_keys[k] = None
        return image_id

    # -- CSV and vector files: converted to COCO records, held whole ---------------------------

    def _index_converted(self, images: Any) -> None:
        from ..io import detection_records

        converted = detection_records(self.path, self.format, self.keys, self.categories, images=images)
        self.jsonl = False
        self._data = [rec for _, rec in converted]
        self._line_numbers = [line for line, _ in converted] if self.format == "csv" else None
        self._group(self._data)

    # -- JSON array: loaded whole -------------------------------------------------------------

    def _index_array(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: a JSON file must hold a list of records, got {type(data).__name__}")
        self._data = data
        self._group(data)

    def _group(self, data: list) -> None:
        groups: dict[int, list[int]] = {}
        for i, rec in enumerate(data):
            line = self._line_numbers[i] if self._line_numbers is not None else None
            groups.setdefault(self._image_id(rec, i, line), []).append(i)
        self._groups = groups
        self.image_ids = sorted(groups)
        self.num_records = len(data)

    # -- JSON Lines: two passes ----------------------------------------------------------------

    def _lines(self, f) -> Iterator[tuple[int, bytes]]:
        """(offset, line) of every line from the current position."""
        while True:
            offset = f.tell()
            line = f.readline()
            if not line:
                return
            yield offset, line

    def _loads(self, line: bytes, index: int, line_no: int) -> Any:
        try:
            return json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self._where(index, line_no)}: not valid JSON ({e})") from None

    def _index_lines(self) -> None:
        ids, offsets, firsts, lines, counts = (array("q") for _ in range(5))
        index = 0
        with open(self.path, "rb") as f:
            for line_no, (offset, line) in enumerate(self._lines(f), start=1):
                if not line.strip():
                    continue
                image_id = self._image_id(self._loads(line, index, line_no), index, line_no)
                if counts and ids[-1] == image_id:
                    counts[-1] += 1
                else:
                    for arr, v in zip((ids, offsets, firsts, lines, counts), (image_id, offset, index, line_no, 1)):
                        arr.append(v)
                index += 1
        self.num_records = index
        ids_np = np.frombuffer(ids, dtype=np.int64) if len(ids) else np.zeros(0, np.int64)
        order = np.argsort(ids_np, kind="stable")
        self._runs = [np.frombuffer(a, dtype=np.int64)[order] if len(a) else np.zeros(0, np.int64)
                      for a in (offsets, firsts, lines, counts)]
        sorted_ids = ids_np[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if sorted_ids.size else sorted_ids
        self.image_ids = sorted_ids[starts].tolist()
        self._run_bounds = dict(zip(self.image_ids, zip(starts.tolist(), np.r_[starts[1:], sorted_ids.size].tolist())))

    def records(self, image_id: int) -> list[tuple[int, Optional[int], dict]]:
        """``(index, line or None, record)`` of every record of ``image_id``, in file order (none: [])."""
        if not self.jsonl:
            lines = self._line_numbers
            return [(i, lines[i] if lines is not None else None, self._data[i]) for i in self._groups.get(image_id, ())]
        if image_id not in self._run_bounds:
            return []
        if self._file is None:
            self._file = open(self.path, "rb")
        lo, hi = self._run_bounds[image_id]
        out = []
        for offset, index, line_no, count in zip(*(a[lo:hi].tolist() for a in self._runs)):
            self._file.seek(offset)
            while count:
                line = self._file.readline()
                if line.strip():
                    out.append((index, line_no, self._loads(line, index, line_no)))
                    index += 1
                    count -= 1
                line_no += 1
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- One image's candidates ----------------------------------------------------------------


    def candidates(self, image_id: int, known_categories: Optional[set] = None) -> dict:
        """One image's records as checked candidate tensors (float64 boxes xyxy, int64 categories).

        The fields of :class:`locconf.candidates.Candidates` (``boxes`` (N, 4), ``scores`` (N,),
        ``quality`` (N,) / ``variances`` (N, 4) when the file has them) with ``category`` (N,), the
        COCO category ids, in place of ``labels``; and ``bbox``: the records' ``bbox`` lists
        (:func:`locconf.postprocess_files.parse.image_candidates` checks them).
        """
        return image_candidates(self.records(image_id), self._where, self.has_quality, self.has_variance,
                                known_categories)
