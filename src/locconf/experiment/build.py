"""The detector and the datasets of a configuration: ``build_model(**model)``, ``build_datasets(**data)``.

Also the options of the synthetic data (``data.synthetic``) and the device a run defaults to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .keywords import call

ARCHS = ("rcnn", "one_stage", "torchvision_frcnn", "torchvision")

#: ``data.synthetic`` keys and their defaults.
SYNTHETIC_DEFAULTS = dict(num_train=200, num_val=50, image_size=256, num_classes=3, seed=0)


def model_builder(arch: Any):
    """The builder :func:`build_model` calls for ``arch`` (None for an unknown ``arch``: it names it)."""
    if arch == "rcnn":
        from ..models.rcnn import build_rcnn

        return build_rcnn
    if arch == "one_stage":
        from ..models.one_stage import build_one_stage

        return build_one_stage
    if arch == "torchvision_frcnn":
        from ..models import build_torchvision_frcnn

        return build_torchvision_frcnn
    if arch == "torchvision":
        from ..models import build_torchvision

        return build_torchvision
    return None


def build_model(arch: str = "rcnn", num_classes: int = 1, candidates_per_image: int | None = None,
                **kwargs: Any) -> nn.Module:
    """Build a detector from the ``model`` section.

    Args:
        arch: ``"rcnn"`` (:func:`locconf.models.build_rcnn`: Faster R-CNN FPN with an optional
            localization-quality head, ``quality: iou_net | dir | ...``), ``"one_stage"``
            (:func:`locconf.models.build_one_stage`: ``head: atss | clq | gfl``),
            ``"torchvision_frcnn"`` (torchvision's own Faster R-CNN, the reference baseline) or
            ``"torchvision"`` (:func:`locconf.models.build_torchvision`: any torchvision detection
            builder by ``name``, e.g. ``retinanet_resnet50_fpn``, with an optional ``weights`` file:
            torchvision, DeepForest). The torchvision ones are wrapped by
            :func:`locconf.models.from_torchvision`, so every detector has ``candidates`` and ``detect``.
        num_classes: object classes without the background.
        candidates_per_image: the most candidates an image may return (None: the architecture's
            default: 1000 for locconf's detectors and ``torchvision_frcnn``, all of them for
            ``torchvision``, as its NMS sees them).
        **kwargs: the builder's own keyword arguments.
    """
    builder = model_builder(arch)
    if builder is None:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    if arch == "torchvision_frcnn":
        from ..models import from_torchvision

        model = call(builder, "model", kwargs, num_classes)
        return from_torchvision(model, candidates_per_image=candidates_per_image or 1000)
    if candidates_per_image is not None:
        kwargs = dict(kwargs, candidates_per_image=candidates_per_image)
    return call(builder, "model", kwargs, num_classes)


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
    from ..data import CocoDetection, build_transforms, neon_trees

    root = Path(root)
    if source in ("neon-trees", "synthetic"):
        train_json, val_json = "train.json", "val.json"
        missing = not (root / train_json).is_file() or not (root / val_json).is_file()
        if missing and not fetch:
            raise FileNotFoundError(f"{root} holds no {source} data and data.fetch is false")
        if missing and source == "neon-trees":
            neon_trees(root)
        elif missing:
            write_synthetic_splits(root, **synthetic_options(synthetic))
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


def write_synthetic_splits(root: str | os.PathLike, num_train: int, num_val: int, image_size: int,
                           num_classes: int, seed: int) -> dict[str, tuple[int, Path]]:
    """Generate synthetic scenes into ``root`` as COCO: ``train`` with ``seed``, ``val`` with ``seed + 1``.

    Object scales ``sqrt(w * h)`` range from 1/16 to 3/8 of the image side (at least 4 and 8
    pixels). Returns each split's number of scenes and COCO file.
    """
    from ..data import SyntheticScenes, write_synthetic_coco

    common = dict(image_size=image_size, num_classes=num_classes, min_size=max(4, image_size // 16),
                  max_size=max(8, image_size * 3 // 8))
    out = {}
    for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        out[split] = (n, write_synthetic_coco(SyntheticScenes(n, seed=split_seed, **common), root, split))
    return out


def synthetic_options(synthetic: dict | None) -> dict[str, int]:
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


def device_of(device: str | None) -> torch.device:
    """``device``, else CUDA where there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
