"""A small torchvision Faster R-CNN (ResNet trunk + FPN) that trains from scratch.

Differences from ``torchvision.models.detection.fasterrcnn_resnet50_fpn``, all for training from
random weights on small images on a CPU:

- trainable normalisation (BatchNorm or GroupNorm) instead of the frozen BatchNorm that only makes
  sense with pre-trained statistics;
- FPN width, RoI-head width and the pyramid levels are arguments (the fast NEON recipe is
  ResNet-18, P3-P6, 128 channels, 128 RoIs per image);
- anchors of 16-128 px by default (one size per level, three aspect ratios).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from .backbone import build_fpn_backbone, check_returned_layers

__all__ = ["build_torchvision_frcnn"]


def build_torchvision_frcnn(
    num_classes: int,
    *,
    backbone: str = "resnet18",
    fpn_channels: int = 128,
    returned_layers: Sequence[int] = (2, 3, 4),
    anchor_sizes: Sequence[float] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    norm: str = "batch",
    norm_groups: int = 16,
    representation_size: int = 1024,
    min_size: int = 400,
    max_size: int = 1333,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 128,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    channels_last: bool = False,
    weights: str | None = None,
    frozen_stages: int = -1,
) -> FasterRCNN:
    """Build torchvision's Faster R-CNN on locconf's FPN backbone (random, ImageNet or local weights).

    Args:
        num_classes: number of object classes, *without* the background (labels ``1..num_classes``
            as produced by ``locconf.data``); the classifier gets ``num_classes + 1`` outputs.
        backbone: a torchvision ResNet (``"resnet18"``, ...) or a timm model, as
            :func:`locconf.models.backbone.build_fpn_backbone` takes.
        fpn_channels: FPN output channels.
        returned_layers: ResNet stages fed to the FPN (1..4 = strides 4..32); a max-pool level is
            added on top, so ``(2, 3, 4)`` gives P3-P6.
        anchor_sizes: one anchor size per pyramid level (``len(returned_layers) + 1`` values);
            default ``16 * 2**i``.
        aspect_ratios: anchor aspect ratios (h / w), the same at every level.
        norm: ``"batch"`` (trainable BatchNorm), ``"group"`` (GroupNorm, batch-size independent)
            or ``"frozen"`` (torchvision's default; only useful with pre-trained weights).
        norm_groups: groups of the GroupNorm layers.
        representation_size: width of the two fully connected layers of the box head.
        min_size, max_size: resize rule of ``GeneralizedRCNNTransform``.
        rpn_batch_size_per_image, box_batch_size_per_image: sampled anchors / RoIs per image.
        box_detections_per_img, box_score_thresh: evaluation-time output limits.
        channels_last: convert the model to ``torch.channels_last`` memory format (faster on CPU).
        weights, frozen_stages: the trunk's initial weights and frozen early stages, as in
            :func:`locconf.models.backbone.build_fpn_backbone`, so that this reference can be built
            from the same backbone and settings as locconf's detectors; the input normalisation
            follows the weights, as theirs does.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (background excluded), got {num_classes}")
    if fpn_channels < 1 or representation_size < 1:
        raise ValueError(f"fpn_channels and representation_size must be >= 1, got {fpn_channels}, {representation_size}")
    layers = check_returned_layers(returned_layers)
    num_levels = len(layers) + 1
    if anchor_sizes is None:
        anchor_sizes = tuple(16.0 * 2**i for i in range(num_levels))
    if len(anchor_sizes) != num_levels:
        raise ValueError(
            f"anchor_sizes needs one size per pyramid level ({num_levels}), got {len(anchor_sizes)}"
        )
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")

    body = build_fpn_backbone(backbone, fpn_channels=fpn_channels, returned_layers=layers, norm=norm,
                              norm_groups=norm_groups, weights=weights, frozen_stages=frozen_stages)
    anchors = AnchorGenerator(
        sizes=tuple((float(s),) for s in anchor_sizes),
        aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * num_levels,
    )
    roi_pool = MultiScaleRoIAlign(featmap_names=[str(k) for k in range(len(layers))], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        body,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        image_mean=list(body.image_mean),
        image_std=list(body.image_std),
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
