"""A trained detector as a folder of weights and configuration: ``save_pretrained`` / ``from_pretrained``.

(:mod:`locconf.models.pretrained` is something else: ImageNet weights of the backbones.)

A *pretrained folder* holds two files:

* ``model.safetensors``: the model's ``state_dict`` (every parameter and buffer, nothing else: no
  optimizer, no pickled Python), in the safetensors format;
* ``config.json``: ``format`` (``"locconf-pretrained"``) and ``format_version`` (this module's
  :data:`FORMAT_VERSION`), ``locconf_version`` (the version that wrote it), ``model`` (the
  ``model`` section of a configuration that rebuilds the detector through
  :func:`locconf.experiment.build_model`: ``arch``, ``num_classes`` and the builder's keywords, with
  ``weights`` set to null since the weights are in the folder), ``image_mean`` / ``image_std``
  (the input normalisation, which a backbone's ImageNet weights set), ``categories`` (``{"id",
  "name"}`` in label order: label ``k + 1`` is ``categories[k]``; null when unknown) and, when the
  detector came from a training run, ``config`` (that run's resolved configuration, for the record).

It is separate from a training checkpoint (``locconf train``'s ``checkpoint_*.pth``, which also
holds the optimizer, scheduler, RNG and sampler states needed to resume): this is what one
publishes or loads for inference. ``locconf export CHECKPOINT --out DIR`` writes one from a
checkpoint; :func:`from_pretrained` (or ``torch.hub.load(..., pretrained_dir=DIR)``) reads it.

Versions: a folder of a newer ``format_version`` is refused (the message says which locconf wrote
it); a folder written by another locconf version of the same format loads with a warning, and
its weights must still fit the rebuilt model key for key and shape for shape.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..files import atomic_write, atomic_write_text

__all__ = ["save_pretrained", "from_pretrained", "read_pretrained_config", "SavePretrained", "FORMAT",
           "FORMAT_VERSION", "WEIGHTS_FILE", "CONFIG_FILE"]

logger = logging.getLogger(__name__)

FORMAT = "locconf-pretrained"
#: The layout this locconf writes and the newest it reads.
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class SavePretrained:
    """Gives a detector ``model.save_pretrained(directory, ...)`` (:func:`save_pretrained`)."""

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write the weights and the configuration to ``directory`` (:func:`save_pretrained`)."""
        return save_pretrained(self, directory, **kwargs)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, config: Optional[Mapping[str, Any]] = None,
                    categories: Optional[Sequence[Mapping[str, Any]]] = None,
                    training_config: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights and what rebuilds it to the folder ``directory`` (module docstring).

    Args:
        model: a detector. Built by :func:`locconf.models.build_rcnn` or
            :func:`locconf.models.build_one_stage` it records its ``model_config``; any other (e.g.
            ``build_torchvision_frcnn``'s) needs ``config``.
        directory: the folder (created; its ``model.safetensors`` and ``config.json`` are replaced).
        config: the ``model`` section that rebuilds it (``arch``, ``num_classes``, the builder's
            keywords); default ``model.model_config``.
        categories: ``[{"id": int, "name": str}, ...]`` in label order, one per class; default
            ``model.categories`` (set by :func:`locconf.experiment.load_trained`), else none.
        training_config: the run's resolved configuration, kept for the record.

    Returns:
        The folder. Everything is checked before anything is written, and each file is written
        through a temporary file.
    """
    from safetensors.torch import save_file

    from .. import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {directory} is a file: save_pretrained writes a folder")
    section = config if config is not None else getattr(model, "model_config", None)
    if not isinstance(section, Mapping) or "arch" not in section:
        raise ValueError(f"save_pretrained needs the model's configuration: pass config={{'arch': ..., "
                         f"'num_classes': ..., ...}} (a {type(model).__name__} records none; the models of "
                         f"build_rcnn and build_one_stage record it as model_config)")
    section = _plain(_no_weight_files(section), "config")
    num_classes = section.get("num_classes")
    if categories is None:
        categories = getattr(model, "categories", None)
    categories = None if categories is None else _check_categories(categories, num_classes)
    transform = getattr(model, "transform", None)
    mean = [float(v) for v in getattr(transform, "image_mean", ())] or None
    std = [float(v) for v in getattr(transform, "image_std", ())] or None
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "locconf_version": __version__,
              "model": section, "image_mean": mean, "image_std": std, "categories": categories,
              "config": None if training_config is None else _plain(training_config, "training_config")}
    # a copy of each tensor: safetensors refuses tensors that share memory, and non-contiguous ones
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, text)
    return directory


def read_pretrained_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a pretrained folder, checked (format and version; module docstring)."""
    from .. import __version__

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no pretrained folder {directory} (save_pretrained / locconf export write one)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a pretrained folder "
                                f"(it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a locconf pretrained configuration (its 'format' is not {FORMAT!r})")
    written_by = record.get("locconf_version", "an unknown version")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version must be an int >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by locconf {written_by} in pretrained format {version}; this "
                         f"locconf {__version__} reads format {FORMAT_VERSION} at most: upgrade locconf")
    if not isinstance(record.get("model"), dict) or "arch" not in record["model"]:
        raise ValueError(f"{path}: 'model' must be the model section of a configuration (with 'arch')")
    if written_by != __version__:
        logger.warning("%s was written by locconf %s; this is locconf %s: loading it with a strict check of "
                       "every weight's name and shape", directory, written_by, __version__)
    return record


def _no_weight_files(section: dict) -> dict:
    """A model section that reads no weight file when built (the folder's safetensors hold them all):
    ``weights`` off, and for a post-hoc model its frozen detector's ``detector_weights`` and ``weights``."""
    if section.get("arch") == "posthoc":
        detector = dict(section.get("detector") or {}, weights=None)
        return dict(section, detector=detector, detector_weights=None)
    return dict(section, weights=None)


def from_pretrained(directory: str | os.PathLike, device: Optional[str | torch.device] = None) -> nn.Module:
    """Rebuild the detector of a pretrained folder (:func:`save_pretrained`) with its weights.

    The model is built by :func:`locconf.experiment.build_model` from the folder's ``model``
    section (no weights are downloaded or read from anywhere else), its input normalisation set
    to the recorded one, and the weights loaded strictly (every key, every shape).

    Args:
        directory: the folder.
        device: where to put the model (default: CUDA where available, as ``locconf`` commands).

    Returns:
        The model in evaluation mode, with ``categories`` (``[{"id", "name"}, ...]`` in label order,
        or None) and ``model_config``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..experiment.build import build_model, device_of

    directory = Path(directory)
    record = read_pretrained_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {directory} is not a pretrained folder")
    section = _no_weight_files(record["model"])
    written_by = record.get("locconf_version", "an unknown version")
    try:
        model = build_model(**section)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{directory / CONFIG_FILE} (written by locconf {written_by}) does not build a model "
                         f"here: {e}") from None
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from None
    _load_strict(model, state, weights, written_by)
    for name in ("image_mean", "image_std"):
        value = record.get(name)
        if value is not None:
            if len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ValueError(f"{directory / CONFIG_FILE}: {name} must be 3 finite numbers, got {value!r}")
            setattr(model.transform, name, [float(v) for v in value])
    categories = record.get("categories")
    model.categories = None if categories is None else _check_categories(categories, section.get("num_classes"))
    model.model_config = section
    return model.to(device_of(None if device is None else str(device))).eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, written_by: str) -> None:
    """``load_state_dict(strict=True)`` with a ``ValueError`` naming the keys and shapes that differ."""
    if hasattr(model, "torchvision_model") and not any(k.startswith("torchvision_model.") for k in state):
        state = {f"torchvision_model.{k}": v for k, v in state.items()}  # a bare torchvision model's weights
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys]
        raise ValueError(f"the weights {path} (written by locconf {written_by}) do not fit the model its "
                         f"config.json builds: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _check_categories(categories: Any, num_classes: Any) -> list[dict[str, Any]]:
    if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
        raise ValueError(f"categories must be a list of {{'id': int, 'name': str}}, got {type(categories).__name__}")
    out = []
    for i, c in enumerate(categories):
        if not isinstance(c, Mapping) or isinstance(c.get("id"), bool) or not isinstance(c.get("id"), int) \
                or not isinstance(c.get("name"), str):
            raise ValueError(f"categories[{i}] must be {{'id': int, 'name': str}}, got {c!r}")
        out.append({"id": int(c["id"]), "name": str(c["name"])})
    if isinstance(num_classes, int) and len(out) != num_classes:
        raise ValueError(f"categories has {len(out)} entries but the model has num_classes={num_classes} "
                         f"(one category per label, in label order)")
    return out


def _plain(value: Any, name: str) -> Any:
    """``value`` as JSON types (tuples become lists, paths strings); a ``ValueError`` naming the key
    of anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{name} is a {type(value).__name__}, which a JSON configuration cannot hold")
