"""Writing files safely: the one home of locconf's atomic writes (results, configs, reports and
calibration maps; checkpoints add an fsync, ``engine.checkpoint``), of the check that no output lands
on an input (:func:`check_outputs`), and of the lock that keeps two processes out of one output
(:func:`output_lock`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

__all__ = ["atomic_write", "atomic_write_text", "check_outputs", "output_lock", "lock_path"]

logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The parent folder is created. On any error (or interruption) the temporary file is removed
    and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- outputs that never land on inputs -------------------------------------------------------------


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike] | None]) -> None:
    """Refuse any output that is one of the inputs, or two outputs that are one file.

    ``outputs`` maps a name (the flag, e.g. ``"--html"``) to a path; ``inputs`` maps a name (e.g.
    ``"config"``) to a path or to several. Paths are compared resolved (``a/../b`` and a symlink to
    ``b`` are ``b``); ``None`` entries are skipped. A folder among the inputs also protects every file
    inside it (an output must not be written into an input folder of images, say). Raises a
    ``ValueError`` naming both sides.
    """
    seen: dict[Path, str] = {}
    for name, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise ValueError(f"{name} and {seen[resolved]} are the same file {path}: give each output its own path")
        seen[resolved] = name
    for in_name, value in inputs.items():
        if value is None:
            continue
        for path in ([value] if isinstance(value, (str, os.PathLike)) else list(value)):
            target = Path(path).resolve()
            for resolved, out_name in seen.items():
                if resolved == target or (target.is_dir() and target in resolved.parents):
                    what = "is" if resolved == target else "is inside"
                    raise ValueError(f"{out_name} {resolved} {what} the {in_name} {path}, one of this command's "
                                     f"inputs: write the output elsewhere")


# -- one process per output folder ----------------------------------------------------------------

LOCK_NAME = ".locconf.lock"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: ``<folder>/.locconf.lock`` for a folder, ``.<name>.locconf.lock`` beside a file."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return path / LOCK_NAME
    return path.with_name(f".{path.name}{LOCK_NAME}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, command: str = "locconf"):
    """Hold ``path`` (an output folder or file) for this process while the block runs.

    The lock is a file created atomically (``O_CREAT | O_EXCL``) holding the process id, the host
    and the command, removed when the block ends, by an error or an interruption too (the command
    line turns SIGTERM into one). A second process asking for the same output is refused with a
    ``ValueError`` that names the holder. A lock left by a process that no longer runs on this host
    (killed with SIGKILL, say) is reported with a warning and taken over; a lock of another host
    cannot be checked, and its message says to delete the file if that run is over.
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:  # being written by its creator right now, or unreadable: look again
                time.sleep(0.05)
                holder = _read_lock(lock) or {}
            same_host = holder.get("host") == info["host"]
            pid = holder.get("pid")
            if same_host and isinstance(pid, int) and not _pid_alive(pid):
                logger.warning("%s: taking over the lock of %s (pid %s), which no longer runs", lock,
                               holder.get("command", "a locconf command"), pid)
                lock.unlink(missing_ok=True)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) \
                if isinstance(holder.get("started"), (int, float)) else "an unknown time"
            where = "" if same_host else f" on host {holder.get('host', '?')}"
            raise ValueError(f"{path} is in use by {holder.get('command', 'another locconf command')} (pid {pid}"
                             f"{where}, since {since}): wait for it to finish or write elsewhere; if that "
                             f"process is gone, delete {lock}") from None
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
            break
    else:
        raise ValueError(f"could not take the lock {lock} (another process keeps taking it)")
    try:
        yield lock
    finally:
        if (_read_lock(lock) or {}).get("pid") == info["pid"]:
            lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
