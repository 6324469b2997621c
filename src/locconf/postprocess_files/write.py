"""Writing detections: COCO result records, streamed into a temporary file renamed at the end.

Each image's detections are written at once, images by increasing id, detections by decreasing
score, as a JSON array (or JSON Lines when the output name ends in ``.jsonl`` / ``.ndjson``).
Output records keep the kept candidate's ``quality`` / ``variance``; their ``bbox`` is the
input's unchanged unless the method moves boxes (variance voting, fusion). The output is written to
a temporary file in the output's folder (``.<name>.tmp.<pid>``, :func:`locconf.files.temp_path`) and
renamed only once everything succeeded; on any error or interruption the temporary file is deleted
and an existing output is left untouched; one left by a SIGKILL is removed by the next write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..files import remove_stale_temp_files, temp_path

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class _AtomicWriter:
    """Write records as a JSON array (or JSON Lines) to a temporary file; rename on success only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.jsonl = self.path.suffix.lower() in _JSONL_SUFFIXES
        self.count = 0

    def __enter__(self) -> "_AtomicWriter":
        folder = self.path.parent
        if not folder.is_dir():
            raise ValueError(f"output folder {folder} does not exist")
        if self.path.is_dir():
            raise IsADirectoryError(f"output {self.path} is a folder: give a file name")
        remove_stale_temp_files(self.path)  # left by a run killed with SIGKILL
        # This process's name (locconf.files.temp_path), opened exclusively (not mkstemp, whose 0600 mode
        # the renamed output would keep).
        self._tmp = temp_path(self.path)
        try:
            self._f = open(self._tmp, "w", encoding="utf-8")
            if not self.jsonl:
                self._f.write("[")
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            raise type(e)(e.errno, f"cannot write {self.path}: {e.strerror}") from None
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return self

    def write(self, record: dict) -> None:
        text = json.dumps(record, allow_nan=False)
        if self.jsonl:
            self._f.write(text + "\n")
        else:
            self._f.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.jsonl:
                self._f.write("\n]\n" if self.count else "]\n")
            self._f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def _record(image_id: int, category_id: int, bbox: list, score: float, quality: Optional[Tensor],
            variances: Optional[Tensor], i: int) -> dict:
    rec = {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
    if quality is not None:
        rec["quality"] = float(quality[i])
    if variances is not None:
        rec["variance"] = variances[i].tolist()
    return rec


def _records(image_id: int, det: dict, bbox: Optional[list] = None) -> list[dict]:
    """COCO result records of one image's detections (``bbox``: the input lists, where unchanged)."""
    n = det["scores"].shape[0]
    if n == 0:
        return []
    if bbox is None:
        b = det["boxes"].to(torch.float64)
        boxes = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
    else:
        boxes = [bbox[r] for r in det["row"].tolist()]
    scores, cats = det["scores"].tolist(), det["category"].tolist()
    q, v = det.get("quality"), det.get("variances")
    return [_record(image_id, cats[i], boxes[i], scores[i], q, v, i) for i in range(n)]
