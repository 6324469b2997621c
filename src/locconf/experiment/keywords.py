"""Configuration sections checked against the keyword arguments of the functions they feed.

A section such as ``model`` or ``train`` is passed as ``fn(*args, **section)``. Before that,
:func:`check_kwargs` turns unknown keys and values of another type than the one ``fn`` declares
(``true`` is not a number, a string is not a list of integers) into ``ValueError``s naming
``section.key``; :func:`call` checks and calls.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import os
import types
import typing
from typing import Any, Sequence


def check_kwargs(fn, section: str, kwargs: dict, positional: int = 0, exclude: Sequence[str] = ()) -> None:
    """Check ``kwargs`` against ``fn``'s keywords (after its first ``positional`` parameters).

    Unknown keys (unless ``fn`` takes ``**kwargs``) and values that do not match the declared
    type are ``ValueError``s naming ``section.key``.
    """
    params = list(inspect.signature(fn).parameters.values())[positional:]
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - set(exclude)
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        unknown = sorted(set(kwargs) - named)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section {section!r} (accepted: {sorted(named)})")
    hints = _type_hints(fn)
    for key, value in kwargs.items():
        if key in named and key in hints and not _fits(value, hints[key]):
            raise ValueError(f"{section}.{key} must be {_describe(hints[key])}, got {value!r} "
                             f"({type(value).__name__})")


def call(fn, section: str, kwargs: dict, *args):
    """Call ``fn(*args, **kwargs)`` after :func:`check_kwargs` (unknown keys and wrong types are ValueErrors)."""
    check_kwargs(fn, section, kwargs, positional=len(args))
    return fn(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _type_hints(fn) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: no type checks for this function
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a configuration value matches a type hint; ``bool`` is never a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if hint is os.PathLike:
        return isinstance(value, (str, os.PathLike))
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                            for k, v in value.items()))
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if hint is type(None):
        return value is None
    if isinstance(hint, type) and hint is not object:
        return isinstance(value, hint)
    return True  # Any and anything not checked here


def _describe(hint: Any, plural: bool = False) -> str:
    """``float | None`` -> ``'a number or null'``, ``Sequence[int]`` -> ``'a list of integers'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a, plural) for a in args))
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        return ("lists of " if plural else "a list of ") + (_describe(args[0], True) if args else "values")
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), os.PathLike: ("a path", "paths"), type(None): ("null", "nulls")}
    if hint in names:
        return names[hint][plural]
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return "mappings" if plural else "a mapping"
    return getattr(hint, "__name__", str(hint))
