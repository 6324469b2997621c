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
import re
import types
import typing
from typing import Any, Sequence


class ConfigKeyError(ValueError):
    """A configuration key that is unknown or holds a value of the wrong type; ``keys`` names them (``section.key``)."""

    def __init__(self, message: str, keys: Sequence[str]):
        super().__init__(message)
        self.keys = list(keys)


def config_keys(fn, positional: int = 0, also: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """The configuration keys of ``fn``: its parameters after the first ``positional`` ones, plus ``also``
    (parameters among the first ones that are keys too), less ``exclude``; ``*args``/``**kwargs`` are none."""
    params = list(inspect.signature(fn).parameters.values())
    named = [p.name for p in params[:positional] if p.name in also] + [p.name for p in params[positional:]]
    kinds = {p.name: p.kind for p in params}
    return [n for n in named if kinds[n] not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and n not in exclude]


def check_kwargs(fn, section: str, kwargs: dict, positional: int = 0, exclude: Sequence[str] = (),
                 also: Sequence[str] = ()) -> None:
    """Check ``kwargs`` against ``fn``'s keywords (:func:`config_keys`).

    Unknown keys (unless ``fn`` takes ``**kwargs``) and values that do not match the declared
    type are errors (:class:`ConfigKeyError`, a ``ValueError``) naming ``section.key``.
    """
    params = list(inspect.signature(fn).parameters.values())[positional:]
    named = set(config_keys(fn, positional, also, exclude))
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        unknown = sorted(set(kwargs) - named, key=str)
        if unknown:
            raise ConfigKeyError(f"unknown key(s) {unknown} in section {section!r} (accepted: {sorted(named)})",
                                 [f"{section}.{k}" for k in unknown])
    hints = _type_hints(fn)
    for key, value in kwargs.items():
        if key in named and key in hints and not _fits(value, hints[key]):
            raise ConfigKeyError(f"{section}.{key} must be {_describe(hints[key])}, got {value!r} "
                                 f"({type(value).__name__})", [f"{section}.{key}"])


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
    if hint is Any:
        return "any values" if plural else "any value"
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
    name = getattr(hint, "__name__", str(hint))
    return name + "s" if plural else f"a {name}"


_SECTION_HEADERS = ("Args:", "Arguments:", "Returns:", "Raises:", "Yields:", "Example:", "Examples:", "Note:",
                    "Notes:", "Attributes:", "Keyword Args:", "Keyword Arguments:", "See Also:", "Warning:",
                    "Warnings:", "References:")


def argument_docs(fn) -> dict[str, str]:
    """The ``Args:`` entries of ``fn``'s Google-style docstring: ``{parameter: text}``, whitespace joined.

    An entry ``name: text`` (or ``name (type): text``) runs until the next line indented like it;
    ``a, b, c: text`` documents the three parameters with one text; ``*args``/``**kwargs`` entries
    are left out. The section ends at a line indented less than its entries or at another section
    header (``Returns:``, ``Raises:``, ...).
    """
    lines = (inspect.getdoc(fn) or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:"))
    except StopIteration:
        return {}
    header_indent = len(lines[start]) - len(lines[start].lstrip())
    entries: list[tuple[str, list[str]]] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        level = len(line) - len(line.lstrip())
        if level <= header_indent or (indent is not None and level < indent) or line.strip() in _SECTION_HEADERS:
            break
        if indent is None:
            indent = level
        if level == indent:
            head, sep, text = line.strip().partition(":")
            if not sep:
                break
            entries.append((head, [text.strip()]))
        else:
            entries[-1][1].append(line.strip())
    out = {}
    for head, text in entries:
        names = re.sub(r"\s*\([^)]*\)\s*$", "", head)  # "name (int)" -> "name"
        for name in (n.strip() for n in names.split(",")):
            if name and not name.startswith("*"):
                out[name] = " ".join(t for t in text if t)
    return out
