"""What one accuracy comparison trains: the settings (data + budget), the variants (detectors), and
the configuration of one (setting, variant, seed).

Kept free of torch at import time, so that ``locconf bench --help`` stays fast.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


@dataclass
class Setting:
    """The data and the budget shared by every variant of one comparison.

    ``model`` holds the keys every detector gets (backbone, FPN, image size, candidates);
    ``family_model`` / ``family_train`` the few keys that only make sense for one family
    (RPN anchors and RoI sampling of the two-stage detectors; the one-stage learning rate).
    """

    name: str
    description: str
    model: dict
    data: dict
    train: dict
    family_model: dict = field(default_factory=lambda: {"two_stage": {}, "one_stage": {}})
    family_train: dict = field(default_factory=lambda: {"two_stage": {}, "one_stage": {}})


@dataclass(frozen=True)
class Variant:
    """One detector of the comparison, as overrides of its setting's model section.

    ``reuse`` names the variant whose checkpoint this one evaluates (no training of its own);
    ``expects`` the candidate signals the detector should predict; ``headline`` the
    post-processing method its paper pairs it with.
    """

    name: str
    label: str
    family: str
    model: Mapping[str, Any]
    headline: str = "nms"
    expects: tuple[str, ...] = ()
    reuse: str | None = None


#: IoU-Net's jittered training boxes at CPU scale (64 per ground truth, 512 per image; build_rcnn's
#: default, 128 / 1000, is the paper's regime): every IoU-Net variant of the harness.
IOU_NET_CPU = {"iou_net_boxes_per_gt": 64, "iou_net_max_boxes_per_image": 512}

#: The variants of issue 7, in table order. ``baseline`` is the reference of every "vs baseline" delta.
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "Faster R-CNN (two-stage baseline)", "two_stage", {"arch": "rcnn"}),
    Variant("iou_net", "IoU-Net", "two_stage", {"arch": "rcnn", "quality": "iou_net", **IOU_NET_CPU},
            headline="iou-guided", expects=("quality",)),
    Variant("iou_net_refine", "IoU-Net + refinement after IoU-guided NMS (paper order; same weights, 5 steps, "
            "top 100)", "two_stage",
            {"arch": "rcnn", "quality": "iou_net", **IOU_NET_CPU, "refine_steps": 5},
            headline="iou-guided", expects=("quality",), reuse="iou_net"),
    Variant("dir", "DIR (hindsight, Purity x Integrity)", "two_stage", {"arch": "rcnn", "quality": "dir"},
            headline="quality", expects=("quality",)),
    Variant("dir_foresight", "DIR foresight (proposal features)", "two_stage",
            {"arch": "rcnn", "quality": "dir_foresight"}, headline="quality", expects=("quality",)),
    Variant("iou_direct", "Hindsight IoU, direct (no P&I)", "two_stage", {"arch": "rcnn", "quality": "iou_direct"},
            headline="quality", expects=("quality",)),
    Variant("kl", "KL-Loss (variance voting)", "two_stage", {"arch": "rcnn", "quality": "kl"},
            headline="var-voting+soft", expects=("variances",)),
    # One-stage: the score is each paper's ranking score (ATSS: cls x centerness; GFL, CLQ: the joint
    # score), so NMS is their own inference; ATSS's `quality` is its centerness, CLQ's its predicted
    # IoU, and GFL has none (locconf.models.one_stage).
    Variant("atss", "ATSS (one-stage; quality = centerness)", "one_stage", {"arch": "one_stage", "head": "atss"},
            expects=("quality",)),
    Variant("gfl", "GFL (one-stage, quality focal loss; joint score, no separate quality)", "one_stage",
            {"arch": "one_stage", "head": "gfl"}),
    Variant("clq", "CLQ (one-stage, joint cls-quality score; quality = predicted IoU)", "one_stage",
            {"arch": "one_stage", "head": "clq"}, expects=("quality",)),
)}
DEFAULT_VARIANTS = tuple(VARIANTS)
#: Not in the default list: torchvision's own Faster R-CNN, a reference and the harness's smoke test;
#: Cascade R-CNN (0.5 / 0.6 / 0.7) without and with DIR on its last stage (DIR Table 1, third block),
#: the DIR head trained on the last stage's positives (the paper's rule) or on its RoIs at IoU >= 0.5.
EXTRA_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("tv_frcnn", "torchvision Faster R-CNN (reference)", "two_stage", {"arch": "torchvision_frcnn"}),
    # torchvision's own detectors by builder name (locconf.models.build_torchvision) on the setting's
    # trunk, torchvision's heads and pyramid (P2-P6 / P3-P7, 256 channels), anchors from 16 px
    Variant("tv_fasterrcnn", "torchvision fasterrcnn_resnet50_fpn_v2 heads on the setting's trunk", "two_stage",
            {"arch": "torchvision", "name": "fasterrcnn_resnet50_fpn_v2", "anchor_sizes": [16, 32, 64, 128, 256]}),
    Variant("tv_retinanet", "torchvision retinanet_resnet50_fpn heads on the setting's trunk", "one_stage",
            {"arch": "torchvision", "name": "retinanet_resnet50_fpn", "anchor_sizes": [16, 32, 64, 128, 256]}),
    Variant("tv_fcos", "torchvision fcos_resnet50_fpn heads on the setting's trunk (quality = centerness)",
            "one_stage", {"arch": "torchvision", "name": "fcos_resnet50_fpn", "anchor_sizes": [8, 16, 32, 64, 128]},
            expects=("quality",)),
    Variant("cascade", "Cascade R-CNN (3 stages, IoU 0.5 / 0.6 / 0.7)", "two_stage",
            {"arch": "rcnn", "cascade": [0.5, 0.6, 0.7]}),
    Variant("cascade_dir", "Cascade R-CNN + DIR on the last stage", "two_stage",
            {"arch": "rcnn", "cascade": [0.5, 0.6, 0.7], "quality": "dir"}, headline="quality",
            expects=("quality",)),
    Variant("cascade_dir_q50", "Cascade R-CNN + DIR trained on the last stage's RoIs at IoU >= 0.5", "two_stage",
            {"arch": "rcnn", "cascade": [0.5, 0.6, 0.7], "quality": "dir", "cascade_quality_iou": 0.5},
            headline="quality", expects=("quality",)),
)}
#: Ablations that re-evaluate a trained variant's weights (``reuse``): DIR Table 5 (which confidence
#: ranks: Eq. 5's IoU, the default, against Purity, Integrity and their means), DIR Table 4 (proposal
#: or regressed-box features at training and at inference), and IoU-Net's refinement in the former
#: order (every candidate refined before post-processing). No training of their own.
ABLATION_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    *(Variant(f"dir_{c}", f"DIR, confidence = {label} (Table 5)", "two_stage",
              {"arch": "rcnn", "quality": "dir", "dir_confidence": c}, headline="quality", expects=("quality",),
              reuse="dir")
      for c, label in (("purity", "Purity only"), ("integrity", "Integrity only"),
                       ("geometric", "sqrt(Purity x Integrity)"), ("arithmetic", "(Purity + Integrity) / 2"))),
    Variant("dir_train_boxes_infer_proposals", "DIR, box features in training / proposal features at inference "
            "(Table 4)", "two_stage", {"arch": "rcnn", "quality": "dir", "dir_inference_features": "proposals"},
            headline="quality", expects=("quality",), reuse="dir"),
    Variant("dir_train_proposals_infer_boxes", "DIR, proposal features in training / box features at inference "
            "(Table 4)", "two_stage", {"arch": "rcnn", "quality": "dir_foresight", "dir_inference_features": "boxes"},
            headline="quality", expects=("quality",), reuse="dir_foresight"),
    Variant("iou_net_refine_before_nms", "IoU-Net + refinement of every candidate before post-processing "
            "(former order)", "two_stage",
            {"arch": "rcnn", "quality": "iou_net", **IOU_NET_CPU, "refine_steps": 5, "refine_order": "before_nms"},
            headline="iou-guided", expects=("quality",), reuse="iou_net"),
)}


def _iou_net_variants() -> dict[str, Variant]:
    """:data:`IOU_NET_VARIANTS`: per trained variant, its refinement with either score."""
    out = {}
    for tag, opts, text in (("w1", {"iou_net_loss_weight": 1.0}, "BCE, loss weight 1"),
                            ("w5", {"iou_net_loss_weight": 5.0}, "BCE, loss weight 5"),
                            ("sl1_w5", {"iou_net_loss": "smooth_l1", "iou_net_loss_weight": 5.0},
                             "smooth L1 on (IoU - 0.5) / 0.5, loss weight 5")):
        trained = f"iou_net_{tag}"
        model = {"arch": "rcnn", "quality": "iou_net", **IOU_NET_CPU, **opts}
        refine = {**model, "refine_steps": 5}
        for variant in (
                Variant(trained, f"IoU-Net ({text})", "two_stage", model, headline="iou-guided", expects=("quality",)),
                Variant(f"iou_net_refine_{tag}", f"IoU-Net ({text}) + refinement after IoU-guided NMS, score = "
                        "cluster-max class score (paper)", "two_stage", refine, headline="iou-guided",
                        expects=("quality",), reuse=trained),
                Variant(f"iou_net_refine_{tag}_cls_x_iou", f"IoU-Net ({text}) + refinement after IoU-guided NMS, "
                        "score = class x refined IoU (reimplementation)", "two_stage",
                        {**refine, "iou_net_score": "cls_x_iou"}, headline="iou-guided", expects=("quality",),
                        reuse=trained)):
            out[variant.name] = variant
    return out


#: Issue 29: IoU-Net's loss weight (1, the former default, against 5, the reimplementation's and now
#: build_rcnn's default), its smooth-L1 loss in the reimplementation's form, and the score of a refined box
#: (``iou_net_score``: the paper's cluster-max class score, or the reimplementation's class x refined IoU).
#: The weights and losses are pinned here, so that these runs keep their meaning whatever the defaults become;
#: the refinement and score variants re-evaluate the weights of their trained variant.
IOU_NET_VARIANTS: dict[str, Variant] = _iou_net_variants()
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS, **ABLATION_VARIANTS, **IOU_NET_VARIANTS}
BASELINE = "baseline"


def _setting(name: str, description: str, iterations: int, batch_size: int, model: dict, data: dict,
             lr: tuple[float, float] = (0.02, 0.01),
             two_stage: dict | None = None) -> Setting:
    """A setting with the schedule and per-family keys that NEON and synthetic share.

    ``model`` holds the keys of every detector (backbone, FPN, anchors sizes, image size);
    ``two_stage`` the RPN / RoI keys that only the two-stage detectors take.
    """
    return Setting(
        name=name,
        description=description,
        model={"backbone": "resnet18", "candidates_per_image": 1000, "channels_last": True, **model},
        family_model={"two_stage": {"box_batch_size_per_image": 128, "quality_representation_size": 256,
                                      **(two_stage or {})},
                      "one_stage": {}},
        # The papers' one-stage learning rate is half the two-stage one (ATSS/GFL 0.01 vs Faster
        # R-CNN 0.02 at batch 16); from scratch, a dense head at 0.02 was unstable (an early NEON baseline).
        family_train={"two_stage": {}, "one_stage": dict(lr=lr[1])},
        data=data,
        train=dict(iterations=int(iterations), batch_size=batch_size, lr=lr[0], warmup_iters=100, schedule="step",
                   steps=[0.7, 0.9], clip_grad_norm=10.0, checkpoint_every=250),
    )


def neon_setting(iterations: int | None = None, pretrained: bool = True) -> Setting:
    """NEON tree crowns on :func:`locconf.experiment.neon_recipe` (400 px, P2-P5 64 ch, batch 2).

    ``pretrained`` (setting ``neon``): ImageNet EfficientNet-Lite0, frozen BatchNorm and stem, lr 0.01
    (one-stage 0.005), 1500 iterations by default (benchmarks/results/recipe_pretrained.md).
    From scratch (setting ``neon-scratch``): ResNet-18, lr 0.02 (one-stage 0.01), 600 iterations by
    default, what 18 trainings (9 detectors x 2 seeds) afford on two CPU cores in about two hours.
    """
    from locconf.experiment import neon_recipe  # imports torch: not at module import

    shared, two_stage = neon_recipe(False, pretrained), neon_recipe(True, pretrained)
    name, default, init = ("neon", 1500, "ImageNet EfficientNet-Lite0") if pretrained else \
        ("neon-scratch", 600, "ResNet-18 from scratch")
    return _setting(
        name, f"NEON tree crowns (train: YELL tiles; val: held-out YELL band + OSBS + SOAP), {init}",
        default if iterations is None else iterations, 2,
        model=shared["model"],
        two_stage={k: v for k, v in two_stage["model"].items() if k not in shared["model"]},
        data=shared["data"], lr=(two_stage["train"]["lr"], shared["train"]["lr"]))


def synthetic_setting(iterations: int | None = None) -> Setting:
    """Synthetic scenes, 3 classes, 128 px (objects 8-48 px), P2-P5 64 ch, batch 4.

    Sized so that a from-scratch detector trains in a few minutes on one CPU thread.
    """
    return _setting(
        "synthetic", "synthetic scenes (3 classes, 128 px, 400 train / 100 val, exact boxes), from scratch",
        800 if iterations is None else iterations, 4,
        model=dict(fpn_channels=64, returned_layers=[1, 2, 3], anchor_sizes=[8, 16, 32, 64],
                   min_size=128, max_size=128),
        # A 256-wide box head (torchvision's is 1024): at 128 px its two fc layers on 4 x 128 RoIs
        # cost more than the backbone, and the synthetic shapes need no more.
        two_stage=dict(representation_size=256),
        data=dict(source="synthetic", root="data/synthetic128",
                  synthetic=dict(num_train=400, num_val=100, image_size=128, num_classes=3, seed=0)))


SETTINGS = {"neon": neon_setting, "neon-scratch": lambda iterations=None: neon_setting(iterations, pretrained=False),
            "synthetic": synthetic_setting}


#: The setting keys a torchvision detector (``arch: torchvision``) takes, under build_torchvision's names;
#: the others (FPN width and stages, anchors of locconf's pyramids, ...) are locconf's builders' own.
_TORCHVISION_KEYS = {"backbone": "backbone", "weights": "backbone_weights", "norm": "backbone_norm",
                     "frozen_stages": "backbone_frozen_stages", "min_size": "min_size", "max_size": "max_size",
                     "candidates_per_image": "candidates_per_image",
                     "box_batch_size_per_image": "box_batch_size_per_image",
                     "rpn_batch_size_per_image": "rpn_batch_size_per_image"}


def make_config(setting: Setting, variant: Variant, seed: int, out_dir: str | Path,
                num_classes: int | None = None, amp: bool | None = None) -> dict:
    """The full configuration (model/data/train/eval sections) of one variant and seed.

    The model section is the setting's shared keys, then its family's keys, then the variant's
    overrides (a torchvision detector, ``arch: torchvision``, takes of the first two the keys of
    :data:`_TORCHVISION_KEYS`, renamed); the train section the setting's budget, its family's keys, the seed and ``out_dir``,
    and ``amp`` when given (mixed precision on CUDA; None leaves ``train()``'s default).
    """
    if variant.family not in ("two_stage", "one_stage"):
        raise ValueError(f"variant {variant.name!r}: family must be 'two_stage' or 'one_stage', got {variant.family!r}")
    shared = {**copy.deepcopy(setting.model), **copy.deepcopy(setting.family_model.get(variant.family, {}))}
    if variant.model.get("arch") == "torchvision":  # build_torchvision's names for the keys it shares
        shared = {_TORCHVISION_KEYS[k]: v for k, v in shared.items() if k in _TORCHVISION_KEYS}
    model = {**shared, **copy.deepcopy(dict(variant.model))}
    if model.get("arch") == "torchvision_frcnn":  # torchvision's box head has no quality branch
        model.pop("quality_representation_size", None)
    if num_classes is not None:
        model["num_classes"] = int(num_classes)
    train = {**copy.deepcopy(setting.train), **copy.deepcopy(setting.family_train.get(variant.family, {})),
             "seed": int(seed), "out_dir": str(out_dir)}
    if amp is not None:
        train["amp"] = bool(amp)
    return {"model": model, "data": copy.deepcopy(setting.data), "train": train, "eval": {}}


def budget_text(setting: Setting) -> str:
    """One line describing the budget every variant of ``setting`` gets (the report's "Budget")."""
    t, m = setting.train, setting.model
    return (f"{t['iterations']} iterations x batch {t['batch_size']}, SGD lr {t['lr']} (one-stage "
            f"{setting.family_train.get('one_stage', {}).get('lr', t['lr'])}), warm-up {t.get('warmup_iters', 0)}, "
            f"{t.get('schedule', 'step')} decay at {t.get('steps', [0.7, 0.9])}; {m['backbone']}-FPN {m['fpn_channels']} ch "
            f"(stages {m['returned_layers']}), images {m['min_size']}-{m['max_size']} px, "
            f"{m['candidates_per_image']} candidates/image, "
            + (f"{m['weights']} weights" if m.get("weights") else "from scratch"))
