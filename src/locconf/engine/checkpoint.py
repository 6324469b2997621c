"""Atomic checkpoints, latest-checkpoint discovery and RNG-state capture.

A checkpoint is written to a hidden temporary file in the destination folder, flushed and
``fsync``-ed, then renamed over the destination with ``os.replace`` (atomic on POSIX and Windows
for paths on one file system). A reader therefore sees either the previous file or the complete
new one, never a partial write; a run killed mid-write leaves only a temporary file that
:func:`latest_checkpoint` ignores and :func:`clean_temp_files` removes (the trainer calls it when a
run starts or resumes). A full disk is reported as such, with the path.

Checkpoints are read with ``torch.load(weights_only=True)``: everything stored is tensors,
numbers, strings, tuples, lists and dicts (RNG states are converted to such types). A file that
cannot be read raises :class:`CheckpointError` naming it (empty, truncated, not a checkpoint).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_PATTERN",
    "TEMP_PATTERN",
    "CheckpointError",
    "checkpoint_path",
    "save_checkpoint",
    "clean_temp_files",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "get_rng_state",
    "set_rng_state",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pth$")
_TEMP_INFIX = ".tmp."
#: Temporary files of :func:`save_checkpoint` (``.<final name>.tmp.<pid>``).
TEMP_PATTERN = re.compile(r"^\.checkpoint_\d+\.pth\.tmp\.\d+$")


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/checkpoint_<step, 7 digits>.pth``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(out_dir) / f"checkpoint_{step:07d}.pth"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_TEMP_INFIX}{os.getpid()}"


def _is_disk_full(error: BaseException) -> bool:
    """``ENOSPC``, or torch's zip writer losing a short write (``unexpected pos A vs B``)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, RuntimeError) and "unexpected pos" in str(error)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    On any failure the temporary file is removed and ``path`` keeps its previous content. A full
    disk raises ``OSError(ENOSPC)`` saying "no space left on device" with the path and the free
    space (torch itself reports it as ``unexpected pos A vs B``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"no space left on device: writing checkpoint {path} failed "
                          f"({free} bytes free in {path.parent}; {type(e).__name__}: {e})", str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


def clean_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writes killed mid-way left in ``out_dir``; return them.

    Only names of this module's writer (``.checkpoint_<step>.pth.tmp.<pid>``) count; call it while
    no other process writes checkpoints into ``out_dir`` (one training per folder).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [p for p in out_dir.iterdir() if TEMP_PATTERN.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return sorted(stale)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (empty, truncated, corrupted or not a checkpoint); names the file."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, truncated or corrupted, is not a torch checkpoint, or
            does not hold a dict (a ``ValueError``; the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError... by content
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            problem = "is empty"
        elif head == b"PK\x03\x04":  # torch.save's zip container
            problem = "is truncated or corrupted (an interrupted copy or write?)"
        else:
            problem = "is not a checkpoint written by torch.save"
        raise CheckpointError(f"checkpoint {path} {problem} ({type(e).__name__} from torch.load)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of states")
    return state


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``out_dir``, by increasing step.

    Only names matching ``checkpoint_<digits>.pth`` count: temporary files of interrupted writes
    (``.checkpoint_*.pth.tmp.<pid>``) and anything else are ignored.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step in ``out_dir``, or ``None`` when there is none."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


# -- RNG states -------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global RNG, torch's CPU RNG and the current CUDA device's RNG."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (the CUDA state only where CUDA is available)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
