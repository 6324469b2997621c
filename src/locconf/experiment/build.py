"""The detector and the datasets of a configuration: ``build_model(**model)``, ``build_datasets(**data)``.

Also the options of the synthetic data (``data.synthetic``) and the device a run defaults to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .keywords import ConfigKeyError, call

ARCHS = ("rcnn", "one_stage", "torchvision_frcnn", "torchvision", "posthoc")

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
    if arch == "posthoc":
        return build_posthoc
    return None


def build_posthoc(num_classes: int, detector: dict | None = None, detector_weights: str | None = None,
                  head: str = "dir", pool: str | None = None, featmap_names: list[str] | None = None,
                  pool_size: int = 7, representation_size: int = 1024, positive_iou: float = 0.5,
                  max_boxes_per_image: int = 512, head_options: dict | None = None, refine_steps: int = 0,
                  refine_step_size: float = 0.5, refine_top_k: int = 100,
                  candidates_per_image: int | None = None) -> nn.Module:
    """``model.arch: posthoc``: a trained detector, frozen, plus a quality head
    (:class:`locconf.models.posthoc.PosthocQuality`, whose arguments the other keys are).

    Args:
        num_classes: object classes, the detector's.
        detector: the detector's own ``model`` section (any other ``arch``, e.g. ``{arch: rcnn}`` or
            ``{arch: torchvision, name: retinanet_resnet50_fpn, weights: FILE}``).
        detector_weights: the detector's trained weights: a checkpoint of ``locconf train`` or a
            state dict file (None: the detector section's own weights, e.g. ``weights`` of ``arch:
            torchvision``; ``locconf eval`` / ``predict`` read the whole model from the post-hoc run's
            checkpoint and skip it).
        head: the quality head: ``"dir"`` (DIR's Purity and Integrity, hindsight rows), ``"iou_net"``
            (IoU-Net's predictor, jittered ground truth, PrRoIPool) or ``"iou_direct"``.
        pool: the head's pooling, ``"roi_align"`` or ``"prroi"`` (None: the head paper's: RoIAlign for
            DIR and IoU-direct, PrRoIPool for IoU-Net).
        featmap_names: the detector's FPN levels to pool from (None: all but torchvision's ``"pool"``).
        pool_size: the head's pooled size S.
        representation_size: width of the head's hidden layers (1024 in the papers).
        positive_iou: DIR / IoU-direct training rows: the detector's candidates whose IoU with a
            ground-truth box of their class is at least this.
        max_boxes_per_image: the most DIR / IoU-direct training rows per image (a random subset).
        head_options: more keywords of the head's class (e.g. DIR's ``confidence``, IoU-Net's
            ``boxes_per_gt``, ``max_boxes_per_image``, ``iou_loss``).
        refine_steps: IoU-Net's refinement steps after IoU-guided NMS at inference (0: off; ``head:
            iou_net`` only).
        refine_step_size: the refinement's step size (Algorithm 2's lambda).
        refine_top_k: the detections per image the refinement moves (the highest-scoring).
        candidates_per_image: passed to the detector's section.
    """
    from ..models.posthoc import PosthocQuality

    if not isinstance(detector, dict) or not detector:
        raise ValueError("model.detector is required with model.arch 'posthoc': the trained detector's model "
                         "section, e.g. {arch: rcnn, backbone: resnet18}")
    if detector.get("arch", "rcnn") == "posthoc":
        raise ValueError("model.detector.arch cannot be 'posthoc' itself")
    section = dict(detector)
    own = section.pop("num_classes", None)
    if own is not None and own != num_classes:
        raise ValueError(f"model.detector.num_classes {own!r} differs from the data's {num_classes} classes")
    if candidates_per_image is not None:
        section["candidates_per_image"] = candidates_per_image
    try:
        det = call(build_model, "model.detector", dict(section, num_classes=num_classes))
    except ConfigKeyError as e:  # the detector's builder names its section 'model'
        raise ConfigKeyError(f"model.detector: {e}", [k.replace("model.", "model.detector.", 1) for k in e.keys]) \
            from None
    if detector_weights is not None:
        _load_detector_weights(det, detector_weights, section)
    return PosthocQuality(det, head, pool, featmap_names=featmap_names, pool_size=pool_size,
                          representation_size=representation_size, positive_iou=positive_iou,
                          max_boxes_per_image=max_boxes_per_image, head_options=head_options,
                          refine_steps=refine_steps, refine_step_size=refine_step_size, refine_top_k=refine_top_k)


def _load_detector_weights(detector: nn.Module, path: str, section: dict) -> None:
    """``model.detector_weights`` into the detector: a ``locconf train`` checkpoint (its ``model``) or a
    bare state dict; weights of another detector are a ``ValueError`` naming the file."""
    from ..engine.checkpoint import load_checkpoint
    from ..files import require_file
    from .training import checkpoint_meta, load_weights

    path = require_file(path, "model.detector_weights", "give the detector's checkpoint (locconf train) or weights")
    state = load_checkpoint(path)
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    load_weights(detector, weights, path, checkpoint_meta(state), section)


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
            ``"posthoc"`` (:func:`build_posthoc`): a trained detector (``detector``: its own model
            section), frozen, plus a localization-quality head (DIR, IoU-Net) trained on its features.
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
                   jitter_strength: float = 0.2, synthetic: dict | None = None,
                   train_annotations: str | None = None, val_annotations: str | None = None,
                   annotation_format: str | None = None, default_label: str = "Tree", *,
                   split: str | None = None):
    """Build ``(train_dataset, val_dataset, val_json_path)`` from the ``data`` section.

    Args:
        source: ``"neon-trees"`` (fetched and converted into ``root`` when missing),
            ``"synthetic"`` (generated into ``root`` when missing; options in ``synthetic``),
            ``"coco"`` (``train_json`` and ``val_json`` relative to ``root``) or ``"annotations"``
            (``train_annotations`` and ``val_annotations`` relative to ``root``: COCO, DeepForest's
            CSV, or GeoJSON / GeoPackage / shapefile boxes or crowns in the map coordinates of the
            GeoTIFFs of ``train_images`` / ``val_images``; converted to COCO by
            :func:`locconf.data.annotation_files.coco_file`, the validation split with the training
            split's categories).
        root: the dataset's folder; ``neon-trees`` and ``synthetic`` keep ``train.json`` and
            ``val.json`` there.
        fetch: fetch (``neon-trees``) or generate (``synthetic``) the data into ``root`` when its
            COCO files are missing; with false their absence is an error.
        train_json, val_json: the splits' COCO files, relative to ``root`` (``source: coco`` only;
            training needs ``train_json``, evaluating only ``val_json``).
        train_images, val_images: folders (relative to ``root``) that the splits' ``file_name``
            entries are relative to, e.g. ``train2017`` / ``val2017`` for COCO (default: ``root``);
            for ``"annotations"``, where the images (rasters) the files name are found.
        train_annotations, val_annotations: the splits' annotation files (``source: annotations``).
        annotation_format: the format of both annotation files (default: by extension).
        default_label: the label of every box of an annotation file without a ``label`` column.
        flips: random flips in training: horizontal and, unless ``vertical_flip`` is false,
            vertical (resizing is the model's job).
        vertical_flip: whether ``flips`` also flips vertically (false in COCO's papers).
        rot90: random 90-degree rotations in training.
        jitter: random colour jitter in training.
        scale_jitter: ``[lo, hi]`` zoom range of ``RandomScaleJitter`` (off by default: on NEON at
            1,000 iterations it cost about 3 AP, ``benchmarks/results/recipe.md``).
        jitter_strength: strength of the colour jitter.
        synthetic: options of the synthetic scenes (``source: synthetic``), the keys of
            :data:`SYNTHETIC_DEFAULTS` (:func:`write_synthetic_splits`).
        split: not a configuration key. ``None`` builds both splits; ``"train"`` or ``"val"`` only
            that one (the other is None in the tuple, ``val_json_path`` too for ``"train"``), so
            ``locconf eval`` needs neither the training annotations nor their images.
    """
    from ..data import CocoDetection, build_transforms, neon_trees

    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    wanted = ("train", "val") if split is None else (split,)
    root = Path(root)
    if source in ("neon-trees", "synthetic"):
        train_json, val_json = "train.json", "val.json"
        missing = any(not (root / f"{s}.json").is_file() for s in wanted)
        if missing and not fetch:
            raise FileNotFoundError(f"{root} holds no {source} data and data.fetch is false")
        if missing and source == "neon-trees":
            neon_trees(root)
        elif missing:
            write_synthetic_splits(root, **synthetic_options(synthetic))
    elif source == "annotations":
        (train_json, train_images), (val_json, val_images) = _converted_splits(
            root, train_annotations, val_annotations, train_images, val_images, annotation_format, default_label)
    elif source != "coco":
        raise ValueError(f"data.source must be 'neon-trees', 'synthetic', 'coco' or 'annotations', got {source!r}")
    needed = [f"data.{s}_json" for s, name in (("train", train_json), ("val", val_json)) if s in wanted and not name]
    if needed:
        what = "to train and evaluate" if split is None else "to train" if split == "train" else "to evaluate"
        raise ValueError(f"{' and '.join(needed)} {'is' if len(needed) == 1 else 'are'} required {what} "
                         "with data.source 'coco'")
    train_ds = val_ds = val_path = None
    if "train" in wanted:
        train_tf = build_transforms(train=True, flips=flips, vertical_flip=vertical_flip, rot90=rot90, jitter=jitter,
                                    scale_jitter=scale_jitter, jitter_strength=jitter_strength)
        train_ds = CocoDetection(root / (train_images or ""), root / train_json, transforms=train_tf)
    if "val" in wanted:
        val_path = root / val_json
        val_ds = CocoDetection(root / (val_images or ""), val_path)
    return train_ds, val_ds, val_path


def _converted_splits(root: Path, train_annotations: str | None, val_annotations: str | None,
                      train_images: str | None, val_images: str | None, annotation_format: str | None,
                      default_label: str) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """``(COCO file, image folder)`` of the two splits of ``data.source: annotations``, absolute
    (validation labels mapped to the training split's categories)."""
    from ..data.annotation_files import coco_file
    from ..data.coco import read_json

    if not train_annotations or not val_annotations:
        raise ValueError("data.train_annotations and data.val_annotations are required for data.source 'annotations'")
    out = []
    categories = None
    for split, name, folder in (("train", train_annotations, train_images), ("val", val_annotations, val_images)):
        images = (root / (folder or "")).resolve()
        given = (root / name).resolve()
        coco = coco_file(given, [images], annotation_format, categories=categories, default_label=default_label)
        if split == "train":
            data = read_json(coco)
            categories = data.get("categories") if isinstance(data, dict) else None
        # A converted file names its images by absolute path; a COCO file's are relative to its folder.
        out.append((coco, images if coco == given else Path("/")))
    return out[0], out[1]


def write_synthetic_splits(root: str | os.PathLike, num_train: int, num_val: int, image_size: int,
                           num_classes: int, seed: int) -> dict[str, tuple[int, Path]]:
    """Generate synthetic scenes into ``root`` as COCO: ``train`` with ``seed``, ``val`` with ``seed + 1``.

    Object scales ``sqrt(w * h)`` range from 1/16 to 3/8 of the image side (at least 4 and 8
    pixels). Returns each split's number of scenes and COCO file.

    Args:
        root: the folder of ``train.json``, ``val.json`` and the images.
        num_train: scenes of the training split.
        num_val: scenes of the validation split.
        image_size: side of the square scenes, in pixels.
        num_classes: object classes (shapes and colours) drawn.
        seed: seed of the training scenes; the validation scenes use ``seed + 1``.
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
    """``device``, else CUDA where there is one, else the CPU; a device this machine lacks is a ``ValueError``."""
    from ..engine.train import check_device

    return check_device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
