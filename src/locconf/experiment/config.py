"""Reading and checking a configuration: YAML 1.2 floats, no duplicate keys, ``_base_`` files, ``--set``, the key reference.

:func:`load_config` reads a YAML file with :class:`ConfigLoader`, merges the files it names in
``_base_`` (:func:`read_config`), applies command-line overrides (:func:`apply_overrides`) and
checks the result (:func:`check_config`) against the functions the sections feed
(:func:`section_feeds`, :mod:`locconf.experiment.keywords`). :func:`config_reference` documents every
key from that same table: its type in the words of the check's errors, its default from the
function's signature and its meaning from the function's docstring.

Inheritance (``_base_``), MMDetection's habit
---------------------------------------------
A file may start from others::

    _base_: neon_dir_r18.yaml          # or a list: [a.yaml, b.yaml]; paths relative to this file
    train:
      lr: 0.01                         # replaces the base's train.lr; its other train keys stay
      out_dir: runs/dir_lr001
    eval:
      _delete_: true                   # this eval section replaces the base's instead of merging
      methods: [nms]

* The bases are read first (recursively: a base may have bases), in the order listed, each one
  merged over the previous ones, and the file's own keys last.
* Mappings merge key by key at every depth (``data.synthetic.num_train`` alone replaces only
  that key); any other value (a number, a string, a list, null) replaces the base's value whole.
  An empty section (``eval:`` with nothing under it) changes nothing.
* ``_delete_: true`` inside a mapping makes that mapping replace the base's (its other keys are
  dropped); ``_delete_`` is not allowed at the top level.
* A file that names itself through its bases (``a.yaml -> b.yaml -> a.yaml``) is refused, naming
  the chain; so are a missing base (naming the file that includes it) and a ``_base_`` that is
  not a file name or a list of them. ``_base_`` works in files only: a relative path needs the
  folder of the including file.

Overrides (``--set``)
---------------------
``locconf train|eval|demo ... --set train.lr=0.005 --set model.quality=dir`` sets one key per
item, after the bases and before the check, so the same validation applies and an error names
the ``--set`` item. ``KEY`` is ``section.key`` or a deeper dotted path
(``data.synthetic.num_train=50``, ``eval.method_params.nms.iou_threshold=0.6``); missing
mappings on the way are created. ``VALUE`` is read as YAML (:class:`ConfigLoader`): ``0.005`` and
``1e-4`` are numbers, ``true`` a boolean, ``null`` None, ``[0.7, 0.9]`` a list,
``{iou_threshold: 0.6}`` a mapping (replacing the whole value), anything else a string.

Duplicate keys
--------------
PyYAML keeps the last of two equal keys without a word (a second ``train:`` section silently
replaced the first, so ``out_dir``, ``lr`` and ``batch_size`` fell back to defaults):
:class:`ConfigLoader` refuses them, naming the key and both lines.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .build import ARCHS, SYNTHETIC_DEFAULTS, build_datasets, build_model, model_builder, synthetic_options
from .build import write_synthetic_splits
from .keywords import ConfigKeyError, _describe, _type_hints, argument_docs, check_kwargs, config_keys

SECTIONS = ("model", "data", "train", "eval")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of a YAML file holds one key twice."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats and without duplicate keys.

    ``1e-4`` is a number, not the string ``"1e-4"`` (YAML 1.1's float pattern, which PyYAML
    follows, needs a dot: ``1.0e-4`` was a float, ``1e-4`` a string). A key given twice in one
    mapping is a :class:`DuplicateKeyError` naming the key and both lines (PyYAML keeps the last
    one silently); keys merged in with ``<<`` may be overridden as YAML allows. Everything else
    resolves as with ``yaml.safe_load``.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not None:
                    where = f"twice on line {line}" if first == line else f"on lines {first} and {line}"
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r} {where} (each key may appear once "
                                                        "in a mapping; PyYAML would keep the last silently)")
                seen[key] = line
        return super().construct_mapping(node, deep)


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
    """Parse a UTF-8 YAML file with :class:`ConfigLoader`; errors name the file (and the lines of a duplicate key)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except DuplicateKeyError as e:
        raise ValueError(f"{path}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None


# -- the sections and the functions they feed ---------------------------------------------------


@dataclass(frozen=True)
class Feed:
    """A function a section feeds: its keys are the parameters after the first ``positional`` ones,
    plus ``also`` (among the first ones), less ``exclude`` (what the runner passes itself)."""

    fn: Callable
    positional: int = 0
    also: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return config_keys(self.fn, self.positional, self.also, self.exclude)

    def check(self, section: str, values: dict) -> None:
        check_kwargs(self.fn, section, values, self.positional, self.exclude, self.also)


def section_feeds(arch: Any = "rcnn") -> dict[str, list[Feed]]:
    """Each section's functions, the one table of :func:`check_config` and :func:`config_reference`.

    ``model``: :func:`build_model`, then the builder of ``arch`` (its own keys); ``data``:
    :func:`build_datasets` (plus ``data.synthetic.<key>``, :data:`SYNTHETIC_DEFAULTS`);
    ``train``: :func:`locconf.engine.train.train`; ``eval``:
    :func:`locconf.evaluation.evaluate_methods` and its ``methods``.
    """
    from ..engine.train import train
    from ..evaluation import evaluate_methods

    model = [Feed(build_model)]
    builder = model_builder(arch)
    if builder is not None:
        model.append(Feed(builder, 1, exclude=tuple(inspect.signature(build_model).parameters)))
    return {
        "model": model,
        "data": [Feed(build_datasets, exclude=("split",))],
        # locconf train makes the eval_fn of train.eval_every itself (locconf.experiment.training.periodic_eval)
        "train": [Feed(train, 2, exclude=("resume", "on_start", "eval_fn", "meta"))],
        # locconf eval passes progress (--no-progress)
        "eval": [Feed(evaluate_methods, 4, also=("methods",), exclude=("progress",))],
    }


# -- reading a file: _base_, --set, the check ----------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, dict]:
    """Read a YAML configuration with its ``_base_`` files, apply ``overrides``, check it; errors name the file.

    ``overrides`` are ``--set`` items ``"section.key=value"`` (:func:`apply_overrides`). An empty
    file (or one of comments only) is an error, raised before anything else happens. A check error
    also names where the faulty key was set when that is not ``path`` itself (a base file or a
    ``--set`` item). See the module docstring for ``_base_``, ``_delete_`` and ``--set``.
    """
    from ..files import require_file

    path = require_file(path, "config file", "give the YAML file")
    cfg, origins = read_config(path)
    origins.update(apply_overrides(cfg, overrides))
    return check_config(cfg, source=str(path), origins=origins)


def read_config(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The mapping of a configuration file with its ``_base_`` files merged in, unchecked.

    Returns ``(configuration, origins)``: ``origins`` maps each dotted key (``"train.lr"``) to the
    file that set it. Merging rules in the module docstring.
    """
    cfg, origins = _read(Path(path), ())
    return cfg, {".".join(map(str, k)): v for k, v in origins.items()}


def _read(path: Path, _chain: tuple[Path, ...]) -> tuple[dict, dict[tuple, str]]:
    """:func:`read_config` with ``origins`` keyed by key paths (tuples); ``_chain``: the including files."""
    if path.resolve() in _chain:
        names = [str(p) for p in _chain[list(_chain).index(path.resolve()):]] + [str(path.resolve())]
        raise ValueError(f"{_chain[-1]}: _base_ files include each other: {' -> '.join(names)}")
    data = read_yaml(path)
    if data is None and not _chain:
        raise ValueError(f"config file {path} is empty: it needs the sections {SECTIONS} "
                         "(at least train.iterations to train)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the configuration must be a mapping of sections {SECTIONS}, "
                         f"got {type(data).__name__}")
    if "_delete_" in data:
        raise ValueError(f"{path}: _delete_ belongs inside a section (e.g. train: {{_delete_: true, ...}}), "
                         "not at the top level")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ValueError(f"{path}: _base_ must be a file name or a list of file names (relative to {path.parent}), "
                         f"got {bases!r}")
    merged: dict = {}
    origins: dict[tuple, str] = {}
    for name in bases:
        base = path.parent / name
        if not base.is_file():
            raise FileNotFoundError(f"{path}: its _base_ {name!r} does not exist ({base})")
        base_cfg, base_origins = _read(base, _chain + (path.resolve(),))
        merged = _merge(merged, base_cfg, origins, str(base), (), from_base=True)
        origins.update(base_origins)
    sections = {k: ({} if v is None and k in SECTIONS else v) for k, v in data.items()}  # "eval:" alone: nothing
    return _merge(merged, sections, origins, str(path), ()), origins


def _merge(base: dict, child: dict, origins: dict[tuple, str], where: str, prefix: tuple,
           from_base: bool = False) -> dict:
    """``child`` merged over ``base`` (mappings key by key, ``_delete_: true`` replaces); records ``origins``."""
    out = dict(base)
    for key, value in child.items():
        if key == "_delete_":
            continue
        path = prefix + (key,)
        if isinstance(value, dict):
            delete = value.get("_delete_", False)
            if not isinstance(delete, bool):
                raise ValueError(f"{where}: {'.'.join(map(str, path))}._delete_ must be true or false, got {delete!r}")
            old = out.get(key)
            if delete or not isinstance(old, dict):
                _forget(origins, path)
                old = {}
            out[key] = _merge(old, value, origins, where, path, from_base)
        else:
            _forget(origins, path)
            out[key] = value
            if not from_base:
                origins[path] = where
    return out


def _forget(origins: dict[tuple, str], path: tuple) -> None:
    for key in [k for k in origins if k[:len(path)] == path]:
        del origins[key]


def apply_overrides(cfg: dict, overrides: Sequence[str]) -> dict[str, str]:
    """Set ``cfg``'s keys from ``--set`` items ``"section.key=value"`` in place; return ``{dotted key: "--set item"}``.

    ``section.key`` may go deeper (``data.synthetic.num_train``, missing mappings are created);
    the value is YAML (:class:`ConfigLoader`). A malformed item, an unknown section, an empty
    value, a value that is not YAML and a path through a value that is not a mapping are
    ``ValueError``\\ s naming the item. Types and key names are left to :func:`check_config`.
    """
    origins = {}
    for item in overrides:
        if not isinstance(item, str):
            raise ValueError(f"--set items must be strings 'section.key=value', got {item!r}")
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=0.005 or "
                             "data.synthetic.num_train=50")
        if parts[0] not in SECTIONS:
            raise ValueError(f"--set {item!r}: unknown section {parts[0]!r}; expected one of {SECTIONS}")
        if not text.strip():
            raise ValueError(f"--set {item!r}: no value (write null for none, '' for an empty string)")
        try:
            value = yaml.load(text, Loader=ConfigLoader)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
        node = cfg
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is {node[part]!r}, not a mapping")
            node = node[part]
        node[parts[-1]] = value
        dotted = ".".join(parts)
        for other in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
            del origins[other]
        origins[dotted] = f"--set {item}"
    return origins


def check_config(cfg: dict, source: str = "config", origins: dict[str, str] | None = None) -> dict[str, dict]:
    """Check a configuration's sections, keys and value types; return it with all four sections.

    Unknown sections and keys, nested ones included (``data.synthetic.<key>``), and values of the
    wrong type (a string or ``true`` where a number is expected, ...) are ``ValueError``\\ s naming
    ``source``, the section and the key, and, where ``origins`` (dotted key -> where it was set,
    from :func:`read_config` and :func:`apply_overrides`) says the key came from somewhere other
    than ``source``, that place. The keys and types are those of :func:`section_feeds`.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: the configuration must be a mapping of sections {SECTIONS}")
    if "_base_" in cfg:
        raise ValueError(f"{source}: _base_ is read from files only (load_config / locconf train FILE)")
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown, key=str)}; expected {SECTIONS}")
    out = {}
    for name in SECTIONS:
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {type(section).__name__}")
        out[name] = dict(section)
    try:
        _check_sections(out)
    except ConfigKeyError as e:
        where = sorted({origins[k] if origins[k].startswith("--set ") else f"from {origins[k]}"
                        for k in e.keys if origins and origins.get(k) not in (None, source)})
        place = f"{source} ({'; '.join(where)})" if where else source
        raise ValueError(f"{place}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return out


def _check_sections(cfg: dict[str, dict]) -> None:
    from ..postprocess import METHODS

    arch = cfg["model"].get("arch", "rcnn")
    if model_builder(arch) is None:
        raise ConfigKeyError(f"model.arch must be one of {ARCHS}, got {arch!r}", ["model.arch"])
    feeds = section_feeds(arch)
    for name in SECTIONS:
        rest = cfg[name]
        for feed in feeds[name]:  # each feed checks the keys that the ones before it do not take
            feed.check(name, rest)
            own = set(feed.keys())
            rest = {k: v for k, v in rest.items() if k not in own}
    try:
        synthetic_options(cfg["data"].get("synthetic"))
    except ValueError as e:
        keys = re.findall(r"data\.synthetic\.\w+", str(e))
        raise ConfigKeyError(str(e), keys or ["data.synthetic"]) from None
    for method in cfg["eval"].get("methods") or []:
        if method not in METHODS:
            raise ConfigKeyError(f"eval.methods: {method!r} is not a post-processing method; "
                                 f"expected some of {', '.join(METHODS)}", ["eval.methods"])


# -- the reference of every key ------------------------------------------------------------------


@dataclass(frozen=True)
class KeyDoc:
    """One configuration key: ``section.key`` (``arch`` set for an architecture's own model keys)."""

    section: str
    key: str
    type: str
    default: str
    meaning: str
    arch: str | None = None
    source: str = ""


def _default_text(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, default=str)


def _runner_defaults() -> dict[tuple[str, str], str]:
    """Defaults that the commands supply over the functions' own (the reference shows these)."""
    from .evaluate import DEFAULT_METHODS
    from .training import DEFAULT_OUT_DIR

    return {("train", "out_dir"): _default_text(DEFAULT_OUT_DIR),
            ("eval", "methods"): _default_text(list(DEFAULT_METHODS)),
            ("model", "num_classes"): "the data's"}


def config_key_docs() -> list[KeyDoc]:
    """Every configuration key with its type, default and meaning, from :func:`section_feeds` (per ``model.arch`` too).

    The type is the annotation in the words of the check's errors, the default the signature's
    (or what ``locconf train|eval`` put in its place) and the meaning the function's docstring
    ``Args:`` entry ("" where it has none: a test keeps that from happening).
    """
    runner = _runner_defaults()
    rows = []

    def add(section: str, feed: Feed, arch: str | None = None) -> None:
        params = inspect.signature(feed.fn).parameters
        hints = _type_hints(feed.fn)
        for key in feed.keys():
            rows.append(KeyDoc(section, key, _describe(hints[key]) if key in hints else "any value",
                               runner.get((section, key), _default_text(params[key].default)),
                               _markdown(_key_meaning(feed.fn, key)), arch,
                               f"{feed.fn.__module__}.{feed.fn.__qualname__}"))

    for name in SECTIONS:
        for feed in section_feeds()[name][:1]:
            add(name, feed)
        if name == "data":
            docs = argument_docs(write_synthetic_splits)
            for key, default in SYNTHETIC_DEFAULTS.items():
                rows.append(KeyDoc("data", f"synthetic.{key}", f"an integer >= {0 if key == 'seed' else 1}",
                                   _default_text(default), _markdown(docs.get(key, "")), None,
                                   "locconf.experiment.build.write_synthetic_splits"))
    for arch in ARCHS:
        add("model", section_feeds(arch)["model"][1], arch)
    return rows


def _key_meaning(fn: Callable, key: str) -> str:
    """``fn``'s docstring entry for ``key``; where one entry documents several keys and names a function
    (``:func:`...```) that documents ``key`` alone, that function's entry comes first."""
    docs = argument_docs(fn)
    text = docs.get(key, "")
    if list(docs.values()).count(text) > 1:
        for ref in re.findall(r":func:`~?([\w.]+)`", text):
            own = argument_docs(_resolve(ref, fn)).get(key) if _resolve(ref, fn) else None
            if own:
                return f"{own.rstrip('.')}. {text[:1].upper()}{text[1:]}"
    return text


def _resolve(ref: str, fn: Callable) -> Callable | None:
    """The function a docstring's ``:func:`ref``` names, from ``fn``'s module or by its dotted path."""
    import importlib

    module, _, name = ref.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name) if module else getattr(inspect.getmodule(fn), ref)
    except (ImportError, AttributeError):
        return None
    return target if callable(target) else None


def config_reference(fmt: str = "markdown", section: str | None = None, arch: str | None = None) -> str:
    """The reference of every configuration key (:func:`config_key_docs`) as Markdown or plain text.

    Args:
        fmt: ``"markdown"`` (one table per section, and per architecture for the model's own
            keys; for the documentation) or ``"text"`` (what ``locconf config keys`` prints).
        section: only this section (one of :data:`SECTIONS`).
        arch: only this architecture's model keys (one of ``ARCHS``); default all.
    """
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")
    if section is not None and section not in SECTIONS:
        raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    rows = [r for r in config_key_docs() if (section is None or r.section == section)
            and (arch is None or r.arch in (None, arch))]
    groups: dict[tuple[str, str | None], list[KeyDoc]] = {}
    for r in rows:
        groups.setdefault((r.section, r.arch), []).append(r)
    feeds = {"model": "build_model", "data": "build_datasets", "train": "locconf.engine.train.train",
             "eval": "locconf.evaluation.evaluate_methods"}
    out = []
    for (name, group_arch), group in groups.items():
        if group_arch is None:
            title = f"{name}" + (f": every architecture (`{feeds[name]}`)" if name == "model" else f" (`{feeds[name]}`)")
        else:
            title = f"model, arch: {group_arch} (`{group[0].source.rsplit('.', 1)[-1]}`)"
        if fmt == "markdown":
            out += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            out += [f"| `{name}.{r.key}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.meaning)} |" for r in group]
        else:
            out += [title.replace("`", ""), ""]
            for r in group:
                out.append(f"  {name}.{r.key}: {r.type}; default {r.default}")
                out += [f"      {line}" for line in _wrap(r.meaning, 90)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ``:func:`x```  and ````x```` -> ```x```."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"``\1``", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])
