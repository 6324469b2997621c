"""Detector weight files users already have: read safely, matched to a model, mismatches explained.

The formats (:func:`read_weights`):

* a plain ``state_dict`` saved with ``torch.save(model.state_dict(), path)`` (torchvision's COCO
  weights, ``torch.save(m.model.state_dict(), ...)`` in DeepForest's documentation);
* a dict holding one: ``{"state_dict": ...}`` (PyTorch Lightning ``.ckpt`` files, among them
  DeepForest's ``save_model`` / ``trainer.save_checkpoint``, whose keys start with ``model.``)
  or ``{"model": ...}`` (torchvision's reference scripts, locconf's own checkpoints);
* ``.safetensors`` files (the Hugging Face format of DeepForest's released models).

Every ``torch.save`` file is read with ``torch.load(weights_only=True)``, which refuses to run
code from the file. Some Lightning checkpoints also pickle arbitrary objects (configuration
classes, paths, callbacks); such a file is refused with a ``ValueError`` that names the classes
it needs, unless the caller passes ``trust=True`` for a file it trusts (``trust_weights: true``
in a configuration, ``--trust-weights`` on the command line), which loads it with a warning.

:func:`match_state_dict` then finds the prefix under which the file holds the model (``""``,
``model.``, ``module.``, ``torchvision_model.``, ... whichever makes the most keys fit) and
:func:`load_matched` loads it, or raises a ``ValueError`` listing the missing, unexpected and
mis-shaped keys (counts and a few examples) with the likely cause: another number of classes (the
classification head's shape), another architecture, or a prefix.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["read_weights", "match_state_dict", "load_matched", "load_weights", "unsafe_globals"]

logger = logging.getLogger(__name__)

#: Key endings of the classification outputs, whose shape follows the number of classes.
_CLASS_HEADS = ("cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias",
                "cls_logits.weight", "cls_logits.bias", "mask_fcn_logits.weight", "mask_fcn_logits.bias")


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The classes and functions a ``torch.save`` file needs beyond what ``weights_only`` allows."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an old (non-zip) file: the names come from torch's error message instead
        return []


def read_weights(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a weight file; return ``(state_dict, extras)``.

    ``extras`` holds what else the file says about the model: ``label_dict`` (DeepForest's
    ``{"Tree": 0}``, class name -> its label in the file) where the file has one. A ``ValueError``
    names the file when it cannot be read, holds no state dict, or needs unsafe classes while
    ``trust`` is false.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (locconf never downloads weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu")), {}
        except Exception as e:
            raise ValueError(f"weights file {path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        obj = _load_unsafe(path, e, trust)
    state, extras = _unwrap(obj, path)
    return state, extras


def _load_unsafe(path: Path, error: Exception, trust: bool) -> Any:
    """``torch.load`` failed with ``weights_only=True``: refuse, naming the classes, or load a trusted file."""
    message = str(error)
    names = unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+) was not an allowed global", message)))
    if not names:
        with open(path, "rb") as f:
            head = f.read(4)
        problem = "is empty" if not head else "is not a file written by torch.save (or it is truncated)"
        raise ValueError(f"weights file {path} {problem} ({type(error).__name__} from torch.load)") from None
    if not trust:
        raise ValueError(
            f"weights file {path} stores Python objects that loading would have to run: {', '.join(names)}. "
            f"locconf reads weights with torch.load(weights_only=True) and refuses such files; if you trust "
            f"the file, allow it with trust_weights: true in the model section (--trust-weights on the "
            f"command line), or save its state_dict alone") from None
    logger.warning("loading %s with torch.load(weights_only=False) (trusted by the user): it may run code "
                   "(it needs %s)", path, ", ".join(names))
    return torch.load(path, map_location="cpu", weights_only=False)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict a loaded file holds, and its extras (see :func:`read_weights`)."""
    if isinstance(obj, nn.Module):  # a whole pickled model (only a trusted file gets here)
        return dict(obj.state_dict()), {}
    if _is_state_dict(obj):
        return dict(obj), {}
    if isinstance(obj, dict):
        extras = {}
        label_dict = obj.get("label_dict")
        if isinstance(label_dict, dict) and all(isinstance(k, str) and isinstance(v, int)
                                                for k, v in label_dict.items()):
            extras["label_dict"] = dict(label_dict)
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict()), extras
            if _is_state_dict(inner):
                return dict(inner), extras
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ValueError(f"weights file {path} holds a dict with keys {keys} but no state dict of tensors (looked "
                         f"for the file itself, 'state_dict' (Lightning), 'model' and 'model_state_dict')")
    raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")


def match_state_dict(state: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], str, list[str]]:
    """Strip the prefix under which ``state`` holds ``model``'s keys.

    Returns ``(state without the prefix, the prefix, keys outside it)``. The prefix is the one
    (``""``, or any leading ``a.`` / ``a.b.`` ... of the file's keys) after which the most keys
    are keys of ``model``; ties go to the shorter prefix.
    """
    target = set(model.state_dict())
    counts: dict[str, int] = {}
    for key in state:
        if key in target:
            counts[""] = counts.get("", 0) + 1
        for i, char in enumerate(key):
            if char == "." and key[i + 1:] in target:
                counts[key[:i + 1]] = counts.get(key[:i + 1], 0) + 1
    prefix = max(sorted(counts, key=len), key=lambda p: counts[p]) if counts else ""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = [k for k in state if not k.startswith(prefix)]
    return inside, prefix, outside


def load_matched(model: nn.Module, state: dict[str, Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` (already matched) into ``model``; a ``ValueError`` explains any mismatch.

    Args:
        model: the module to fill (its own ``_load_from_state_dict`` hooks run, e.g. torchvision's
            renaming of RetinaNet v1 head keys).
        state: the file's state dict, prefix stripped.
        source: names the file in the message.
        hint: what the model was built as, e.g. ``"torchvision retinanet_resnet50_fpn with 2 class
            logits"``, quoted in the message.
    """
    own = model.state_dict()
    shapes = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    fitting = {k: v for k, v in state.items() if k not in shapes}
    missing, unexpected = model.load_state_dict(fitting, strict=False)
    missing = [k for k in missing if k not in shapes]
    if not (shapes or missing or unexpected):
        return
    lines = [f"the weights in {source} do not fit the model ({hint or type(model).__name__}):"]
    if shapes:
        lines.append(f"{len(shapes)} key(s) of another shape, e.g. "
                     + "; ".join(f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in shapes[:3]))
    if missing:
        lines.append(f"{len(missing)} key(s) of the model missing from the file, e.g. {missing[:3]}")
    if unexpected:
        lines.append(f"{len(unexpected)} key(s) of the file unknown to the model, e.g. {unexpected[:3]}")
    lines.append("likely cause: " + _likely_cause(state, own, shapes, missing, unexpected))
    raise ValueError("\n  ".join(lines))


def _likely_cause(state: dict, own: dict, shapes: list[str], missing: list[str], unexpected: list[str]) -> str:
    heads = [k for k in shapes if k.endswith(_CLASS_HEADS)]
    if heads and len(heads) == len(shapes) and not missing and not unexpected:
        key = heads[0]
        return (f"another number of classes: the classification head {key} is {tuple(state[key].shape)} in the "
                f"file and {tuple(own[key].shape)} in the model; set num_classes to the file's (background "
                f"excluded) and, for RetinaNet / FCOS, background_class (whether the file's logit 0 is an unused "
                f"background column)")
    if unexpected and len(unexpected) >= 0.5 * len(state) and len(missing) >= 0.5 * len(own):
        common = os.path.commonprefix(unexpected)
        common = common[:common.rfind(".") + 1] if "." in common else ""
        if common and all(k[len(common):] in own for k in unexpected):
            return f"a prefix: the file holds the model under {common!r}"
        return ("another architecture: most keys differ (is model.name the builder the file was saved from, "
                "e.g. retinanet_resnet50_fpn vs retinanet_resnet50_fpn_v2, or another backbone?)")
    if missing and all(".body." in k or k.startswith("body.") for k in missing):
        return "the file lacks the backbone's trunk (a head-only file?)"
    return "a model built with other options than the file's (compare the keys above)"


def load_weights(model: nn.Module, path: str | os.PathLike, trust: bool = False,
                 hint: str = "") -> dict[str, Any]:
    """Read ``path`` (:func:`read_weights`), match its prefix and load it into ``model``; return the extras."""
    state, extras = read_weights(path, trust)
    matched, prefix, outside = match_state_dict(state, model)
    if prefix or outside:
        logger.info("%s: the model's weights are under the prefix %r (%d other key(s) ignored, e.g. %s)",
                    path, prefix, len(outside), outside[:3])
    load_matched(model, matched, str(path), hint)
    return extras
