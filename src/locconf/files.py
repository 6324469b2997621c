"""Writing files safely: the one home of locconf's atomic writes (results, configs, reports and
calibration maps; checkpoints add an fsync, ``engine.checkpoint``), of outputs replaced together
(:class:`OutputSet`), of the check that no output lands on an input (:func:`check_outputs`), of the
lock that keeps two processes out of one output (:func:`output_lock`) and of the checks that a path
given as a file is one (:func:`require_file`).

Temporary files are named ``.<name>.tmp.<pid>`` beside their destination (:func:`temp_path`), so a
write killed with SIGKILL leaves a file that the next write of the same destination recognises
and removes (:func:`remove_stale_temp_files`: only those of processes that no longer run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

__all__ = ["atomic_write", "atomic_write_text", "check_outputs", "output_lock", "lock_path", "OutputSet",
           "temp_path", "remove_stale_temp_files", "deferred_signals", "require_file", "TEMP_PATTERN"]

logger = logging.getLogger(__name__)

#: Temporary files of this module's writers (and of checkpoints): ``.<final name>.tmp.<pid>``.
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)$")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file of ``path`` for this process: ``.<name>.tmp.<pid>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` left by processes that no longer run; return them.

    A writer killed with SIGKILL (or by a power cut) cannot remove its temporary file; the next
    write of the same destination calls this. Only ``.<name of path>.tmp.<pid>`` files whose
    process is gone count: a live writer's file is never touched.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return []
    prefix = f".{path.name}.tmp."
    stale = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            m = TEMP_PATTERN.match(entry.name)
            if m and m.group("name") == path.name and int(m.group("pid")) != os.getpid() \
                    and not _pid_alive(int(m.group("pid"))) and entry.is_file(follow_symlinks=False):
                stale.append(Path(entry.path))
    for p in stale:
        p.unlink(missing_ok=True)
        logger.info("removed %s, left by a write that was killed", p)
    return sorted(stale)


def _named(error: OSError, tmp: Path, path: Path) -> OSError:
    """``error`` about the temporary file ``tmp`` restated about its destination ``path``."""
    if error.filename is not None and Path(error.filename) == tmp:
        return type(error)(error.errno, f"cannot write {path}: {error.strerror}")
    return error


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The parent folder is created. On any error (or interruption) the temporary file is removed
    and ``path`` is left as it was; an ``OSError`` about the temporary file (a read-only folder, a
    full disk) names ``path``. Temporary files of earlier writes of ``path`` that were killed are
    removed first. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, tmp, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- several outputs replaced together --------------------------------------------------------------


@contextlib.contextmanager
def deferred_signals(signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT and SIGTERM back while the block runs; they are delivered (raised) right after it.

    For the few system calls that must all happen or none (renaming a set of outputs into place).
    The signals' handlers are replaced by one that only records them while the block runs (a
    signal mask would not do: the kernel hands a process's signal to any thread that does not
    block it, and torch's threads do not); the first recorded signal is raised again once the old
    handlers are back. Outside the main thread the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in signums:
        if signal.getsignal(signum) is not None:  # None: a handler not set from Python, left alone
            previous[signum] = signal.signal(signum, lambda s, frame: pending.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])


class OutputSet:
    """Output files replaced together: a reader sees the previous set or the complete new one.

    Each output is written to its temporary file (:meth:`temp`, beside it). Leaving the ``with``
    block without an error commits the set: every written temporary file is renamed over its
    destination, and a declared output that was not written this time is removed (a file of an
    earlier run would otherwise sit beside the new set as if it belonged to it); SIGINT and SIGTERM
    wait until all renames are done (:func:`deferred_signals`). On an error or an interruption the
    temporary files are removed and every destination keeps its previous content. Only a SIGKILL
    (or a power cut) during the renames themselves, microseconds, or a rename that fails (a folder
    made read-only meanwhile; the error names the file) can leave a mixed set.

    Args:
        paths: ``{name: destination}``; the names are how :meth:`temp` refers to them.
    """

    def __init__(self, paths: Mapping[str, str | os.PathLike]):
        self.paths = {name: Path(p) for name, p in paths.items()}
        check_outputs(dict(self.paths), {})
        for name, path in self.paths.items():
            if path.is_dir():
                raise IsADirectoryError(f"the output {path} ({name}) is a folder: give a file name")

    def temp(self, name: str) -> Path:
        """The temporary file to write output ``name`` to (its folder is created)."""
        path = self.paths[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        return temp_path(path)

    def __enter__(self) -> "OutputSet":
        for path in self.paths.values():
            remove_stale_temp_files(path)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            for path in self.paths.values():
                temp_path(path).unlink(missing_ok=True)

    def _commit(self) -> None:
        written = {name: temp_path(p).exists() for name, p in self.paths.items()}
        with deferred_signals():
            for name, path in self.paths.items():
                if written[name]:
                    try:
                        os.replace(temp_path(path), path)
                    except OSError as e:
                        raise _named(e, temp_path(path), path) from e
                elif path.is_file():
                    path.unlink()


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
    resolved_outputs = [(name, path, Path(path).resolve()) for name, path in outputs.items() if path is not None]
    for in_name, value in inputs.items():
        if value is None:
            continue
        for path in ([value] if isinstance(value, (str, os.PathLike)) else list(value)):
            target = Path(path).resolve()
            for out_name, _, resolved in resolved_outputs:
                if resolved == target or (target.is_dir() and target in resolved.parents):
                    what = "is" if resolved == target else "is inside"
                    raise ValueError(f"{out_name} {resolved} {what} the {in_name} {path}, one of this command's "
                                     f"inputs: write the output elsewhere")
    seen: dict[Path, str] = {}
    for name, path, resolved in resolved_outputs:
        if resolved in seen:
            raise ValueError(f"{name} and {seen[resolved]} are the same file {path}: give each output its own path")
        seen[resolved] = name


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """``path`` as a ``Path`` if it is a file; else ``FileNotFoundError`` or ``IsADirectoryError``.

    ``what`` names the file in the message (``"config file"``, ``"checkpoint"``, ...); ``hint``
    (e.g. ``"give the YAML file inside it"``) follows for a folder.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file" + (f": {hint}" if hint else ""))
    raise FileNotFoundError(f"{what} {path} does not exist")


# -- one process per output folder ----------------------------------------------------------------

LOCK_NAME = ".locconf.lock"


def lock_path(path: str | os.PathLike, folder: bool | None = None) -> Path:
    """The lock file of an output: ``<folder>/.locconf.lock`` for a folder, ``.<name>.locconf.lock`` beside a file.

    ``folder`` says which ``path`` is; by default a path that is a folder, or has no suffix, is one.
    """
    path = Path(path)
    if folder is None:
        folder = path.is_dir() or not path.suffix
    if folder:
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
def output_lock(path: str | os.PathLike, command: str = "locconf", folder: bool | None = None):
    """Hold ``path`` (an output folder or file) for this process while the block runs.

    The lock is a file created atomically (``O_CREAT | O_EXCL``) holding the process id, the host
    and the command, removed when the block ends, by an error or an interruption too (the command
    line turns SIGTERM into one). A second process asking for the same output is refused with a
    ``ValueError`` that names the holder. A lock left by a process that no longer runs on this host
    (killed with SIGKILL, say) is reported with a warning and taken over; a lock of another host
    cannot be checked, and its message says to delete the file if that run is over. ``folder``: as
    :func:`lock_path`. A folder that cannot be written is an ``OSError`` naming it, raised here,
    before any work. The folder of the lock is created; if it was, and is empty when the block ends
    (the command failed before writing), it is removed again.
    """
    lock = lock_path(path, folder)
    if lock.parent.exists() and not lock.parent.is_dir():
        raise NotADirectoryError(f"{lock.parent} is a file, not a folder: give a folder for this output")
    created = not lock.parent.exists()
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"cannot create the output folder {lock.parent}: {e.strerror}") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    held = False
    try:
        with deferred_signals():  # no interruption between creating the lock file and filling it in
            held = _acquire(lock, info, path)
        yield lock
    finally:
        if held and (_read_lock(lock) or {}).get("pid") == info["pid"]:
            lock.unlink(missing_ok=True)
            if created:  # a folder made for the lock and left empty (the command failed): gone again
                with contextlib.suppress(OSError):
                    lock.parent.rmdir()


def _acquire(lock: Path, info: dict, path: str | os.PathLike) -> bool:
    """Create ``lock`` holding ``info``, taking over a stale one; ``ValueError`` naming a live holder."""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:  # being written by its creator right now, or unreadable: look again
                time.sleep(0.05)
                holder = _read_lock(lock)
            same_host = holder is not None and holder.get("host") == info["host"]
            pid = (holder or {}).get("pid")
            if (same_host and isinstance(pid, int) and not _pid_alive(pid)) or (holder is None and _age(lock) > 10):
                logger.warning("%s: taking over the lock of %s (pid %s), which no longer runs", lock,
                               (holder or {}).get("command", "a locconf command"), pid)
                lock.unlink(missing_ok=True)
                continue
            holder = holder or {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) \
                if isinstance(holder.get("started"), (int, float)) else "an unknown time"
            where = "" if same_host else f" on host {holder.get('host', '?')}"
            raise ValueError(f"{path} is in use by {holder.get('command', 'another locconf command')} (pid {pid}"
                             f"{where}, since {since}): wait for it to finish or write elsewhere; if that "
                             f"process is gone, delete {lock}") from None
        except OSError as e:
            raise type(e)(e.errno, f"cannot write into {lock.parent}: {e.strerror}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        return True
    raise ValueError(f"could not take the lock {lock} (another process keeps taking it)")


def _age(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read_lock(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
