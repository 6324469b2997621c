"""From a configuration to a trained, evaluated detector: what ``locconf train|eval|predict|demo`` run.

A configuration is a dict (a YAML file) with four sections that map one to one onto the keyword
arguments of the functions they feed:

```yaml
model:                      # build_model(**model)
  arch: rcnn                # rcnn | one_stage | torchvision_frcnn
  quality: dir              # ... any keyword of the builder (locconf.models.build_rcnn here)
data:                       # build_datasets(**data)
  source: neon-trees        # neon-trees | synthetic | coco
  root: data/neon
train:                      # locconf.engine.train.train(model, dataset, **train)
  iterations: 3000
  out_dir: runs/neon_frcnn_r18
eval:                       # evaluate(...)
  methods: [nms, soft-linear, soft-gaussian]
```

No registries and no inheritance: unknown keys are errors that name the section and the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

log = logging.getLogger(__name__)

SECTIONS = ("model", "data", "train", "eval")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> dict[str, dict]:
    """Read a YAML configuration and check its sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    cfg = yaml.safe_load(path.read_text()) or {}
    return check_config(cfg, source=str(path))


def check_config(cfg: dict, source: str = "config") -> dict[str, dict]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: the configuration must be a mapping of sections {SECTIONS}")
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; expected {SECTIONS}")
    out = {}
    for name in SECTIONS:
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {type(section).__name__}")
        out[name] = dict(section)
    return out


def _call(fn, section: str, kwargs: dict, *args):
    """Call ``fn(*args, **kwargs)``, turning an unknown keyword into a ValueError naming it."""
    import inspect

    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section {section!r} (accepted: {sorted(params)})")
    return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------


def neon_recipe(two_stage: bool = True) -> dict[str, dict]:
    """The CPU recipe for NEON tree crowns (benchmarks/results/recipe.md): ``model`` and ``data`` keys.

    ResNet-18 C2-C4 -> P2-P5 FPN of 64 channels, one anchor size per level fitted to the crowns
    (16-128 px), 400 px tiles with flips, 90-degree rotations and box jitter; two-stage detectors
    also get anchor ratios fitted to the crowns (h/w 5-95th percentiles 0.71-1.44) and 256 RoIs per
    image. The demo, the accuracy benchmark and ``configs/neon_*_r18.yaml`` share it (a test keeps
    the configs in step). Returns fresh dicts.
    """
    model = dict(backbone="resnet18", fpn_channels=64, returned_layers=[1, 2, 3], anchor_sizes=[16, 32, 64, 128],
                 min_size=400, max_size=400, channels_last=True)
    if two_stage:
        model.update(aspect_ratios=[0.7, 1.0, 1.4], box_batch_size_per_image=256)
    data = dict(source="neon-trees", root="data/neon", flips=True, rot90=True, jitter=True)
    return {"model": model, "data": data}


ARCHS = ("rcnn", "one_stage", "torchvision_frcnn")


def build_model(arch: str = "rcnn", num_classes: int = 1, raw_candidates: bool = True,
                candidates_per_image: int = 1000, **kwargs: Any) -> nn.Module:
    """Build a detector from the ``model`` section.

    Args:
        arch: ``"rcnn"`` (:func:`locconf.models.build_rcnn`: Faster R-CNN FPN with an optional
            localization-quality head, ``quality: iou_net | dir | ...``), ``"one_stage"``
            (:func:`locconf.models.build_one_stage`: ``head: atss | clq | gfl``) or
            ``"torchvision_frcnn"`` (torchvision's own Faster R-CNN, the reference baseline).
        num_classes: object classes without the background.
        raw_candidates: return every scored candidate in evaluation, before any NMS, so that
            ``locconf.postprocess`` methods can be compared on the same candidates (locconf's own
            detectors always do; this switches torchvision's internal NMS off).
        candidates_per_image: how many candidates an image may return.
        **kwargs: the builder's own keyword arguments.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    if arch == "rcnn":
        from .models.rcnn import build_rcnn

        return _call(build_rcnn, "model", dict(kwargs, candidates_per_image=candidates_per_image), num_classes)
    if arch == "one_stage":
        from .models.one_stage import build_one_stage

        return _call(build_one_stage, "model", dict(kwargs, candidates_per_image=candidates_per_image), num_classes)
    from .models import build_torchvision_frcnn

    model = _call(build_torchvision_frcnn, "model", kwargs, num_classes)
    if raw_candidates:
        model.roi_heads.nms_thresh = 1.0  # "suppress IoU > 1": nothing is suppressed
        model.roi_heads.detections_per_img = candidates_per_image
    return model


def build_datasets(source: str = "neon-trees", root: str | os.PathLike = "data/neon", fetch: bool = True,
                   train_json: str | None = None, val_json: str | None = None, train_images: str | None = None,
                   val_images: str | None = None, flips: bool = True,
                   rot90: bool = True, jitter: bool = True, scale_jitter: Sequence[float] | None = None,
                   jitter_strength: float = 0.2, synthetic: dict | None = None):
    """Build ``(train_dataset, val_dataset, val_json_path)`` from the ``data`` section.

    Args:
        source: ``"neon-trees"`` (fetched and converted into ``root`` when missing),
            ``"synthetic"`` (generated into ``root`` when missing; options in ``synthetic``) or
            ``"coco"`` (``train_json`` and ``val_json`` relative to ``root``).
        train_images, val_images: folders (relative to ``root``) that the splits' ``file_name``
            entries are relative to, e.g. ``train2017`` / ``val2017`` for COCO (default: ``root``).
        flips, rot90, jitter: training augmentations (resizing is the model's job).
        scale_jitter: ``[lo, hi]`` zoom range of ``RandomScaleJitter`` (off by default: on NEON at
            1,000 iterations it cost about 3 AP, ``benchmarks/results/recipe.md``).
        jitter_strength: strength of the colour jitter.
    """
    from .data import CocoDetection, SyntheticScenes, build_transforms, neon_trees, write_synthetic_coco

    root = Path(root)
    if source in ("neon-trees", "synthetic"):
        train_json, val_json = "train.json", "val.json"
        missing = not (root / train_json).is_file() or not (root / val_json).is_file()
        if missing and not fetch:
            raise FileNotFoundError(f"{root} holds no {source} data and data.fetch is false")
        if missing and source == "neon-trees":
            neon_trees(root)
        elif missing:
            opts = {**dict(num_train=200, num_val=50, image_size=256, num_classes=3, seed=0), **(synthetic or {})}
            size = opts["image_size"]
            common = dict(image_size=size, num_classes=opts["num_classes"], min_size=max(4, size // 16),
                          max_size=max(8, size * 3 // 8))
            write_synthetic_coco(SyntheticScenes(opts["num_train"], seed=opts["seed"], **common), root, "train")
            write_synthetic_coco(SyntheticScenes(opts["num_val"], seed=opts["seed"] + 1, **common), root, "val")
    elif source != "coco":
        raise ValueError(f"data.source must be 'neon-trees', 'synthetic' or 'coco', got {source!r}")
    if not train_json or not val_json:
        raise ValueError("data.train_json and data.val_json are required for data.source 'coco'")
    train_tf = build_transforms(train=True, flips=flips, rot90=rot90, jitter=jitter, scale_jitter=scale_jitter,
                                jitter_strength=jitter_strength)
    train_ds = CocoDetection(root / (train_images or ""), root / train_json, transforms=train_tf)
    val_ds = CocoDetection(root / (val_images or ""), root / val_json)
    return train_ds, val_ds, root / val_json


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------
# Train, evaluate, predict
# --------------------------------------------------------------------------------------------


def run_train(cfg: dict[str, dict], resume: bool = False) -> dict:
    """Train the configured model; the configuration is saved beside the checkpoints."""
    from .engine.train import train

    train_cfg = dict(cfg["train"])
    out_dir = Path(train_cfg.setdefault("out_dir", "runs/default"))
    train_ds, _, _ = build_datasets(**cfg["data"])
    model = build_model(num_classes=train_ds.num_classes, **{k: v for k, v in cfg["model"].items() if k != "num_classes"})
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = dict(cfg, model=dict(cfg["model"], num_classes=train_ds.num_classes))
    (out_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return _call(train, "train", dict(train_cfg, resume=resume), model, train_ds)


def load_trained(checkpoint: str | os.PathLike, cfg: dict[str, dict] | None = None,
                 device: str | None = None) -> tuple[nn.Module, dict[str, dict]]:
    """Rebuild a model from its configuration (default: ``config.yaml`` beside the checkpoint)."""
    from .engine.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    if cfg is None:
        cfg = load_config(checkpoint.parent / "config.yaml")
    state = load_checkpoint(checkpoint)
    num_classes = int(cfg["model"].get("num_classes", 0))
    beside = checkpoint.parent / "config.yaml"
    if not num_classes and beside.is_file():  # run_train records it there
        num_classes = int((load_config(beside)["model"]).get("num_classes", 0))
    num_classes = num_classes or _num_classes_from_state(state["model"])
    model = build_model(num_classes=num_classes, **{k: v for k, v in cfg["model"].items() if k != "num_classes"})
    model.load_state_dict(state["model"])
    return model.to(_device(device)).eval(), cfg


def _num_classes_from_state(state: dict) -> int:
    for key, value in state.items():
        if key.endswith("cls_score.weight"):
            return value.shape[0] - 1
    raise ValueError("cannot infer num_classes from the checkpoint; set model.num_classes")


def run_eval(model: nn.Module, cfg: dict[str, dict], out_dir: str | os.PathLike,
             methods: Sequence[str] | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Candidates once, every method scored; writes results.json, table.md and the plots.

    ``results.json`` holds ``methods`` (metrics per method, overall and per site), ``correlation``
    (Pearson / Spearman of each confidence signal with the true IoU) and ``correlation_sites``
    (the same per site, where the images record one).
    """
    from .analysis import confidence_correlation, draw_detections, plot_confidence
    from .data import collate_fn
    from .engine.evaluate import collect_candidates, evaluate_methods, format_table
    from .postprocess import postprocess

    eval_cfg = dict(cfg["eval"])
    methods = list(methods or eval_cfg.pop("methods", ["nms", "soft-linear", "soft-gaussian"]))
    eval_cfg.pop("methods", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, val_ds, val_json = build_datasets(**cfg["data"])
    loader = torch.utils.data.DataLoader(val_ds, batch_size=1, collate_fn=collate_fn)
    candidates = collect_candidates(model, loader, _device(device), progress=progress)
    results = _call(evaluate_methods, "eval", dict(eval_cfg, progress=progress), candidates, str(val_json), methods,
                    val_ds.label_to_cat_id)
    correlation = confidence_correlation(candidates, val_ds)
    targets = [val_ds.target(i) for i in range(len(val_ds))]
    sites = sorted({t["site"] for t in targets if "site" in t})
    correlation_sites = {
        site: confidence_correlation([c for c, t in zip(candidates, targets) if t.get("site") == site],
                                     [t for t in targets if t.get("site") == site])
        for site in sites
    }
    plot_confidence(candidates, val_ds, out_dir / "confidence.png")
    first = methods[0] if methods[0] in results else next(iter(results))
    image, target = val_ds[0]
    dets = postprocess(candidates[0], first, **(eval_cfg.get("method_params") or {}).get(first, {}))
    draw_detections(image, dets, out_dir / "detections.png", gt=target, class_names=val_ds.class_names)
    table = format_table(results, per_site=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"methods": results, "correlation": correlation, "correlation_sites": correlation_sites}, indent=1))
    (out_dir / "table.md").write_text(table + "\n")
    return {"results": results, "correlation": correlation, "correlation_sites": correlation_sites, "table": table,
            "out_dir": str(out_dir)}


def predict(model: nn.Module, image_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "nms",
            score_threshold: float = 0.3, device: str | None = None) -> dict:
    """Detect objects in one image and draw them (score and, where predicted, quality)."""
    from .analysis import draw_detections
    from .data import load_image
    from .postprocess import postprocess

    image = load_image(image_path)
    with torch.no_grad():
        candidates = model([image.to(_device(device))])[0]
    dets = postprocess({k: v.cpu() for k, v in candidates.items()}, method)
    draw_detections(image, dets, out_path, score_threshold=score_threshold)
    return dets
