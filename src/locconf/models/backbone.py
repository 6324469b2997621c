"""Backbone + FPN, shared by every locconf detector: torchvision ResNets or any timm model.

``build_fpn_backbone(backbone, ...)`` takes

- ``"resnet18" | "resnet34" | "resnet50"``: torchvision's ResNets (as in earlier locconf
  versions: the same modules, initialisation and state-dict names);
- any other name (or ``"timm:<name>"``, e.g. ``"timm:resnet50"`` for timm's ResNet): a timm model
  that supports ``features_only``, e.g. ``"efficientnet_lite0"``, ``"convnext_atto"``.

The choices torchvision's ``resnet_fpn_backbone`` fixes are arguments here:

- ``returned_layers``: which stages feed the FPN, numbered 1..4 for strides 4, 8, 16, 32 whatever
  the model (stage ``i`` is the model's feature map of stride ``2 ** (i + 1)``);
- ``norm``: ``"frozen"`` BatchNorm (statistics and affine fixed: the choice with pretrained
  weights and small batches), trainable ``"batch"`` norm, or ``"group"`` norm (from scratch,
  independent of the batch size);
- ``frozen_stages`` as in MMDetection: ``-1`` trains everything, ``0`` freezes the stem (every
  layer up to the stride-2 features), ``k`` the stem and stages 1..k; frozen layers keep their
  weights and their BatchNorm statistics;
- ``weights``: ``None`` (random), ``"imagenet"`` (weights that install with pip,
  :mod:`locconf.models.pretrained`) or the path of a local file (torchvision or timm key names).

The result maps (B, 3, H, W) to an ordered dict of (B, fpn_channels, H / s, W / s) maps named
``"0"``, ``"1"``, ... (plus the FPN's extra levels) and carries ``out_channels`` and the input
normalisation its weights expect (``image_mean``, ``image_std``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .pretrained import imagenet_state_dict, load_weight_file

__all__ = ["build_fpn_backbone", "check_returned_layers", "TimmFPN", "BACKBONES", "NORMS"]

#: Backbones built from torchvision's ResNets; any other name is looked up in timm.
BACKBONES = ("resnet18", "resnet34", "resnet50")
NORMS = ("batch", "group", "frozen")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_returned_layers(returned_layers: Sequence[int]) -> list[int]:
    """Distinct stages in 1..4 (strides 4..32), sorted; a ValueError otherwise."""
    layers = sorted({int(i) for i in returned_layers})
    if (not layers or layers[0] < 1 or layers[-1] > 4 or len(layers) != len(returned_layers)
            or any(isinstance(i, bool) or int(i) != i for i in returned_layers)):
        raise ValueError(f"returned_layers must be distinct stages in 1..4, got {tuple(returned_layers)}")
    return layers


class TimmFPN(nn.Module):
    """A timm ``features_only`` trunk with torchvision's ``FeaturePyramidNetwork`` on top."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int,
                 extra_blocks: ExtraFPNBlock | None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(OrderedDict((str(k), f) for k, f in enumerate(self.body(x))))


def build_fpn_backbone(
    backbone: str = "resnet18",
    *,
    fpn_channels: int = 128,
    returned_layers: Sequence[int] = (2, 3, 4),
    norm: str = "batch",
    norm_groups: int = 16,
    extra_blocks: ExtraFPNBlock | None = None,
    weights: str | os.PathLike | None = None,
    frozen_stages: int = -1,
) -> nn.Module:
    """A ResNet or timm trunk (random, ImageNet or local weights) with an FPN on top.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (torchvision) or a timm model name
            (``"timm:"`` prefix optional).
        fpn_channels: FPN output channels (``.out_channels`` of the result).
        returned_layers: stages fed to the FPN (1..4 = strides 4..32), e.g. ``(2, 3, 4)`` for C3-C5.
        norm: ``"batch"``, ``"group"`` or ``"frozen"`` (see the module docstring).
        norm_groups: groups of the GroupNorm layers (the largest divisor of the channels up to it).
        extra_blocks: the FPN's extra levels; default a stride-2 max-pool level on top
            (``(2, 3, 4)`` then gives P3-P6).
        weights: ``None``, ``"imagenet"`` or a local file path.
        frozen_stages: ``-1`` (none), ``0`` (stem) or ``1..4`` (stem and stages 1..k).

    Returns:
        a module mapping (B, 3, H, W) to an ordered dict of FPN maps, with ``out_channels``,
        ``image_mean`` and ``image_std``.
    """
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a model name, got {backbone!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"fpn_channels must be an int >= 1, got {fpn_channels!r}")
    if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be an int in -1..4, got {frozen_stages!r}")
    if isinstance(weights, str) and weights != "imagenet" and not os.path.isfile(weights):
        raise ValueError(f"weights: no such file {weights!r} (locconf never downloads weights); "
                         f"use None, 'imagenet' or a local file")
    layers = check_returned_layers(returned_layers)
    extra = LastLevelMaxPool() if extra_blocks is None else extra_blocks
    if backbone in BACKBONES:
        body = _torchvision_resnet(backbone, layers, fpn_channels, norm, norm_groups, extra, weights, frozen_stages)
        body.image_mean, body.image_std = IMAGENET_MEAN, IMAGENET_STD
        return body
    return _timm_backbone(backbone.removeprefix("timm:"), layers, fpn_channels, norm, norm_groups, extra, weights,
                          frozen_stages)


def _torchvision_resnet(name, layers, fpn_channels, norm, norm_groups, extra, weights, frozen_stages):
    norm_layer = {"batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d,
                  "group": lambda c: nn.GroupNorm(math.gcd(norm_groups, c), c)}[norm]
    trunk = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
    if weights == "imagenet":
        raise ValueError(f"weights='imagenet' needs weights that install with pip, which torchvision's {name} does "
                         f"not have: use backbone='efficientnet_lite0' or pass a local {name} weight file")
    if weights is not None:
        state = load_weight_file(weights, name)
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise ValueError(f"weights: {str(weights)!r} is not a {name} state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if frozen_stages >= 0:
        _freeze_through(trunk, "relu" if frozen_stages == 0 else f"layer{frozen_stages}")
    stage_channels = trunk.inplanes // 8  # channels of layer1 output (64 for 18/34, 256 for 50)
    return BackboneWithFPN(trunk, return_layers={f"layer{i}": str(k) for k, i in enumerate(layers)},
                           in_channels_list=[stage_channels * 2 ** (i - 1) for i in layers],
                           out_channels=fpn_channels, extra_blocks=extra)


def _timm_backbone(name, layers, fpn_channels, norm, norm_groups, extra, weights, frozen_stages):
    import timm

    if not timm.is_model(name):
        raise ValueError(f"backbone: {name!r} is neither one of {BACKBONES} nor a timm model name "
                         f"(timm.list_models() lists them)")
    mean, std = None, None
    overlay = None
    if weights == "imagenet":
        state, spec = imagenet_state_dict(name)
        mean, std = spec.mean, spec.std
    elif weights is not None:
        state = load_weight_file(weights, name)
    if weights is not None:
        reference = timm.create_model(name, pretrained=False).state_dict()
        missing = [k for k in reference if k not in state]
        unexpected = [k for k in state if k not in reference]
        head = [k for k in missing if _is_classifier_key(name, k)]
        if [k for k in missing if k not in head] or unexpected:
            raise ValueError(f"weights: {str(weights)!r} does not fit timm's {name!r} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        state = dict(state, **{k: reference[k] for k in head})  # a headless file: the head is unused anyway
        overlay = dict(state_dict=state, num_classes=reference_num_classes(name))
    # out_indices are positions in feature_info; look up which positions have the strides we want
    probe = timm.create_model(name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    wanted = [2 ** (i + 1) for i in layers]
    if any(r not in reductions for r in wanted):
        raise ValueError(f"backbone {name!r} has feature maps of strides {reductions}; returned_layers "
                         f"{tuple(layers)} needs strides {wanted}")
    indices = [reductions.index(r) for r in wanted]
    with _quiet("timm.models._builder"):  # it lists the classifier keys a features-only trunk drops
        body = timm.create_model(name, pretrained=overlay is not None, pretrained_cfg_overlay=overlay,
                                 features_only=True, out_indices=indices)
    if norm == "frozen":
        body = _frozen_norm(body)
    elif norm == "group":
        body = _group_norm(body, norm_groups)
    if frozen_stages >= 0:
        stride = 2 ** (frozen_stages + 1)
        if stride not in reductions:
            raise ValueError(f"frozen_stages={frozen_stages}: backbone {name!r} has no stride-{stride} stage")
        _freeze_through(body, probe.feature_info.module_name()[reductions.index(stride)])
    out = TimmFPN(body, body.feature_info.channels(), fpn_channels, extra)
    cfg = timm.get_pretrained_cfg(name)
    out.image_mean = tuple(mean or (cfg.mean if cfg else IMAGENET_MEAN))
    out.image_std = tuple(std or (cfg.std if cfg else IMAGENET_STD))
    return out


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def reference_num_classes(name: str) -> int:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    return int(cfg.num_classes) if cfg and cfg.num_classes else 1000


def _is_classifier_key(name: str, key: str) -> bool:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    heads = cfg.classifier if cfg and cfg.classifier else ("classifier", "fc", "head")
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return key.startswith(tuple(h + "." for h in heads)) or key.startswith(("conv_head.", "bn2.", "head."))


def _frozen_norm(module: nn.Module) -> nn.Module:
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def _group_norm(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm (timm's BatchNormAct2d keeps its activation) by GroupNorm."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            new = GroupNormAct(child.num_features, math.gcd(groups, child.num_features), eps=child.eps)
            new.act, new.drop = child.act, child.drop
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.GroupNorm(math.gcd(groups, child.num_features), child.num_features, eps=child.eps)
        else:
            new = _group_norm(child, groups)
        setattr(module, name, new)
    return module


def _freeze_through(module: nn.Module, last: str) -> None:
    """Freeze every submodule of ``module`` that runs before, or is, the submodule named ``last``
    (a dotted name): parameters stop training and BatchNorm statistics stop updating. Modules
    run in the order they are registered (true of the sequential CNN trunks used here); timm's
    ``FeatureListNet`` flattens ``stages.1`` into ``stages_1``, so both spellings match."""
    from timm.layers import freeze_batch_norm_2d

    targets = (last, last.replace(".", "_"))

    def walk(parent: nn.Module, prefix: str) -> bool:
        for name, child in parent.named_children():
            full = prefix + name
            if full not in targets and last.startswith(full + "."):
                return walk(child, full + ".")
            child.requires_grad_(False)
            frozen = freeze_batch_norm_2d(child)
            if frozen is not child:
                setattr(parent, name, frozen)
            if full in targets:
                return True
        return False

    if not walk(module, ""):
        raise ValueError(f"frozen_stages: cannot find the stage module {last!r} in the backbone")
