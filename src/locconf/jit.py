"""numba for locconf's CPU kernels: imported when a kernel is first needed, compiled once, cached in locconf's folder.

The post-processing kernel (:mod:`locconf.postprocess.kernel`) and the box-fusion clustering
(:mod:`locconf.fusion.assign`) are numba functions decorated with :func:`njit`. Nothing imports
those two modules, nor numba, before a kernel is called: ``import locconf.postprocess`` stays
free of numba (about 0.2 s of import time).

Where the compiled kernels go
-----------------------------
``$LOCCONF_CACHE/numba`` when ``LOCCONF_CACHE`` is set, else ``~/.cache/locconf/numba``
(:func:`cache_dir`; the same ``LOCCONF_CACHE`` as the NEON data's downloads), in one sub-folder
per installed copy of locconf (numba's naming: the package folder's name and a hash of its path).
Never the package folder itself, so a system-wide install in a read-only folder caches as well
as an editable one, and each user has a cache of their own. Several users may share one folder
(``LOCCONF_CACHE=/shared/locconf``) where all of them can write into it. Each entry is checked
against a hash of its source file's contents, the Python version and the CPU, as numba does.

* The first call in a cache folder compiles (10-30 s) and says so once, on the ``locconf.jit``
  logger at INFO level (``locconf`` commands show it): "compiling the post-processing kernels
  (numba), once per cache folder ...".
* A folder that exists but cannot be written is still read (a cache filled beforehand, e.g. by
  an administrator); what it lacks is compiled in memory.
* Where nothing can be written (no home folder, a read-only ``LOCCONF_CACHE``), kernels are
  compiled in every process that needs them, with one ``RuntimeWarning`` that says what to set.

Loading a cached kernel
-----------------------
numba refreshes its whole compiler (importing and registering every implementation it has:
about 0.5 s of CPU, two thirds of a warm first call) before it even looks in a cache. A cached
kernel needs none of it, only numba's runtime (NRT) that its machine code calls, so the cache of
:func:`njit` initialises the runtime, loads, and refreshes the compiler only on a miss, before
compiling (numba's compiler refreshes itself too). ``benchmarks/first_call.py`` measures it.
This uses numba's cache classes (``numba.core.caching``, internal API): where they are missing
or changed, :func:`njit` falls back to numba's own ``cache=True`` (with a warning).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "njit"]

_lock = threading.Lock()
_noticed: set[str] = set()  # the kernel groups whose compilation was announced in this process
_save_failed = False


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``$LOCCONF_CACHE/numba``, else ``~/.cache/locconf/numba``.

    Read at each kernel module's import (the first kernel call); created when a kernel is saved.
    """
    root = os.environ.get("LOCCONF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "locconf") / "numba"


def njit(group: str, **options) -> Callable:
    """``numba.njit(**options)`` with locconf's disk cache (:func:`cache_dir`) and its compile notice.

    ``group`` names the kernels in the notice logged when a compilation starts (once per group
    and process), e.g. ``"post-processing kernels"``. Importing the decorated module imports
    numba; compiling happens at the first call, as with ``numba.njit``.
    """
    import numba

    def wrap(fn):
        dispatcher = numba.njit(**options)(fn)
        try:
            cache = _cache_class()(fn)
        except (ImportError, AttributeError, TypeError, RuntimeError, OSError) as e:
            warnings.warn(f"locconf.jit: locconf's kernel cache is unavailable with numba {numba.__version__} "
                          f"({type(e).__name__}: {e}); using numba's own cache=True", RuntimeWarning, stacklevel=2)
            return numba.njit(cache=True, **options)(fn)
        cache.group = group
        dispatcher._cache = cache  # what Dispatcher.enable_caching() does, with locconf's cache class
        return dispatcher

    return wrap


_CACHE_CLASS = None


def _cache_class():
    """The numba cache class of :func:`njit`, built at the first use (it imports numba's internals)."""
    global _CACHE_CLASS
    if _CACHE_CLASS is not None:
        return _CACHE_CLASS
    from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator, _SourceFileBackedLocatorMixin
    from numba.core.runtime import rtsys

    class Locator(_SourceFileBackedLocatorMixin, _CacheLocator):
        """Entries in ``cache_dir() / <package folder name>_<hash of its path>``; nothing made before a save."""

        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(cache_dir() / self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            return cls(py_func, py_file) if os.path.isfile(py_file) else None

    class Impl(CompileResultCacheImpl):
        _locator_classes = [Locator]

    class KernelCache(FunctionCache):
        """numba's function cache in :func:`cache_dir`: loads without refreshing the compiler, notices, never fails."""

        _impl_class = Impl
        group = "kernels"

        def load_overload(self, sig, target_context):
            rtsys.initialize(target_context)  # the runtime the cached machine code calls into
            try:
                data = self._load_overload(sig, target_context)
            except OSError:  # an unreadable entry: compile
                data = None
            if data is None:
                _notice(self.group, self.cache_path)
                target_context.refresh()  # what numba's own load_overload does first
            return data

        def save_overload(self, sig, data):
            try:
                self._save_overload(sig, data)
            except OSError as e:
                _save_failure(self.cache_path, e)

    _CACHE_CLASS = KernelCache
    return KernelCache


def _notice(group: str, path: str) -> None:
    with _lock:
        if group in _noticed:
            return
        _noticed.add(group)
    logger.info("compiling the %s (numba), once per cache folder; 10-30 s. Cache: %s", group, path)


def _save_failure(path: str, error: OSError) -> None:
    global _save_failed
    with _lock:
        if _save_failed:
            return
        _save_failed = True
    warnings.warn(f"locconf cannot cache its compiled kernels in {path} ({error.strerror or error}); they will be "
                  "compiled again in every process. Set LOCCONF_CACHE to a writable folder to keep them.",
                  RuntimeWarning, stacklevel=2)
