"""Faster R-CNN FPN (optionally Mask R-CNN) whose RoI stage also predicts how well each box fits.

Built from torchvision's parts (ResNet or timm backbone + FPN, anchor generator, RPN,
``MultiScaleRoIAlign``, the mask head) with locconf's own RoI stage
(:class:`locconf.models.roi_heads.RoIHeads`, or Cascade R-CNN's stages,
:class:`locconf.models.cascade.CascadeRoIHeads`); this module holds the detector and its builder.

:meth:`RCNN.candidates` stops at **candidates** (``docs/design.md``): every class-specific box whose
score exceeds ``score_thresh``, before any NMS, with the signal its head predicts
(:class:`locconf.candidates.Candidates`). ``locconf.postprocess.postprocess`` turns them into detections;
:meth:`RCNN.detect` does it with the head's default method, and so does ``model(images)`` in
evaluation (torchvision's convention: final detections).
"""


from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ..heads import TWO_STAGE_HEADS, HeadContext
from ..heads.iou_net import IOU_NET_SCORES
from ..postprocess import check_method, postprocess
from ..prroi_pool import MultiScalePrRoIPool
from .backbone import build_fpn_backbone
from .cascade import CascadeRoIHeads
from .inputs import check_detection_inputs
from .pretrained_io import SavePretrained
from .roi_heads import BOX_LOSSES, REFINE_ORDERS, BoxHead, RoIHeads

__all__ = ["build_rcnn", "RCNN", "RoIHeads", "BoxHead", "CascadeRoIHeads", "QUALITY_HEADS", "DEFAULT_METHODS",
           "REFINE_ORDERS", "BOX_LOSSES", "BOX_POOLS"]

_HEADS = {head.name: head for head in TWO_STAGE_HEADS}
#: ``quality=`` names: None (plain Faster R-CNN) and each head of :data:`locconf.heads.TWO_STAGE_HEADS`.
QUALITY_HEADS = (None, *_HEADS)
BOX_POOLS = ("roi_align", "prroi")

#: The post-processing each head's paper uses (``RCNN.detect``'s default), by its name in
#: :data:`locconf.postprocess.METHODS`.
DEFAULT_METHODS = {None: "nms", **{name: head.default_method for name, head in _HEADS.items()}}


class RCNN(SavePretrained, nn.Module):
    """Faster R-CNN / Mask R-CNN with a localization-quality head (see :func:`build_rcnn`).

    ``model(images, targets)`` returns a dict of named losses in training; ``model(images)`` in
    evaluation the final detections (:meth:`detect`); :meth:`candidates` the per-image candidates
    (:class:`locconf.candidates.Candidates`) in the input images' coordinates.
    """

    #: Detections per image that :meth:`detect` (and so ``model(images)`` in evaluation) keeps by default.
    max_detections = 100

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: GeneralizedRCNNTransform, num_classes: int, quality: Optional[str]) -> None:
        super().__init__()
        self.backbone, self.rpn, self.roi_heads, self.transform = backbone, rpn, roi_heads, transform
        self.num_classes, self.quality = num_classes, quality

    @property
    def default_method(self) -> str:
        """The post-processing of this head's paper (used by :meth:`detect`)."""
        return DEFAULT_METHODS[self.quality]

    def _run(self, images, targets=None):
        check_detection_inputs(images, targets, self.num_classes, need_targets=self.training)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, targets = self.transform(list(images), targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        out = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return out, rpn_losses, features, batch.image_sizes, original_sizes

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        """Training: the dict of named losses. Evaluation: the final detections (:meth:`detect`
        with the head's own method), as torchvision's detectors return; :meth:`candidates` gives
        the candidates before post-processing."""
        if not self.training:
            return self.detect(images)
        out, rpn_losses, _, _, _ = self._run(images, targets)
        return {**rpn_losses, **out}

    @torch.no_grad()
    def candidates(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per image, every candidate before post-processing (:class:`locconf.candidates.Candidates`)
        in the input images' coordinates. Runs in evaluation mode; the module's mode is restored."""
        was_training = self.training
        self.eval()
        try:
            out, _, _, sizes, original = self._run(images)
        finally:
            self.train(was_training)
        return [_rescale(c, s, o) for c, s, o in zip(out, sizes, original)]

    @torch.no_grad()
    def detect(self, images: list[Tensor], method: Optional[str] = None, max_detections: Optional[int] = None,
               **params) -> list[dict[str, Tensor]]:
        """Final detections: candidates post-processed with ``method`` (default: the head's own,
        :data:`DEFAULT_METHODS`), at most ``max_detections`` per image (default
        :attr:`max_detections`); with a mask head, ``masks`` (n, 1, H, W) probabilities too."""
        method = method or self.default_method
        check_method(method)  # before running the network
        max_detections = self.max_detections if max_detections is None else max_detections
        was_training = self.training
        self.eval()
        try:
            cands, _, features, sizes, original = self._run(images)
            dets = [postprocess(_rescale(c, s, o), method, max_detections, **params)
                    for c, s, o in zip(cands, sizes, original)]
            if self.roi_heads.has_mask:
                boxes = [_scale_boxes(d["boxes"], o, s) for d, s, o in zip(dets, sizes, original)]
                probs = self.roi_heads.mask_logits(features, boxes, sizes).sigmoid()
                for d, p, o in zip(dets, probs.split([len(b) for b in boxes]), original):
                    p = p[torch.arange(len(p), device=p.device), d["labels"]][:, None]
                    d["masks"] = paste_masks_in_image(p, d["boxes"], o)
            return dets
        finally:
            self.train(was_training)


def _scale_boxes(boxes: Tensor, from_size, to_size) -> Tensor:
    ry, rx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([rx, ry, rx, ry])


def _rescale(cand: dict[str, Tensor], size, original) -> dict[str, Tensor]:
    """Candidates from resized-image to input-image coordinates (variances by the squared ratio)."""
    out = dict(cand, boxes=_scale_boxes(cand["boxes"], size, original))
    if "variances" in cand:
        ry, rx = original[0] / size[0], original[1] / size[1]
        out["variances"] = cand["variances"] * cand["variances"].new_tensor([rx, ry, rx, ry]) ** 2
    return out


def build_rcnn(
    num_classes: int,
    *,
    quality: Optional[str] = None,
    backbone: str = "resnet18",
    weights: Optional[str | os.PathLike] = None,
    class_agnostic_box: bool = True,
    mask: bool = False,
    fpn_channels: int = 128,
    returned_layers: Sequence[int] = (2, 3, 4),
    norm: str = "batch",
    norm_groups: int = 16,
    frozen_stages: int = -1,
    anchor_sizes: Optional[Sequence[float]] = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 400,
    max_size: int = 1333,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    representation_size: int = 1024,
    quality_representation_size: Optional[int] = None,
    box_batch_size_per_image: int = 128,
    box_positive_fraction: float = 0.25,
    score_thresh: float = 0.05,
    candidates_per_image: int = 1000,
    quality_thresh: float = 0.05,
    refine_steps: int = 0,
    refine_step_size: float = 0.5,
    iou_net_boxes_per_gt: int = 128,
    iou_net_max_boxes_per_image: int = 1000,
    iou_net_loss: str = "bce",
    iou_net_loss_weight: float = 5.0,
    iou_net_score: str = "cluster_max",
    iou_net_class_aware: bool = False,
    refine_keep_best: bool = False,
    refine_order: str = "after_nms",
    refine_top_k: int = 100,
    dir_confidence: str = "iou",
    dir_train_features: Optional[str] = None,
    dir_inference_features: Optional[str] = None,
    box_loss: str = "smooth_l1",
    giou_weight: float = 10.0,
    box_pool: str = "roi_align",
    cascade: Optional[Sequence[float]] = None,
    cascade_loss_weights: Optional[Sequence[float]] = None,
    cascade_quality_iou: Optional[float] = None,
    channels_last: bool = False,
) -> RCNN:
    """Build a Faster R-CNN FPN (Mask R-CNN with ``mask=True``) with a localization-quality head.

    Args:
        num_classes: object classes, background excluded (labels ``1..num_classes``).
        quality: ``None`` (plain Faster R-CNN), ``"iou_net"``, ``"dir"``, ``"dir_foresight"``,
            ``"iou_direct"`` or ``"kl"`` (:mod:`locconf.heads`).
        backbone: ``"resnet18"`` | ``"resnet34"`` | ``"resnet50"`` (torchvision) or any timm model
            with ``features_only`` (e.g. ``"efficientnet_lite0"``).
        weights: ``None`` (random), ``"imagenet"`` (weights that install with pip:
            ``efficientnet_lite0`` .. ``lite2``) or a local file; nothing is downloaded.
        class_agnostic_box: one regressed box per RoI (DIR's setting) or one per class.
        mask: add torchvision's mask head (targets then need ``masks`` (M, H, W)).
        fpn_channels, returned_layers, norm, norm_groups, frozen_stages: the backbone
            (:func:`locconf.models.backbone.build_fpn_backbone`); ``(2, 3, 4)`` gives P3-P6,
            ``(1, 2, 3, 4)`` the paper's P2-P6. With pretrained weights use ``norm="frozen"``.
        anchor_sizes: one size per pyramid level (default ``16 * 2**i``, sized for small objects;
            the COCO setting is 32-512).
        aspect_ratios: the anchors' height / width ratios, the same at every level.
        min_size, max_size: resize rule of the input images.
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test: proposals kept per level and image before
            the RPN's NMS, in training / at inference.
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: proposals kept per image after the
            RPN's NMS, in training / at inference.
        rpn_batch_size_per_image: anchors sampled per image for the RPN's losses.
        representation_size: width of the box head's two FC layers.
        quality_representation_size: width of the quality branches' hidden layers (default:
            ``representation_size``; the papers use 1024).
        box_batch_size_per_image, box_positive_fraction: RoI sampling (512 / 0.25 in the papers).
        score_thresh: smallest class score of a candidate.
        candidates_per_image: most candidates per image.
        quality_thresh: DIR's threshold ``a`` on the class score above which quality is predicted.
        refine_steps, refine_step_size: IoU-Net refinement of the candidates at inference
            (``quality="iou_net"`` only; 0 = off, the paper uses 5 steps of 0.5).
        iou_net_boxes_per_gt, iou_net_max_boxes_per_image: jittered IoU-balanced training boxes of
            IoU-Net per ground truth, and a per-image cap (a uniform random subset beyond it). The
            reimplementation trains on about 1000 per image, and 128 / 1000 (the default) is that
            regime (:class:`locconf.heads.IoUNetHead`); the CPU-scale configs and the accuracy
            harness use 64 / 512 (each box costs a PrRoIPool and a pass of the MLP).
        iou_net_loss: ``"bce"`` (default, as the reimplementation found it 0.3 AP better) or
            ``"smooth_l1"`` (the paper's, per the reimplementation, in its form: a linear output
            regressed on ``(IoU - 0.5) / 0.5``; :class:`locconf.heads.IoUNetHead`).
        iou_net_loss_weight: scale of IoU-Net's loss (5.0, the reimplementation's, for either
            loss; ``benchmarks/results/iou_net_weight_synthetic`` compares it with 1.0).
        iou_net_score: the score of a box refined by IoU-Net (``refine_steps > 0``,
            ``refine_order="after_nms"``): ``"cluster_max"`` (default, Algorithm 1: the best class
            score of its IoU-guided NMS cluster) or ``"cls_x_iou"`` (that times its refined
            predicted IoU, the reimplementation's ``use_iou_score``).
        iou_net_class_aware: one IoU output per class, the paper's predictor (default False: one
            class-agnostic output, like DIR's; the same model with one class).
        refine_keep_best: IoU-Net refinement stops as the paper's Algorithm 2 states (False, the
            default: a box keeps the step that stopped it) or undoes a step that lowers the
            predicted IoU by more than ``max_drop`` and returns the best box visited (True).
        refine_order, refine_top_k: where the refinement runs (:class:`RoIHeads`): ``"after_nms"``
            (default, IoU-Net's inference: IoU-guided NMS, then the ``refine_top_k`` = 100
            highest-scoring kept boxes are refined; the model then returns those detections) or
            ``"before_nms"`` (every candidate refined, then any post-processing).
        dir_confidence: DIR's localization confidence at inference (Table 5; ``quality="dir"`` or
            ``"dir_foresight"``): ``"iou"`` (Eq. 5, the paper's), ``"purity"``, ``"integrity"``,
            ``"geometric"``, ``"arithmetic"`` (:class:`locconf.heads.DIRHead`).
        dir_train_features, dir_inference_features: DIR's features in training / at inference
            (Table 4): ``"boxes"`` (hindsight) or ``"proposals"`` (foresight); None: the head's own
            (``"boxes"`` for ``"dir"``, ``"proposals"`` for ``"dir_foresight"``).
        box_loss, giou_weight: the box regression loss, ``"smooth_l1"`` (the papers') or
            ``"giou"`` (:class:`RoIHeads`); KL-Loss replaces it with its own.
        box_pool: the box head's pooling of the RoIs, ``"roi_align"`` (torchvision's
            ``MultiScaleRoIAlign``, 7 x 7, 2 samples per bin) or ``"prroi"`` (Precise RoI Pooling,
            :class:`locconf.prroi_pool.MultiScalePrRoIPool`, 7 x 7: IoU-Net's pooling, Sec. 3.3,
            which its IoU head always uses; here an option for the box head of any detector). DIR's
            own pooling of the regressed boxes uses the same operator, so that its proposal and box
            features (Table 4's rows) come from one operator.
        cascade: Cascade R-CNN (:mod:`locconf.models.cascade`): the stages' IoU thresholds, e.g.
            ``(0.5, 0.6, 0.7)`` (the paper's); one box head per stage, class-agnostic regression,
            the quality head on the last stage (not KL-Loss, not masks). None: one stage.
        cascade_loss_weights: the stages' loss weights (default 1, 0.5, 0.25, MMDetection's).
        cascade_quality_iou: which last-stage RoIs train a cascade's quality head: None (default,
            DIR's rule: the last stage's positives, IoU >= 0.7) or an IoU, e.g. 0.5, above which
            every sampled RoI counts (:class:`CascadeRoIHeads`' ``quality_fg_iou``; on NEON the
            default head never sees a box below 0.7 and ranks the candidates inversely).
        channels_last: use the channels-last memory format (faster convolutions on CPU).

    The model's ``model_config`` holds these arguments with ``arch="rcnn"``: the ``model`` section
    of a configuration that rebuilds it (what :func:`locconf.models.save_pretrained` writes).
    """
    arguments = dict(locals())
    head_options = dict(iou_net_boxes_per_gt=iou_net_boxes_per_gt, iou_net_max_boxes_per_image=iou_net_max_boxes_per_image,
                        iou_net_loss=iou_net_loss, iou_net_loss_weight=iou_net_loss_weight,
                        iou_net_score=iou_net_score, refine_keep_best=refine_keep_best,
                        iou_net_class_aware=iou_net_class_aware, dir_confidence=dir_confidence,
                        dir_train_features=dir_train_features, dir_inference_features=dir_inference_features)
    _check_arguments(num_classes, quality, refine_steps, refine_step_size, head_options, box_pool,
                     representation_size, score_thresh, quality_thresh, candidates_per_image, min_size, max_size,
                     cascade, cascade_loss_weights, mask, class_agnostic_box)
    _check_iou_net_options(quality, head_options, refine_steps, refine_order)
    if box_batch_size_per_image < 1 or not 0 < box_positive_fraction <= 1:
        raise ValueError(f"box_batch_size_per_image must be >= 1 and box_positive_fraction in (0, 1], got "
                         f"{box_batch_size_per_image}, {box_positive_fraction}")
    if cascade_quality_iou is not None and (cascade is None or quality not in ("dir", "dir_foresight", "iou_direct")):
        raise ValueError(f"cascade_quality_iou needs cascade and a quality head trained on the RoIs' boxes "
                         f"('dir', 'dir_foresight', 'iou_direct'), got cascade={cascade!r}, quality={quality!r}")
    layers = list(returned_layers)
    body = build_fpn_backbone(backbone, fpn_channels=fpn_channels, returned_layers=layers, norm=norm,
                              norm_groups=norm_groups, weights=weights, frozen_stages=frozen_stages)
    rpn = _build_rpn(fpn_channels, len(layers) + 1, anchor_sizes, aspect_ratios, rpn_batch_size_per_image,
                     (rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test), (rpn_post_nms_top_n_train, rpn_post_nms_top_n_test))
    names = [str(i) for i in range(len(layers))]
    box_head = BoxHead(fpn_channels * 49, representation_size, num_classes, class_agnostic_box)
    q_size = quality_representation_size or representation_size
    context = HeadContext(fpn_channels, names, 7, q_size, representation_size, box_head.box_groups, num_classes,
                          box_pool)
    quality_head = None if quality is None else _HEADS[quality].from_options(context, head_options)
    mask_parts = (None, None, None)
    if mask:
        mask_parts = (MultiScaleRoIAlign(names, 14, sampling_ratio=2),
                      MaskRCNNHeads(fpn_channels, (256, 256, 256, 256), 1),
                      MaskRCNNPredictor(256, 256, num_classes + 1))
    roi_options = dict(
        batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
        score_thresh=score_thresh, candidates_per_image=candidates_per_image, quality_thresh=quality_thresh,
        refine_steps=refine_steps, refine_step_size=refine_step_size, box_loss=box_loss, giou_weight=giou_weight,
        refine_order=refine_order, refine_top_k=refine_top_k)
    if box_pool == "prroi":
        box_pool = MultiScalePrRoIPool(names, 7)
    else:
        box_pool = MultiScaleRoIAlign(names, 7, sampling_ratio=2)
    if cascade is not None:
        heads = [BoxHead(fpn_channels * 49, representation_size, num_classes, True) for _ in cascade[:-1]]
        roi_heads = CascadeRoIHeads(box_pool, [*heads, box_head], cascade, quality_head,
                                    stage_loss_weights=cascade_loss_weights, quality_fg_iou=cascade_quality_iou,
                                    **roi_options)
    else:
        roi_heads = RoIHeads(box_pool, box_head, quality_head, *mask_parts, **roi_options)
    transform = GeneralizedRCNNTransform(min_size, max_size, list(body.image_mean), list(body.image_std))
    model = RCNN(body, rpn, roi_heads, transform, num_classes, quality)
    model.model_config = {"arch": "rcnn", **arguments}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_arguments(num_classes, quality, refine_steps, refine_step_size, head_options, box_pool,
                     representation_size, score_thresh, quality_thresh, candidates_per_image, min_size, max_size,
                     cascade, cascade_loss_weights, mask, class_agnostic_box) -> None:
    """:func:`build_rcnn`'s argument checks, before anything is built."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1 (background excluded), got {num_classes!r}")
    if quality not in QUALITY_HEADS:
        raise ValueError(f"quality must be one of {QUALITY_HEADS}, got {quality!r}")
    if refine_steps and quality != "iou_net":
        raise ValueError(f"refine_steps needs quality='iou_net' (the refinement climbs IoU-Net's prediction), "
                         f"got quality={quality!r}")
    dir_set = (head_options["dir_confidence"] != "iou" or head_options["dir_train_features"] is not None
               or head_options["dir_inference_features"] is not None)
    if quality not in ("dir", "dir_foresight") and dir_set:
        raise ValueError(f"dir_confidence, dir_train_features and dir_inference_features need quality='dir' or "
                         f"'dir_foresight', got quality={quality!r}")
    if head_options["iou_net_class_aware"] and quality != "iou_net":
        raise ValueError(f"iou_net_class_aware needs quality='iou_net', got quality={quality!r}")
    if box_pool not in BOX_POOLS:
        raise ValueError(f"box_pool must be one of {BOX_POOLS}, got {box_pool!r}")
    if refine_steps < 0 or refine_step_size < 0:
        raise ValueError(f"refine_steps and refine_step_size must be >= 0, got {refine_steps}, {refine_step_size}")
    if representation_size < 1:
        raise ValueError(f"representation_size must be >= 1, got {representation_size}")
    if not 0 <= score_thresh < 1 or not 0 <= quality_thresh < 1:
        raise ValueError(f"score_thresh and quality_thresh must be in [0, 1), got {score_thresh}, {quality_thresh}")
    if candidates_per_image < 1:
        raise ValueError(f"candidates_per_image must be >= 1, got {candidates_per_image}")
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if cascade is not None:
        if isinstance(cascade, (str, bytes)) or not isinstance(cascade, Sequence) or len(cascade) < 1:
            raise ValueError(f"cascade must be a sequence of IoU thresholds, e.g. (0.5, 0.6, 0.7), got {cascade!r}")
        if mask or not class_agnostic_box:
            raise ValueError("cascade needs mask=False and class_agnostic_box=True (Cascade R-CNN's regressors "
                             "are class-agnostic)")
    elif cascade_loss_weights is not None:
        raise ValueError("cascade_loss_weights needs cascade")


def _check_iou_net_options(quality, head_options, refine_steps, refine_order) -> None:
    """:func:`build_rcnn`'s checks of IoU-Net's loss weight and score option."""
    weight = head_options["iou_net_loss_weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"iou_net_loss_weight must be a finite number >= 0, got {weight!r}")
    score = head_options["iou_net_score"]
    if score not in IOU_NET_SCORES:
        raise ValueError(f"iou_net_score must be one of {IOU_NET_SCORES}, got {score!r}")
    if score != "cluster_max" and (quality != "iou_net" or not refine_steps or refine_order != "after_nms"):
        raise ValueError(f"iou_net_score={score!r} scores the boxes IoU-Net refines after IoU-guided NMS: it needs "
                         f"quality='iou_net', refine_steps > 0 and refine_order='after_nms', got quality={quality!r}, "
                         f"refine_steps={refine_steps!r}, refine_order={refine_order!r}")


def _build_rpn(fpn_channels: int, num_levels: int, anchor_sizes: Optional[Sequence[float]],
               aspect_ratios: Sequence[float], batch_size_per_image: int, pre_nms_top_n: tuple[int, int],
               post_nms_top_n: tuple[int, int]) -> RegionProposalNetwork:
    """torchvision's RPN with one anchor size per level (default ``16 * 2**i``); ``*_top_n`` are
    (training, testing) counts per level and image."""
    anchor_sizes = tuple(anchor_sizes) if anchor_sizes is not None else tuple(16.0 * 2**i for i in range(num_levels))
    if len(anchor_sizes) != num_levels:
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({num_levels}), got {len(anchor_sizes)}")
    if not all(float(s) > 0 for s in anchor_sizes):
        raise ValueError(f"anchor_sizes must be positive, got {list(anchor_sizes)}")
    if len(aspect_ratios) == 0 or not all(float(a) > 0 for a in aspect_ratios):
        raise ValueError(f"aspect_ratios must be a non-empty list of positive ratios, e.g. [0.5, 1.0, 2.0], "
                         f"got {list(aspect_ratios)}")
    for name, value in (("rpn_batch_size_per_image", batch_size_per_image),
                        ("rpn_pre_nms_top_n_train", pre_nms_top_n[0]), ("rpn_pre_nms_top_n_test", pre_nms_top_n[1]),
                        ("rpn_post_nms_top_n_train", post_nms_top_n[0]),
                        ("rpn_post_nms_top_n_test", post_nms_top_n[1])):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    anchors = AnchorGenerator(sizes=tuple((float(s),) for s in anchor_sizes),
                              aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * num_levels)
    return RegionProposalNetwork(
        anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=dict(training=pre_nms_top_n[0], testing=pre_nms_top_n[1]),
        post_nms_top_n=dict(training=post_nms_top_n[0], testing=post_nms_top_n[1]), nms_thresh=0.7)
