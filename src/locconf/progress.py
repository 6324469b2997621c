"""Progress bars that behave in a terminal and in a log file: the one home of locconf's tqdm policy.

Every long loop in locconf draws its bar through :func:`progress_bar`. A bar is shown only when

* the caller asked for one (``progress=True``, the default of the long commands; ``--no-progress``
  on the command line turns it off),
* the environment does not silence bars (``TQDM_DISABLE`` set to anything but ``0``/``false``/empty,
  tqdm's own switch, which tqdm ignores when a caller passes ``disable=False``), and
* the bar's stream (standard error) is a terminal: piped into a file or ``| cat``, a bar would print
  one line per update, so it stays silent there (tqdm's ``disable=None``).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm import tqdm

__all__ = ["progress_bar", "progress_disabled"]


def progress_disabled(progress: bool = True) -> bool | None:
    """tqdm's ``disable`` for a bar the caller wants when ``progress`` is true.

    ``True`` (no bar) when ``progress`` is false or ``TQDM_DISABLE`` is set; otherwise ``None``:
    tqdm then shows the bar only when its stream is a terminal.
    """
    if not progress:
        return True
    flag = os.environ.get("TQDM_DISABLE", "").strip().lower()
    if flag not in ("", "0", "false", "no", "off"):
        return True
    return None


def progress_bar(iterable: Iterable | None = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` shown only as :func:`progress_disabled` allows."""
    kwargs.pop("disable", None)
    return tqdm(iterable, disable=progress_disabled(progress), **kwargs)
