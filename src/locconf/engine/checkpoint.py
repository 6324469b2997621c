"""Atomic checkpoints, latest-checkpoint discovery and RNG-state capture.

A checkpoint is written to a hidden temporary file in the destination folder, flushed and
``fsync``-ed, then renamed over the destination with ``os.replace`` (atomic on POSIX and Windows
for paths on one file system). A reader therefore sees either the previous file or the complete
new one, never a partial write; a run killed mid-write leaves only a temporary file that
:func:`latest_checkpoint` ignores and :func:`clean_temp_files` removes (the trainer calls it when a
run starts or resumes). A full disk is reported as such, with the path, and only when the free
space says so; an interruption (Ctrl-C, SIGTERM) during a write stays an interruption.

Checkpoints are read with ``torch.load(weights_only=True)``: everything stored is tensors,
numbers, strings, tuples, lists and dicts (RNG states are converted to such types). A file that
cannot be read raises :class:`CheckpointError` naming it (empty, truncated, not a checkpoint).
"""

from __future__ import annotations

import errno
import json
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
    "describe_meta_difference",
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


def _chain(error: BaseException):
    """``error`` and the exceptions it was raised from or during (``__cause__``, ``__context__``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _interruption(error: BaseException) -> BaseException | None:
    """The ``KeyboardInterrupt`` (SIGTERM's too) behind ``error``, if any.

    torch's zip writer turns an exception raised inside its write callback, such as the
    ``KeyboardInterrupt`` of a Ctrl-C, into ``RuntimeError: unexpected pos A vs B``.
    """
    return next((e for e in _chain(error) if isinstance(e, KeyboardInterrupt)), None)


def _state_bytes(state: Any) -> int:
    """The bytes of the tensors in ``state`` (nested dicts, lists, tuples): about the checkpoint's size."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _is_disk_full(error: BaseException, folder: Path, needed: int) -> bool:
    """``ENOSPC``/``EDQUOT`` behind ``error``, or torch's writer losing a short write (``unexpected pos``)
    while ``folder`` has less free space than the ``needed`` bytes."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        try:
            return shutil.disk_usage(folder).free < needed
        except OSError:
            return False
    return False


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    On any failure the temporary file is removed and ``path`` keeps its previous content. A full
    disk raises ``OSError(ENOSPC)`` saying "no space left on device" with the path and the free
    space: an ``ENOSPC`` (or ``EDQUOT``) error, or torch's ``unexpected pos A vs B`` when the folder
    has less free space than the checkpoint's tensors take (plus 64 KiB for the rest). An interruption (``KeyboardInterrupt``,
    which SIGTERM raises too on the command line) propagates unchanged, also when torch wrapped it
    into its ``unexpected pos`` error; any other error propagates as raised.
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
        interruption = _interruption(e)
        if interruption is not None and interruption is not e:
            raise interruption from None
        if interruption is None and _is_disk_full(e, path.parent, _state_bytes(state) + (1 << 16)):
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
        FileNotFoundError: ``path`` does not exist. IsADirectoryError: ``path`` is a folder.
        CheckpointError: the file is empty, truncated or corrupted, is not a torch checkpoint, or
            does not hold a dict (a ``ValueError``; the message names the file).
    """
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        hint = f"e.g. {found[-1][1]}, its latest" if found else "it holds no checkpoint_<step>.pth"
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a checkpoint file: give the file ({hint})")
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


def describe_meta_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """Why weights saved with ``saved`` meta may not fit a model of ``current`` meta, in words.

    Both are checkpoint ``meta`` dicts (``locconf_version``, ``config`` with a ``model`` section; see
    :func:`locconf.experiment.checkpoint_meta`): the model settings that differ (architecture, head,
    backbone first), and the two versions when they differ. For a message to the user when
    ``load_state_dict`` fails.
    """
    def model_of(meta):
        config = meta.get("config") if isinstance(meta, dict) else None
        return config.get("model") if isinstance(config, dict) and isinstance(config.get("model"), dict) else None

    old, new = model_of(saved), model_of(current)
    parts = []
    if old is None:
        parts.append("the checkpoint records no settings (written by an older locconf, or not by locconf train)")
    elif new is not None:
        keys = [k for k in ("arch", "quality", "head", "backbone") if k in old or k in new]
        keys += sorted(k for k in set(old) | set(new) if k not in keys)
        changed = [f"{k}: {old.get(k, '(default)')!r} in the checkpoint, {new.get(k, '(default)')!r} here"
                   for k in keys if _plain(old.get(k)) != _plain(new.get(k))]
        parts.append("model settings differ: " + "; ".join(changed) if changed else "the model settings agree")
    versions = (saved or {}).get("locconf_version"), (current or {}).get("locconf_version")
    if versions[0] != versions[1]:
        parts.append(f"it was written by locconf {versions[0] or '(an older version)'}, this is locconf "
                     f"{versions[1] or '?'}")
    return "; ".join(parts)


def _plain(value: Any) -> str:
    """``value`` as JSON text: tuples and lists alike (YAML writes both as lists)."""
    return json.dumps(value, sort_keys=True, default=str)


def first_keys(error: BaseException) -> str:
    """PyTorch's ``load_state_dict`` error cut to its first missing / unexpected names, on one line."""
    lines = [" ".join(line.split()) for line in str(error).splitlines()[1:] if line.strip()]
    return "; ".join(line if len(line) < 160 else line[:157] + "..." for line in lines[:2]) or str(error)[:160]


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
