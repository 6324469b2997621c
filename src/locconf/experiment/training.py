"""Training a configured detector (``locconf train``) and rebuilding a trained one from its checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..files import atomic_write_text, output_lock
from .build import build_datasets, build_model, device_of
from .config import check_config, load_config, read_yaml
from .keywords import call

#: ``train.out_dir`` where a configuration sets none.
DEFAULT_OUT_DIR = "runs/default"

#: Keys that may change when a run is resumed (they do not change what is trained).
_BOOKKEEPING = {"train": {"out_dir", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "progress",
                          "num_workers", "device"},
                "data": {"fetch"}, "model": {"num_classes", "trust_weights"}}


def run_train(cfg: dict[str, dict], resume: bool = False, config_file: str | os.PathLike | None = None) -> dict:
    """Train the configured model; the configuration is saved beside the checkpoints (``config.yaml``).

    Every check comes before anything is written: the configuration (:func:`check_config`, and
    ``train.iterations`` given), then ``train.out_dir``, which is locked against a second process
    (:func:`locconf.files.output_lock`) for the whole run: a fresh run into a folder that holds
    checkpoints is refused, and so is ``resume`` with a configuration that differs from the saved
    ``config.yaml`` (the message names the keys; bookkeeping such as ``train.log_every`` may
    change), and an input (``config_file``, the data's annotation and image files) that the run
    would write over (``metrics.jsonl``, ``checkpoint_<step>.pth``). ``config.yaml`` is written once
    :func:`locconf.engine.train.train` has accepted its arguments and the checkpoint, unless
    ``config_file`` is that very file (resuming with the saved configuration: it is kept as it is).
    The global RNGs are seeded with ``train.seed`` before the data and the model are built, so one
    configuration gives the same run every time (on one thread).

    With ``train.eval_every: N``, the val split is evaluated every N steps and at the end under the
    methods of the ``eval`` section (:func:`periodic_eval`), logged to ``metrics.jsonl`` as
    ``type: "eval"`` records.
    """
    cfg = check_config(cfg)
    train_cfg = dict(cfg["train"])
    if "iterations" not in train_cfg:
        raise ValueError("train.iterations is required to train")
    out_dir = Path(train_cfg.setdefault("out_dir", DEFAULT_OUT_DIR))
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 holds the folder for the whole run
        return _train(cfg, train_cfg, out_dir, resume, config_file)
    with output_lock(out_dir, command="locconf train", folder=True):
        return _train(cfg, train_cfg, out_dir, resume, config_file)


def _train(cfg: dict[str, dict], train_cfg: dict, out_dir: Path, resume: bool,
           config_file: str | os.PathLike | None) -> dict:
    """:func:`run_train` once the configuration is checked and ``out_dir`` is held."""
    from ..engine.checkpoint import list_checkpoints
    from ..engine.train import seed_everything, train

    saved_config = out_dir / "config.yaml"
    own_config = config_file is not None and saved_config.resolve() == Path(config_file).resolve()
    _check_run_outputs(out_dir, {"config": config_file if not own_config else None})
    if not resume and list_checkpoints(out_dir):
        raise ValueError(f"train.out_dir {out_dir} already holds a run (checkpoints): resume it or use another out_dir")
    if resume and saved_config.is_file():
        changed = _run_differences(read_yaml(saved_config) or {}, cfg)
        if changed:
            raise ValueError(f"cannot resume the run in {out_dir}: its config.yaml differs in {'; '.join(changed)}; "
                             "resume with the saved configuration or train into another out_dir")
    seed_everything(train_cfg.get("seed", 0))  # before the data and the model draw anything
    evaluates = train_cfg.get("eval_every") is not None  # the val split only then: no val_json needed otherwise
    train_ds, val_ds, val_json = call(build_datasets, "data", dict(cfg["data"], split=None if evaluates else "train"))
    _check_run_outputs(out_dir, {"annotation file": [f for f in (train_ds.ann_file, val_json) if f is not None],
                                 "image": [train_ds.root / im["file_name"] for im in train_ds.images]})
    model = call(build_model, "model", dict(cfg["model"], num_classes=train_ds.num_classes))
    saved = dict(cfg, model=dict(cfg["model"], num_classes=train_ds.num_classes))
    meta = run_meta(saved, [{"id": int(cid), "name": str(train_ds.class_names[label])}
                            for label, cid in sorted(train_ds.label_to_cat_id.items())])

    def write_config() -> None:
        if not own_config:
            atomic_write_text(saved_config, yaml.safe_dump(saved, sort_keys=False))

    eval_fn = periodic_eval(cfg, val_ds, val_json) if train_cfg.get("eval_every") is not None else None
    return call(train, "train", dict(train_cfg, resume=resume, on_start=write_config, meta=meta, eval_fn=eval_fn),
                model, train_ds)


def _check_run_outputs(out_dir: Path, inputs: dict[str, Any]) -> None:
    """Refuse an input that a run in ``out_dir`` would write over (its config, log or checkpoints)."""
    from ..engine.checkpoint import CHECKPOINT_PATTERN
    from ..engine.metrics_log import METRICS_FILE
    from ..files import check_outputs

    folder = out_dir.resolve()
    for name, value in inputs.items():
        for path in [value] if isinstance(value, (str, os.PathLike)) else list(value or []):
            resolved = Path(path).resolve()
            if resolved.parent == folder and (resolved.name in (METRICS_FILE, "config.yaml")
                                              or CHECKPOINT_PATTERN.match(resolved.name)):
                check_outputs({f"train.out_dir's {resolved.name}": resolved}, {name: path})


def periodic_eval(cfg: dict[str, dict], val_ds, val_json: str | os.PathLike):
    """The ``eval_fn`` of ``train.eval_every``: COCO metrics of the val split under the ``eval`` methods.

    ``eval_fn(model, step)`` collects the val candidates on the model's device and returns
    ``{method: {metric: value}}`` (:func:`locconf.evaluation.evaluate_methods`, without per-site
    metrics), which the trainer logs as a ``type: "eval"`` record. Every process evaluates the whole
    split (no sharding); only rank 0's record is logged.
    """
    import torch

    from ..data import collate_fn
    from ..evaluation import collect_candidates, evaluate_methods, load_coco
    from ..postprocess import METHODS
    from .evaluate import _eval_settings

    eval_cfg, methods = _eval_settings(cfg["eval"], None, 0)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:  # before training, not at the first evaluation
        raise ValueError(f"eval.methods: {unknown} are not among {list(METHODS)} (train.eval_every evaluates them)")
    gt = load_coco(val_json)

    def eval_fn(model: nn.Module, step: int) -> dict:
        loader = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_fn)
        candidates = collect_candidates(model, loader, next(model.parameters()).device, progress=False)
        return call(evaluate_methods, "eval", dict(eval_cfg, per_site=False, progress=False), candidates, gt,
                    methods, val_ds.label_to_cat_id)

    return eval_fn


def run_meta(cfg: dict[str, dict], categories: list[dict]) -> dict[str, Any]:
    """What a checkpoint records about its weights (its ``meta``): see :func:`checkpoint_meta`."""
    from .. import __version__

    plain = json.loads(json.dumps(cfg, default=str))  # only str/number/list/dict: weights_only loads it
    return {"locconf_version": __version__, "config": plain,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]}


def checkpoint_meta(state: dict[str, Any]) -> dict[str, Any]:
    """The ``meta`` of a loaded checkpoint: ``locconf_version``, ``config`` and ``categories``.

    ``config`` is the resolved configuration the run trained with (``model.num_classes``
    included); ``categories`` lists ``{"id", "name"}`` in label order (label ``k + 1`` is
    ``categories[k]``; 0 is the background). Checkpoints written before locconf recorded it give
    ``{}``.
    """
    meta = state.get("meta")
    return dict(meta) if isinstance(meta, dict) else {}


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
    """Rebuild a model from a checkpoint; return ``(model in eval mode, configuration)``.

    The configuration is ``cfg`` when given, else the one the checkpoint records
    (:func:`checkpoint_meta`), else ``config.yaml`` beside it (checkpoints of older versions).
    The model's ``categories`` attribute holds the checkpoint's categories (``{"id", "name"}`` in
    label order), or ``None`` when it records none.

    Raises:
        ValueError: the file holds no model weights, or weights of another model than ``cfg``
            builds (the message sets the checkpoint's model settings and locconf version against
            the configuration's).
    """
    from ..engine.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    if not isinstance(state.get("model"), dict):
        what = "a bare state_dict (save {'model': model.state_dict()})" if state and all(
            hasattr(v, "shape") for v in state.values()) else f"the keys {sorted(map(str, state))[:8]}"
        raise ValueError(f"checkpoint {checkpoint} holds no model weights ('model'): it has {what}; give a "
                         "checkpoint written by locconf train")
    meta = checkpoint_meta(state)
    beside = checkpoint.parent / "config.yaml"
    if cfg is None:
        if meta.get("config"):
            cfg = check_config(meta["config"], source=f"{checkpoint} (its recorded configuration)")
        elif beside.is_file():
            cfg = load_config(beside)
        else:
            raise FileNotFoundError(f"checkpoint {checkpoint} records no configuration (written by an older "
                                    f"locconf) and there is no config.yaml beside it: give the configuration")
    num_classes = int(cfg["model"].get("num_classes", 0))
    if not num_classes and meta.get("config"):
        num_classes = int((meta["config"].get("model") or {}).get("num_classes", 0))
    if not num_classes and beside.is_file():  # run_train records it there
        num_classes = int((load_config(beside)["model"]).get("num_classes", 0))
    num_classes = num_classes or _num_classes_from_state(state["model"])
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "num_classes"}
    if model_cfg.get("arch") == "torchvision":  # the checkpoint holds the weights, not model.weights' file
        model_cfg.update(weights=str(checkpoint), trust_weights=False)
    if model_cfg.get("arch") == "posthoc":  # the checkpoint holds the frozen detector's weights too
        model_cfg["detector_weights"] = None
    model = build_model(num_classes=num_classes, **model_cfg)
    load_weights(model, state["model"], checkpoint, meta, dict(cfg["model"], num_classes=num_classes))
    model.categories = meta.get("categories")
    return model.to(device_of(device)).eval(), cfg


def load_weights(model: nn.Module, weights: dict, checkpoint: str | os.PathLike, meta: dict[str, Any],
                 model_cfg: dict[str, Any] | None) -> None:
    """``model.load_state_dict(weights)``; weights of another model are a ``ValueError`` that says why.

    PyTorch lists missing and unexpected parameter names; the message here sets the checkpoint's
    recorded model settings (``meta["config"]["model"]``) and locconf version against ``model_cfg``
    (the settings ``model`` was built with) and this version, and says what to do.
    """
    from .. import __version__
    from ..engine.checkpoint import describe_meta_difference, first_keys

    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        current = {"locconf_version": __version__, "config": {"model": dict(model_cfg or {})}}
        advice = ("leave the configuration out to use the one the checkpoint records" if meta.get("config")
                  else "use the configuration it was trained with")
        raise ValueError(f"checkpoint {checkpoint} does not fit the model the configuration builds: "
                         f"{describe_meta_difference(meta, current)}: {advice} ({first_keys(e)})") from None
def load_detector(cfg: dict[str, dict] | None, checkpoint: str | os.PathLike | None = None,
                  device: str | None = None) -> tuple[nn.Module, dict[str, dict]]:
    """The detector a command evaluates or predicts with; return ``(model in eval mode, configuration)``.

    With a ``checkpoint``: :func:`load_trained`. Without one: the configuration's model with its
    own weight file, for a detector trained elsewhere (``model: {arch: torchvision, name: ...,
    weights: FILE}``, e.g. DeepForest's or torchvision's weights). ``model.num_classes`` is then
    the file's number of classes (background excluded); without it, the number of categories of
    the data's JSON file. The model's ``categories`` are those the file records (DeepForest's
    ``label_dict``), else None.
    """
    if checkpoint is not None:
        return load_trained(checkpoint, cfg, device)
    if cfg is None:
        raise ValueError("without a checkpoint, a configuration must name the model and its weights")
    model_cfg = dict(cfg["model"])
    if model_cfg.get("arch") != "torchvision" or not model_cfg.get("weights"):
        raise ValueError("a checkpoint is required (--checkpoint), unless the configuration's model is "
                         "{arch: torchvision, name: <builder>, weights: <file>} (a detector trained elsewhere); "
                         f"got model.arch {model_cfg.get('arch', 'rcnn')!r}, model.weights {model_cfg.get('weights')!r}")
    if not model_cfg.get("num_classes"):
        from .inference import categories_of

        names, _ = categories_of(cfg)
        if not names:
            raise ValueError("set model.num_classes: the number of classes of the weights file (background excluded); "
                             "the data's JSON file that would give it is not there")
        model_cfg["num_classes"] = len(names) - 1
    model = build_model(**model_cfg)
    return model.to(device_of(device)).eval(), cfg


def _num_classes_from_state(state: dict) -> int:
    for key, value in state.items():
        if key.endswith("cls_score.weight"):
            return value.shape[0] - 1
    raise ValueError("cannot infer num_classes from the checkpoint's weights (no '*cls_score.weight'): set "
                     "model.num_classes in the configuration")
