"""The JSONL metrics log of a training run (``metrics.jsonl`` in its ``out_dir``).

One JSON object a line, flushed as it is written. Only the main process writes; a resumed run
first drops the records of steps after its checkpoint (:func:`truncate_log`), so the log of a run
that was killed and resumed equals that of an uninterrupted one (apart from timings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["METRICS_FILE", "MetricsLog", "truncate_log", "temp_files"]

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class MetricsLog:
    """Append records to ``path``; with ``path=None`` (a process other than rank 0) write nothing."""

    def __init__(self, path: Path | None) -> None:
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=_jsonable) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (written by a run that was killed later)."""
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def temp_files(out_dir: Path) -> list[Path]:
    """The temporary files that a kill during :func:`truncate_log` left in ``out_dir``."""
    return sorted(out_dir.glob(f".{METRICS_FILE}.tmp.*"))
