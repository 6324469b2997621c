"""Reading and checking a configuration: YAML 1.2 floats, four sections, known keys of the right type.

:func:`load_config` reads a YAML file with :class:`ConfigLoader`; :func:`check_config` checks a
configuration dict section by section against the functions the sections feed
(:mod:`locconf.experiment.keywords`).
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .build import build_datasets, build_model, model_builder, synthetic_options
from .keywords import check_kwargs

SECTIONS = ("model", "data", "train", "eval")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` is a number, not the string ``"1e-4"``.

    (YAML 1.1's float pattern, which PyYAML follows, needs a dot: ``1.0e-4`` was a float, ``1e-4``
    a string.) Everything else resolves as with ``yaml.safe_load``.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:
      [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    | [-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    | [-+]?\.(?:inf|Inf|INF)
    | \.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def read_yaml(path: Path) -> Any:
    """Parse a UTF-8 YAML file with :class:`ConfigLoader`; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None


def load_config(path: str | os.PathLike) -> dict[str, dict]:
    """Read a YAML configuration and check it (:func:`check_config`); errors name the file.

    An empty file (or one of comments only) is an error, raised before anything else happens.
    """
    from ..files import require_file

    path = require_file(path, "config file", "give the YAML file")
    cfg = read_yaml(path)
    if cfg is None:
        raise ValueError(f"config file {path} is empty: it needs the sections {SECTIONS} "
                         "(at least train.iterations to train)")
    return check_config(cfg, source=str(path))


def check_config(cfg: dict, source: str = "config") -> dict[str, dict]:
    """Check a configuration's sections, keys and value types; return it with all four sections.

    Unknown sections and keys, nested ones included (``data.synthetic.<key>``), and values of the
    wrong type (a string or ``true`` where a number is expected, ...) are ``ValueError``s naming
    ``source``, the section and the key. The types are those the keys' functions declare:
    :func:`build_model` and its architecture's builder (``model``), :func:`build_datasets`
    (``data``), :func:`locconf.engine.train.train` (``train``) and
    :func:`locconf.evaluation.evaluate_methods` plus ``methods`` (``eval``).
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: the configuration must be a mapping of sections {SECTIONS}")
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; expected {SECTIONS}")
    out = {}
    for name in SECTIONS:
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {type(section).__name__}")
        out[name] = dict(section)
    try:
        _check_sections(out)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return out


def _check_sections(cfg: dict[str, dict]) -> None:
    from ..engine.train import train
    from ..evaluation import evaluate_methods

    model = cfg["model"]
    check_kwargs(build_model, "model", model)
    builder = model_builder(model.get("arch", "rcnn"))
    if builder is not None:
        own = set(inspect.signature(build_model).parameters)
        check_kwargs(builder, "model", {k: v for k, v in model.items() if k not in own}, positional=1)
    check_kwargs(build_datasets, "data", cfg["data"])
    synthetic_options(cfg["data"].get("synthetic"))
    check_kwargs(train, "train", cfg["train"], positional=2, exclude=("resume", "on_start", "eval_fn", "meta"))
    eval_cfg = dict(cfg["eval"])
    methods = eval_cfg.pop("methods", None)
    if methods is not None and (not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)):
        raise ValueError(f"eval.methods must be a list of method names, got {methods!r}")
    check_kwargs(evaluate_methods, "eval", eval_cfg, positional=4)
