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

#: Keys that may change when a run is resumed (they do not change what is trained).
_BOOKKEEPING = {"train": {"out_dir", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "progress",
                          "num_workers", "device"},
                "data": {"fetch"}, "model": {"num_classes", "trust_weights"}}


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
    from ..engine.checkpoint import list_checkpoints
    from ..engine.train import seed_everything, train

    cfg = check_config(cfg)
    train_cfg = dict(cfg["train"])
    if "iterations" not in train_cfg:
        raise ValueError("train.iterations is required to train")
    out_dir = Path(train_cfg.setdefault("out_dir", "runs/default"))
    if not resume and list_checkpoints(out_dir):
        raise ValueError(f"train.out_dir {out_dir} already holds a run (checkpoints): resume it or use another out_dir")
    config_file = out_dir / "config.yaml"
    if resume and config_file.is_file():
        changed = _run_differences(read_yaml(config_file) or {}, cfg)
        if changed:
            raise ValueError(f"cannot resume the run in {out_dir}: its config.yaml differs in {'; '.join(changed)}; "
                             "resume with the saved configuration or train into another out_dir")
    seed_everything(train_cfg.get("seed", 0))  # before the data and the model draw anything
    train_ds, _, _ = call(build_datasets, "data", cfg["data"])
    model = call(build_model, "model", dict(cfg["model"], num_classes=train_ds.num_classes))
    saved = dict(cfg, model=dict(cfg["model"], num_classes=train_ds.num_classes))
    meta = run_meta(saved, [{"id": int(cid), "name": str(train_ds.class_names[label])}
                            for label, cid in sorted(train_ds.label_to_cat_id.items())])

    def write_config() -> None:
        atomic_write_text(config_file, yaml.safe_dump(saved, sort_keys=False))

    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 holds the folder for the whole run
        return call(train, "train", dict(train_cfg, resume=resume, on_start=write_config, meta=meta), model, train_ds)
    with output_lock(out_dir, command="locconf train"):
        return call(train, "train", dict(train_cfg, resume=resume, on_start=write_config, meta=meta), model,
                    train_ds)


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
    """
    from ..engine.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    meta = checkpoint_meta(state)
    beside = checkpoint.parent / "config.yaml"
    if cfg is None:
        cfg = check_config(meta["config"], source=f"{checkpoint} (its recorded configuration)") if meta.get("config") \
            else load_config(beside)
    num_classes = int(cfg["model"].get("num_classes", 0))
    if not num_classes and meta.get("config"):
        num_classes = int((meta["config"].get("model") or {}).get("num_classes", 0))
    if not num_classes and beside.is_file():  # run_train records it there
        num_classes = int((load_config(beside)["model"]).get("num_classes", 0))
    num_classes = num_classes or _num_classes_from_state(state["model"])
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "num_classes"}
    if model_cfg.get("arch") == "torchvision":  # the checkpoint holds the weights, not model.weights' file
        model_cfg.update(weights=str(checkpoint), trust_weights=False)
    model = build_model(num_classes=num_classes, **model_cfg)
    model.load_state_dict(state["model"])
    model.categories = meta.get("categories")
    return model.to(device_of(device)).eval(), cfg


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
    raise ValueError("cannot infer num_classes from the checkpoint; set model.num_classes")
