"""Faster R-CNN FPN (optionally Mask R-CNN) whose RoI stage also predicts how well each box fits.

Built from torchvision's parts (ResNet + FPN, anchor generator, RPN, ``MultiScaleRoIAlign``, the
mask head) with locconf's own RoI stage, split into small steps instead of one monolithic forward:

``sample`` (match proposals to ground truth, sample a balanced batch) -> ``_forward_box``
(pool, box head, classifier and regressor) -> ``_box_losses`` -> the quality head's ``loss`` /
``predict`` (:mod:`locconf.heads`, one file per method) -> ``_candidates`` -> ``_forward_mask``.

In evaluation the model stops at **candidates** (``docs/design.md``): every class-specific box whose
score exceeds ``score_thresh``, before any NMS, with the signal its head predicts
(:class:`locconf.candidates.Candidates`). ``locconf.postprocess.postprocess`` turns them into detections;
:meth:`RCNN.detect` does it with the head's default method.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_loss, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import box_iou as tv_box_iou

from ..boxes import clip_boxes, decode_boxes, decode_corners, encode_boxes, encode_corners
from ..heads import DirectIoUHead, DIRHead, ForesightDIRHead, IoUNetHead, KLHead, RoIBatch
from ..losses import giou_loss
from ..postprocess import check_method, postprocess
from .backbone import build_fpn_backbone
from .inputs import check_detection_inputs

__all__ = ["build_rcnn", "RCNN", "RoIHeads", "BoxHead", "QUALITY_HEADS", "DEFAULT_METHODS", "REFINE_ORDERS"]

QUALITY_HEADS = (None, "iou_net", "dir", "dir_foresight", "iou_direct", "kl")
BOX_LOSSES = ("smooth_l1", "giou")
REFINE_ORDERS = ("after_nms", "before_nms")

#: The post-processing each head's paper uses (``RCNN.detect``'s default), by its name in
#: :data:`locconf.postprocess.METHODS`.
DEFAULT_METHODS = {None: "nms", "iou_net": "iou-guided", "dir": "quality", "dir_foresight": "quality",
                   "iou_direct": "quality", "kl": "var-voting+soft"}


class BoxHead(nn.Module):
    """Two fully connected layers, a classifier and a box regressor (Fast R-CNN's head).

    Args:
        in_features: flattened pooled features C * S * S.
        representation_size: width R of the two FC layers.
        num_classes: object classes K (the classifier has K + 1 outputs, 0 = background).
        class_agnostic: one box per RoI (4 outputs) instead of one per class (4 (K + 1)).
    """

    def __init__(self, in_features: int, representation_size: int, num_classes: int, class_agnostic: bool) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.box_groups = 1 if class_agnostic else num_classes + 1
        self.bbox_pred = nn.Linear(representation_size, 4 * self.box_groups)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C, S, S) -> ``(representation (N, R), class logits (N, K + 1), deltas (N, 4 G))``."""
        x = F.relu(self.fc7(F.relu(self.fc6(pooled.flatten(1)))))
        return x, self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """The second stage: box classification and regression, a quality head, an optional mask head.

    Args:
        box_pool: pooling of proposal features (``MultiScaleRoIAlign``).
        box_head: :class:`BoxHead`.
        quality_head: a head of :mod:`locconf.heads`, or None (plain Faster R-CNN).
        mask_pool, mask_head, mask_predictor: torchvision's Mask R-CNN parts, or all None.
        fg_iou_thresh, bg_iou_thresh: proposal-to-ground-truth IoU for foreground / background.
        batch_size_per_image, positive_fraction: RoI sampling.
        score_thresh: smallest class score a candidate keeps (0.05).
        candidates_per_image: most candidates an image returns (highest scores first).
        quality_thresh: DIR's ``a``: the quality is predicted only for candidates whose score
            exceeds it (the others get quality 0); at most ``score_thresh`` it covers them all.
        refine_steps, refine_step_size: IoU-Net's optimization-based refinement (0 steps: off).
        refine_order: ``"after_nms"`` (default, IoU-Net's inference): the candidate stage runs
            IoU-guided NMS (``postprocess(..., "iou-guided")``, its default threshold 0.5) and
            refines the ``refine_top_k`` highest-scoring boxes it keeps, so with refinement on the
            model returns those detections (refined boxes, their refined predicted IoU) instead of
            raw candidates; post-processing them again with ``"iou-guided"`` leaves them as they
            are unless refinement made two of them overlap above the threshold. ``"before_nms"``
            (ours, the former behaviour): every candidate is refined and post-processing follows.
        refine_top_k: boxes refined after NMS (100: the first ``pre_refine=100`` boxes the
            IoU-guided NMS keeps in the reimplementation github.com/thisisi3/OpenMMLab-IoUNet).
        min_box_size: candidates narrower or lower than this (pixels) are dropped.
        box_loss: ``"smooth_l1"`` on the encoded deltas (Faster R-CNN, beta 1/9 as torchvision) or
            ``"giou"`` on the decoded boxes (Rezatofighi et al., CVPR 2019), weighted by
            ``giou_weight`` (10: MMDetection's GIoU Faster R-CNN, whose loss is also divided by the
            sampled RoI count).
    """

    def __init__(self, box_pool: nn.Module, box_head: BoxHead, quality_head: Optional[nn.Module] = None,
                 mask_pool: Optional[nn.Module] = None, mask_head: Optional[nn.Module] = None,
                 mask_predictor: Optional[nn.Module] = None, *, fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.5, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, candidates_per_image: int = 1000, quality_thresh: float = 0.0,
                 refine_steps: int = 0, refine_step_size: float = 0.5, min_box_size: float = 1e-2,
                 box_loss: str = "smooth_l1", giou_weight: float = 10.0, refine_order: str = "after_nms",
                 refine_top_k: int = 100) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if refine_order not in REFINE_ORDERS:
            raise ValueError(f"refine_order must be one of {REFINE_ORDERS}, got {refine_order!r}")
        if isinstance(refine_top_k, bool) or not isinstance(refine_top_k, int) or refine_top_k < 1:
            raise ValueError(f"refine_top_k must be an int >= 1, got {refine_top_k!r}")
        self.refine_order, self.refine_top_k = refine_order, refine_top_k
        self.box_loss, self.giou_weight = box_loss, float(giou_weight)
        self.box_pool, self.box_head, self.quality_head = box_pool, box_head, quality_head
        self.mask_pool, self.mask_head, self.mask_predictor = mask_pool, mask_head, mask_predictor
        self.matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.coding = getattr(quality_head, "box_coding", "center")
        self.score_thresh, self.candidates_per_image = score_thresh, candidates_per_image
        self.quality_thresh, self.min_box_size = quality_thresh, min_box_size
        self.refine_steps, self.refine_step_size = refine_steps, refine_step_size

    @property
    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    # -- box coding ---------------------------------------------------------------------------
    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        return encode_corners(boxes, reference) if self.coding == "corner" else encode_boxes(boxes, reference)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        return decode_corners(deltas, reference) if self.coding == "corner" else decode_boxes(deltas, reference)

    # -- training samples ---------------------------------------------------------------------
    def sample(self, proposals: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], ...]:
        """Add the ground truth to the proposals, match, and sample a balanced set per image.

        Returns per image: sampled proposals (n_i, 4), labels (n_i,) (0 = background), matched
        ground-truth boxes (n_i, 4) (zeros for background) and the matched index (n_i,).
        """
        out = ([], [], [], [])
        all_labels, all_props, all_gt, all_idx = [], [], [], []
        for props, t in zip(proposals, targets):
            gt, gt_labels = t["boxes"], t["labels"]
            props = torch.cat([props, gt.to(props.dtype)])
            if gt.shape[0] == 0:
                idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                labels = torch.zeros_like(idx)
                matched = props.new_zeros(props.shape)
            else:
                match = self.matcher(tv_box_iou(gt, props))
                idx = match.clamp(min=0)
                labels = gt_labels[idx].to(torch.int64)  # indexing copies; int64 for cross-entropy
                labels[match == self.matcher.BELOW_LOW_THRESHOLD] = 0
                labels[match == self.matcher.BETWEEN_THRESHOLDS] = -1
                matched = gt[idx]
            all_labels.append(labels)
            all_props.append(props)
            all_gt.append(matched)
            all_idx.append(idx)
        pos, neg = self.sampler(all_labels)
        for p, n, props, labels, matched, idx in zip(pos, neg, all_props, all_labels, all_gt, all_idx):
            keep = (p | n).nonzero().squeeze(1)
            for lst, x in zip(out, (props, labels, matched, idx)):
                lst.append(x[keep])
        return out

    # -- box stage ------------------------------------------------------------------------------
    def _forward_box(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pooled features (N, C, S, S), representation (N, R), logits (N, K + 1), deltas (N, 4 G)."""
        pooled = self.box_pool(features, proposals, image_sizes)
        rep, logits, deltas = self.box_head(pooled)
        return pooled, rep, logits, deltas

    def _box_losses(self, logits: Tensor, deltas: Tensor, target_deltas: Tensor, labels: Tensor,
                    proposals: Tensor, gt_boxes: Tensor) -> dict[str, Tensor]:
        """Cross-entropy over all sampled RoIs; over the positives smooth-L1 (beta 1/9) on the deltas
        or ``giou_weight`` x GIoU loss on the decoded boxes; summed and divided by the RoI count N."""
        pos = labels > 0
        if self.box_loss == "giou":
            boxes = self.decode(deltas[pos], proposals[pos])
            box_loss = self.giou_weight * giou_loss(boxes, gt_boxes[pos].to(boxes.dtype), reduction="sum")
        else:
            box_loss = F.smooth_l1_loss(deltas[pos], target_deltas[pos], beta=1 / 9, reduction="sum")
        return {"loss_classifier": F.cross_entropy(logits, labels),
                "loss_box_reg": box_loss / max(labels.numel(), 1)}

    def _select(self, deltas: Tensor, box_class: Tensor) -> Tensor:
        """(N, 4 G) deltas -> (N, 4) the deltas of each row's column group."""
        return deltas.view(deltas.shape[0], -1, 4)[torch.arange(deltas.shape[0], device=deltas.device), box_class]

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: Optional[list[dict]] = None):
        """Training: dict of losses. Evaluation: per image its candidates (:class:`locconf.candidates.Candidates`, resized image coords)."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self._train(features, proposals, image_sizes, targets)
        return self._candidates(features, proposals, image_sizes)

    def _train(self, features, proposals, image_sizes, targets) -> dict[str, Tensor]:
        proposals, labels, matched, matched_idx = self.sample(proposals, targets)
        counts = [len(p) for p in proposals]
        pooled, rep, logits, deltas = self._forward_box(features, proposals, image_sizes)
        labels_all, props_all, gt_all = torch.cat(labels), torch.cat(proposals), torch.cat(matched)
        pos = labels_all > 0
        box_class = labels_all if self.box_head.box_groups > 1 else torch.zeros_like(labels_all)
        pred = self._select(deltas, box_class)
        target = torch.zeros_like(pred)
        target[pos] = self.encode(gt_all[pos], props_all[pos]).to(pred.dtype)
        losses = self._box_losses(logits, pred, target, labels_all, props_all, gt_all)
        if self.quality_head is not None:
            boxes = self.decode(pred.detach(), props_all)
            boxes = [clip_boxes(b, s) for b, s in zip(boxes.split(counts), image_sizes)]
            batch = RoIBatch(features, image_sizes, proposals, pooled, rep, boxes,
                             torch.arange(len(pred), device=pred.device), list(matched),
                             list(pos.split(counts)), targets, box_class, pred, target)
            if getattr(self.quality_head, "replaces_box_loss", False):
                del losses["loss_box_reg"]
            losses.update(self.quality_head.loss(batch))
        if self.has_mask:
            losses.update(self._mask_loss(features, proposals, image_sizes, labels, matched_idx, targets))
        return losses

    # -- candidates -----------------------------------------------------------------------------
    def _candidates(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        counts = [len(p) for p in proposals]
        pooled, rep, logits, deltas = self._forward_box(features, proposals, image_sizes)
        n, k = logits.shape[0], logits.shape[1] - 1
        scores = F.softmax(logits.float(), dim=-1)[:, 1:]  # (N, K)
        boxes = self.decode(deltas.float(), torch.cat(proposals).float()).view(n, -1, 4)
        if self.box_head.box_groups == 1:
            boxes, groups = boxes.expand(n, k, 4), torch.zeros(k, dtype=torch.int64, device=logits.device)
        else:
            boxes, groups = boxes[:, 1:], torch.arange(1, k + 1, device=logits.device)
        labels = torch.arange(1, k + 1, device=logits.device)
        cand_boxes, cand_scores, cand_labels, cand_index, cand_group = [], [], [], [], []
        offset = 0
        for i, (c, size) in enumerate(zip(counts, image_sizes)):
            b = clip_boxes(boxes[offset:offset + c].reshape(-1, 4), size)
            s = scores[offset:offset + c].reshape(-1)
            wh = b[:, 2:] - b[:, :2]
            ok = (s > self.score_thresh) & (wh >= self.min_box_size).all(dim=1)
            idx = ok.nonzero().squeeze(1)
            idx = idx[torch.topk(s[idx], min(self.candidates_per_image, idx.numel())).indices]
            cand_boxes.append(b[idx])
            cand_scores.append(s[idx])
            cand_labels.append(labels.repeat(c)[idx])
            cand_group.append(groups.repeat(c)[idx])
            cand_index.append(offset + idx // k)
            offset += c
        out = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(cand_boxes, cand_scores, cand_labels)]
        if self.quality_head is None:
            return out
        batch = RoIBatch(features, image_sizes, proposals, pooled, rep, cand_boxes, torch.cat(cand_index),
                         box_class=torch.cat(cand_group))
        signal = self.quality_head.signal
        if self.refine_steps > 0 and isinstance(self.quality_head, IoUNetHead):
            if self.refine_order == "after_nms":
                return self._nms_then_refine(features, image_sizes, out, self.quality_head.predict(batch))
            refined, quality = self.quality_head.refine(features, cand_boxes, image_sizes, self.refine_steps,
                                                         self.refine_step_size)
            for o, b, q in zip(out, refined, quality):
                o["boxes"], o[signal] = b, q
            return out
        if signal == "quality" and self.quality_thresh > self.score_thresh:
            values = self._quality_above(batch, cand_scores)
        else:
            values = self.quality_head.predict(batch)
        for o, v in zip(out, values.split([len(b) for b in cand_boxes])):
            o[signal] = v.float()
        return out

    def _nms_then_refine(self, features, image_sizes, out: list[dict[str, Tensor]],
                         quality: Tensor) -> list[dict[str, Tensor]]:
        """IoU-Net's inference order: IoU-guided NMS of each image's candidates, then Algorithm 2 on
        the ``refine_top_k`` highest-scoring kept boxes (the others keep their boxes and IoU)."""
        dets = []
        for o, q in zip(out, quality.float().split([len(o["boxes"]) for o in out])):
            dets.append(postprocess(dict(o, quality=q), "iou-guided", max_detections=len(q)))
        heads = [d["boxes"][:self.refine_top_k] for d in dets]
        refined, scores = self.quality_head.refine(features, heads, image_sizes, self.refine_steps,
                                                   self.refine_step_size)
        for d, b, q in zip(dets, refined, scores):
            k = len(b)
            d["boxes"] = torch.cat([b.to(d["boxes"].dtype), d["boxes"][k:]])
            d["quality"] = torch.cat([q.to(d["quality"].dtype), d["quality"][k:]])
        return dets

    def _quality_above(self, batch: RoIBatch, scores: list[Tensor]) -> Tensor:
        """DIR's threshold ``a``: predict the quality of candidates scoring above it, 0 elsewhere."""
        keep = [(s > self.quality_thresh).nonzero().squeeze(1) for s in scores]
        offsets = [sum(len(s) for s in scores[:i]) for i in range(len(scores))]
        rows = torch.cat([k + o for k, o in zip(keep, offsets)])
        sub = RoIBatch(batch.features, batch.image_sizes, batch.proposals, batch.pooled, batch.box_features,
                       [b[k] for b, k in zip(batch.boxes, keep)], batch.index[rows], box_class=batch.box_class[rows])
        values = batch.pooled.new_zeros(batch.index.shape[0])
        values[rows] = self.quality_head.predict(sub).to(values.dtype)
        return values

    # -- masks ------------------------------------------------------------------------------------
    def mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes) -> Tensor:
        """(sum n_i, K + 1, 28, 28) mask logits of boxes given per image."""
        return self.mask_predictor(self.mask_head(self.mask_pool(features, boxes, image_sizes)))

    def _mask_loss(self, features, proposals, image_sizes, labels, matched_idx, targets) -> dict[str, Tensor]:
        if any("masks" not in t for t in targets):
            raise ValueError("a Mask R-CNN needs targets[i]['masks'] (M, H, W) for every image")
        pos = [(lab > 0).nonzero().squeeze(1) for lab in labels]
        boxes = [p[i] for p, i in zip(proposals, pos)]
        if sum(len(b) for b in boxes) == 0:
            return {"loss_mask": sum(p.sum() for p in self.mask_head.parameters()) * 0.0
                    + sum(p.sum() for p in self.mask_predictor.parameters()) * 0.0}
        logits = self.mask_logits(features, boxes, image_sizes)
        return {"loss_mask": maskrcnn_loss(logits, boxes, [t["masks"] for t in targets],
                                           [lab[i] for lab, i in zip(labels, pos)],
                                           [m[i] for m, i in zip(matched_idx, pos)])}


class RCNN(nn.Module):
    """Faster R-CNN / Mask R-CNN with a localization-quality head (see :func:`build_rcnn`).

    ``model(images, targets)`` returns a dict of named losses in training; in evaluation a list of
    per-image candidates (:class:`locconf.candidates.Candidates`) in the input images' coordinates.
    """

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
        out, rpn_losses, _, sizes, original = self._run(images, targets)
        if self.training:
            return {**rpn_losses, **out}
        return [_rescale(c, s, o) for c, s, o in zip(out, sizes, original)]

    @torch.no_grad()
    def detect(self, images: list[Tensor], method: Optional[str] = None, max_detections: int = 100,
               **params) -> list[dict[str, Tensor]]:
        """Final detections: candidates post-processed with ``method`` (default: the head's own,
        :data:`DEFAULT_METHODS`); with a mask head, ``masks`` (n, 1, H, W) probabilities too."""
        method = method or self.default_method
        check_method(method)  # before running the network
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
    iou_net_boxes_per_gt: int = 64,
    iou_net_max_boxes_per_image: int = 512,
    iou_net_loss: str = "bce",
    refine_keep_best: bool = False,
    refine_order: str = "after_nms",
    refine_top_k: int = 100,
    dir_confidence: str = "iou",
    dir_train_features: Optional[str] = None,
    dir_inference_features: Optional[str] = None,
    box_loss: str = "smooth_l1",
    giou_weight: float = 10.0,
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
            the COCO setting is 32-512); aspect_ratios: per level.
        min_size, max_size: resize rule of the input images.
        rpn_*: proposals kept before / after the RPN's NMS per level and image, sampled anchors.
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
            reimplementation trains on about 1000 per image (128 per ground truth); 64 / 512 is our
            CPU-scale default (:class:`locconf.heads.IoUNetHead`).
        iou_net_loss: ``"bce"`` (default, as the reimplementation found it 0.3 AP better) or
            ``"smooth_l1"`` (the paper's, per the reimplementation).
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
        channels_last: use the channels-last memory format (faster convolutions on CPU).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1 (background excluded), got {num_classes!r}")
    if quality not in QUALITY_HEADS:
        raise ValueError(f"quality must be one of {QUALITY_HEADS}, got {quality!r}")
    if refine_steps and quality != "iou_net":
        raise ValueError(f"refine_steps needs quality='iou_net' (the refinement climbs IoU-Net's prediction), "
                         f"got quality={quality!r}")
    dir_options = {"confidence": dir_confidence, "train_features": dir_train_features,
                   "inference_features": dir_inference_features}
    dir_options = {k: v for k, v in dir_options.items() if v is not None}
    if quality not in ("dir", "dir_foresight") and dir_options != {"confidence": "iou"}:
        raise ValueError(f"dir_confidence, dir_train_features and dir_inference_features need quality='dir' or "
                         f"'dir_foresight', got quality={quality!r}")
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
    layers = list(returned_layers)
    body = build_fpn_backbone(backbone, fpn_channels=fpn_channels, returned_layers=layers, norm=norm,
                              norm_groups=norm_groups, weights=weights, frozen_stages=frozen_stages)
    num_levels = len(layers) + 1
    anchor_sizes = tuple(anchor_sizes) if anchor_sizes is not None else tuple(16.0 * 2**i for i in range(num_levels))
    if len(anchor_sizes) != num_levels:
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({num_levels}), got {len(anchor_sizes)}")
    anchors = AnchorGenerator(sizes=tuple((float(s),) for s in anchor_sizes),
                              aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * num_levels)
    rpn = RegionProposalNetwork(
        anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test), nms_thresh=0.7)
    names = [str(i) for i in range(len(layers))]
    box_head = BoxHead(fpn_channels * 49, representation_size, num_classes, class_agnostic_box)
    q_size = quality_representation_size or representation_size
    quality_head = {
        None: lambda: None,
        "iou_net": lambda: IoUNetHead(fpn_channels, names, 7, q_size, iou_net_boxes_per_gt,
                                      max_boxes_per_image=iou_net_max_boxes_per_image, iou_loss=iou_net_loss,
                                      refine_keep_best=refine_keep_best),
        "dir": lambda: DIRHead(fpn_channels, names, 7, q_size, **dir_options),
        "dir_foresight": lambda: ForesightDIRHead(fpn_channels, names, 7, q_size, **dir_options),
        "iou_direct": lambda: DirectIoUHead(fpn_channels, names, 7, q_size),
        "kl": lambda: KLHead(representation_size, box_head.box_groups),
    }[quality]()
    mask_parts = (None, None, None)
    if mask:
        mask_parts = (MultiScaleRoIAlign(names, 14, sampling_ratio=2),
                      MaskRCNNHeads(fpn_channels, (256, 256, 256, 256), 1),
                      MaskRCNNPredictor(256, 256, num_classes + 1))
    roi_heads = RoIHeads(
        MultiScaleRoIAlign(names, 7, sampling_ratio=2), box_head, quality_head, *mask_parts,
        batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
        score_thresh=score_thresh, candidates_per_image=candidates_per_image, quality_thresh=quality_thresh,
        refine_steps=refine_steps, refine_step_size=refine_step_size, box_loss=box_loss, giou_weight=giou_weight,
        refine_order=refine_order, refine_top_k=refine_top_k)
    transform = GeneralizedRCNNTransform(min_size, max_size, list(body.image_mean), list(body.image_std))
    model = RCNN(body, rpn, roi_heads, transform, num_classes, quality)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
