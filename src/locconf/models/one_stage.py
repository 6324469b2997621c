"""One-stage detectors with ATSS assignment: the ATSS baseline, GFL and CLQ.

All three share the backbone, the ATSS assignment and the towers; they differ in the
classification-side representation and its loss (and GFL in its box branch):

    images ─► GeneralizedRCNNTransform ─► ResNet+FPN ─► shared dense head ─► ATSS assignment (train)
                                                          │                    or candidates (eval)
                            cls tower (GroupNorm) ────────┤─► class logits C  (A·K per location)
                            reg tower (GroupNorm) ────────┴─► box output, ×Scale per level:
                                                              deltas (A·4) | distribution (A·4·17, gfl)
                                                              + centerness (atss) | predicted IoU
                                                                and LQE (clq)

Heads (``head=``)
-----------------

``"atss"`` — ATSS (Zhang et al., CVPR 2020), anchor-based version: one square anchor per location
(Sec. 5: with ATSS one anchor per location suffices), Focal Loss on the classes, GIoU loss on the
decoded boxes weighted by the centerness targets and normalised by their sum, binary
cross-entropy on a centerness branch of the regression tower (the ATSS code's weights: box loss
x2). Score = ``sigmoid(C) x centerness`` (the candidates are first selected on
``sigmoid(C) > score_thresh``, as the reference implementations do). ``quality`` in the
candidates is the predicted centerness; ``cls_scores`` is ``sigmoid(C)`` alone.

``"gfl"`` — Generalized Focal Loss (Li et al., NeurIPS 2020), both halves, on ATSS's anchor-based
assignment as GFL itself is built:

* QFL (Sec. 3.2): the class output is itself the joint class x localization-quality score,
  trained with QFL whose soft target at the positive class is the IoU between the *decoded
  predicted box* (detached) and its ground truth, normalised by the number of positives.
  Score = ``sigmoid(C)``; GFL predicts no separate localization quality, so its candidates have no
  ``quality``.
* General distribution and DFL (Sec. 3.3): each of the four distances from the anchor centre to
  the box sides (left, top, right, bottom), in units of the level's stride, is a discrete
  distribution over ``0, 1, ..., reg_max`` (``reg_max = 16``, 17 bins, GFL's value), predicted as
  ``4 (reg_max + 1)`` logits per anchor (scaled per level, as GFL's code scales them). The box is
  decoded from the distributions' expectations ``sum_j softmax_j * j`` times the stride. DFL
  (Eq. 6, :func:`locconf.losses.distribution_focal_loss`) against the ground-truth distances
  (clamped to ``reg_max - 0.01`` as GFL's code does), weight 0.25, averaged over the four sides,
  weighted per positive by the detached maximum class score and normalised by the sum of those
  weights (GFL's code).
* GIoU on the decoded box, weight 2, with the same weights and normalisation (GFL's code).

``gfl_box="delta"`` keeps the former variant (ATSS's delta box branch with QFL, no DFL), in which
``atss`` / ``gfl`` / ``clq`` differ only in the score representation.

``"clq"`` — CLQ (Liu, Wang, Guo, Tan, "Being Aware of Localization Accuracy By Generating
Predicted-IoU-Guided Quality Scores", arXiv 2309.13269). Only the abstract and a summary of the
paper's findings could be retrieved here (not its method section, equations or tables; no code is
public), so no section of it can be cited for the details. What the abstract and findings state:

1. CLQ is a new one-stage detector (47.8 AP on COCO test-dev with ResNeXt-101, 11.5 FPS), and,
   separately, *extending ATSS* with CLQ's design gives +1.2 AP;
2. an LQE (localization-quality estimation) branch produces a localization quality score
   *guided by the predicted IoU* (exploiting the close relation of localization accuracy and IoU);
3. the LQE branch is *embedded in the classification branch*: instead of a separate quality score
   that is trained independently and multiplied in only at inference (the train/test
   inconsistency of ATSS/FCOS that lets "low classification, high LQE" predictions through), the
   classification output is one joint classification-localization-quality representation,
   trained as such.

**Which of the two ours is.** Our ``clq`` is the second, *CLQ's design extended to ATSS*: ATSS's
anchor-based detector (assignment, one anchor per location, towers, delta box branch, GIoU loss)
whose centerness is replaced by the predicted-IoU-guided LQE score embedded in the class score.
Our ``atss`` head is the baseline of that comparison (the +1.2 AP). The full CLQ detector's other
components are not known from the text we had and are not reproduced.

Our reading of points 2-3, every choice marked as ours where the text we had does not fix it:

* a predicted-IoU branch on the regression tower, ``p = sigmoid(conv(reg_tower))`` per anchor,
  trained with binary cross-entropy against the IoU of the decoded predicted box with its ground
  truth on the positive samples (the IoU-aware formulation of Wu et al. 2020; the form of this loss
  is ours);
* the LQE branch (ours: inputs, width and depth) sees *features*, not only the scalar ``p``: the
  regression tower's features concatenated with statistics of the predicted IoU at each anchor
  (``p`` and its maximum and mean over the 3 x 3 neighbourhood, :func:`iou_statistics`), through
  two 1x1 convolutions (``lqe_channels`` wide) to one logit ``l`` per anchor: the LQE score is
  ``q = sigmoid(l)``. (A branch that sees only ``p`` is a learned 1-D recalibration of ``p`` and
  cannot add information; GFLV2's DGQP is the model for a small branch on box statistics.)
* ``p`` enters the LQE branch **detached** (ours, following the role the abstract gives it:
  the predicted IoU *guides* the quality score). Without the detach the joint loss, whose target
  is 0 on every negative, also trains ``p`` and drags it towards 0 wherever the class score is
  low, so ``p`` stops being an IoU estimate on negatives; detached, ``p`` is trained by its own IoU
  loss only. The tower features are not detached: the joint loss trains the LQE branch and the
  towers end to end (as GFLV2 trains DGQP);
* the joint score is ``J = sigmoid(C) * q`` for every class — the LQE score is embedded in the
  classification output (the product is how GFLV2 embeds its DGQP score; ours here);
* ``J`` is trained with the quality focal loss, soft target = IoU of the decoded predicted box at
  the positive class and 0 elsewhere (GFL's joint representation; ours as CLQ's loss), computed
  from the logits in log space (:func:`locconf.losses.joint_quality_focal_loss`): exact for every
  ``J``, where the former clamp of ``J`` at 1e-6 stopped the gradient of collapsed positives;
* the box branch is ATSS's; the GIoU loss is weighted by the detached ``max_k J`` (as GFL).

Score = ``J``; ``quality`` in the candidates is the predicted IoU ``p`` (an IoU estimate, so that
the ``iou-guided`` and ``quality`` post-processing of :mod:`locconf.postprocess` rank by an IoU
prediction, as in IoU-Net and DIR); ``cls_scores`` is ``sigmoid(C)``.

Default post-processing (``detect``): ``"nms"`` on the score for every head (ATSS's and GFL's own
inference; for CLQ the joint score already carries the localization quality, which is the point of
the joint representation).

Losses are normalised by the number of positive anchors of the batch (at least 1), as in the three
papers, except GFL's box-side losses (above); an image without boxes contributes negatives only,
and its box / quality losses are 0.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..boxes import _elementwise_intersection, box_area, decode_boxes
from ..losses import (
    centerness_loss,
    clq_loss,
    distribution_focal_loss,
    giou_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
)
from ..postprocess import METHODS, postprocess
from .atss import _atss_assign, centerness_targets
from .backbone import NORMS, build_fpn_backbone, check_returned_layers
from .inputs import check_detection_inputs

__all__ = ["build_one_stage", "OneStageDetector", "DenseHead", "HEADS"]

HEADS = ("atss", "clq", "gfl")
GFL_BOXES = ("distribution", "delta")
EXTRA_LEVELS = ("pool", "p6p7", "none")
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # ATSS's anchor-based box coder


class Scale(nn.Module):
    """A learnable scalar multiplying the box deltas of one pyramid level (FCOS / ATSS)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _flatten(x: Tensor, num_anchors: int) -> Tensor:
    """(B, A * C, H, W) -> (B, H * W * A, C), the order of torchvision's anchors."""
    b, _, h, w = x.shape
    return x.view(b, num_anchors, -1, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, -1)


def iou_statistics(iou_map: Tensor) -> Tensor:
    """CLQ's LQE input statistics of a predicted-IoU map (our choice, see the module docstring).

    For every anchor ``a`` of a level's map ``p`` (B, A, H, W) of predicted IoUs, three channels per
    anchor: ``p`` itself, and the maximum and the mean of ``p`` over its 3 x 3 neighbourhood (same
    anchor shape, edges excluded from the mean), i.e. how well this location's box is expected to
    fit and whether a neighbour expects to fit better. Returns (B, 3 A, H, W).
    """
    local_max = nn.functional.max_pool2d(iou_map, 3, stride=1, padding=1)
    local_mean = nn.functional.avg_pool2d(iou_map, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([iou_map, local_max, local_mean], dim=1)


class DenseHead(nn.Module):
    """The shared dense head: two GroupNorm towers and the per-anchor predictions.

    Args:
        in_channels: FPN channels.
        num_anchors: anchors per location ``A``.
        num_classes: ``K`` (sigmoid outputs, no background class).
        head: ``"atss"`` (adds a centerness output), ``"clq"`` (a predicted-IoU output and the
            LQE branch) or ``"gfl"`` (classes and boxes only).
        num_levels: pyramid levels (one learnable box-output scale each).
        num_convs: convolutions per tower (4 in ATSS / GFL).
        norm_groups: GroupNorm groups of the towers.
        lqe_channels: hidden width of CLQ's LQE branch.
        prior_prob: initial foreground probability of the class outputs (RetinaNet, Sec. 4.1).
        reg_max: ``None``: the box output is ATSS's 4 deltas per anchor; an int ``n``: GFL's
            general distribution, ``n + 1`` logits per box side (Sec. 3.3; ``n = 16`` in GFL).

    ``forward(features)`` takes the FPN maps (B, C, H_l, W_l) and returns a dict of tensors over all
    N = sum_l H_l W_l A anchors: ``cls_logits`` (B, N, K); ``bbox_deltas`` (B, N, 4) or, with
    ``reg_max``, ``bbox_dist`` (B, N, 4, reg_max + 1) logits of the distances (left, top, right,
    bottom) in strides; and, by head, ``centerness_logits`` (B, N) | ``iou_logits`` (B, N) and
    ``lqe_logits`` (B, N) (the LQE score is their sigmoid).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, head: str, num_levels: int,
                 num_convs: int = 4, norm_groups: int = 32, lqe_channels: int = 64, prior_prob: float = 0.01,
                 reg_max: int | None = None) -> None:
        super().__init__()
        self.head, self.num_anchors, self.num_classes = head, num_anchors, num_classes
        self.reg_max = reg_max
        self.cls_tower = _tower(in_channels, num_convs, norm_groups)
        self.reg_tower = _tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        box_outputs = 4 if reg_max is None else 4 * (reg_max + 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * box_outputs, 3, padding=1)
        self.quality_pred = nn.Conv2d(in_channels, num_anchors, 3, padding=1) if head != "gfl" else None
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        self.lqe = None
        if head == "clq":  # sees the regression tower's features and the predicted-IoU statistics
            self.lqe = nn.Sequential(nn.Conv2d(in_channels + 3 * num_anchors, lqe_channels, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(lqe_channels, num_anchors, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        if len(features) != len(self.scales):
            raise ValueError(f"features must have {len(self.scales)} levels, got {len(features)}")
        cls, box, quality, lqe = [], [], [], []
        for level, x in enumerate(features):
            c, r = self.cls_tower(x), self.reg_tower(x)
            cls.append(_flatten(self.cls_logits(c), self.num_anchors))
            box.append(_flatten(self.scales[level](self.bbox_pred(r)), self.num_anchors))
            if self.quality_pred is not None:
                q = self.quality_pred(r)  # (B, A, H, W)
                quality.append(_flatten(q, self.num_anchors)[..., 0])
                if self.lqe is not None:
                    # the predicted IoU guides the LQE branch but is detached: it stays an IoU
                    # estimate trained by its own loss only (the joint loss would pull it to 0 on
                    # every negative); the tower features are not detached (trained end to end)
                    stats = iou_statistics(torch.sigmoid(q.detach()))
                    lqe.append(_flatten(self.lqe(torch.cat([r, stats.to(r.dtype)], dim=1)), self.num_anchors)[..., 0])
        box_out = torch.cat(box, dim=1)
        if self.reg_max is None:
            out = {"cls_logits": torch.cat(cls, dim=1), "bbox_deltas": box_out}
        else:
            out = {"cls_logits": torch.cat(cls, dim=1),
                   "bbox_dist": box_out.view(*box_out.shape[:2], 4, self.reg_max + 1)}
        if self.head == "atss":
            out["centerness_logits"] = torch.cat(quality, dim=1)
        elif self.head == "clq":
            out["iou_logits"] = torch.cat(quality, dim=1)
            out["lqe_logits"] = torch.cat(lqe, dim=1)
        return out


def _elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matched pairs (P, 4), (P, 4) -> (P,) without validation (no host synchronisation)."""
    inter = _elementwise_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def distribution_expectation(logits: Tensor) -> Tensor:
    """GFL's integral (Sec. 3.3): ``(..., n + 1)`` logits over the values ``0..n`` -> ``(...)``
    expectation ``sum_j softmax(logits)_j * j``."""
    values = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return torch.softmax(logits, dim=-1) @ values


def distances_to_boxes(centers: Tensor, distances: Tensor) -> Tensor:
    """Boxes from centres (M, 2) and distances (M, 4) ``(left, top, right, bottom)`` -> (M, 4) xyxy."""
    return torch.cat([centers - distances[:, :2], centers + distances[:, 2:]], dim=1)


def boxes_to_distances(centers: Tensor, boxes: Tensor) -> Tensor:
    """Distances (M, 4) ``(left, top, right, bottom)`` from centres (M, 2) to the sides of boxes (M, 4)."""
    return torch.cat([centers - boxes[:, :2], boxes[:, 2:] - centers], dim=1)


class OneStageDetector(nn.Module):
    """A dense detector with ATSS assignment and an ``atss`` | ``gfl`` | ``clq`` head.

    Build it with :func:`build_one_stage`. ``model(images, targets)`` returns the losses in
    training (``loss_cls``, ``loss_box`` and ``loss_centerness`` (atss) | ``loss_iou`` (clq) |
    ``loss_dfl`` (gfl with its distribution box branch)) and,
    in evaluation, one dict of candidates per image (every anchor-class pair whose score passes
    ``score_thresh`` among the ``topk_candidates`` best of its level, at most
    ``candidates_per_image``, before any NMS), in the input image's coordinates:
    ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,) in 1..K, and ``quality`` (N,) (atss:
    centerness, clq: predicted IoU) and ``cls_scores`` (N,) (atss, clq) where the head has them.
    ``detect`` post-processes them (:func:`locconf.postprocess.postprocess`).
    """

    def __init__(self, backbone: nn.Module, anchor_generator: AnchorGenerator, head: DenseHead,
                 transform: GeneralizedRCNNTransform, *, topk: int = 9, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, qfl_beta: float = 2.0, box_loss_weight: float = 2.0,
                 quality_loss_weight: float = 1.0, score_thresh: float = 0.05, topk_candidates: int = 1000,
                 candidates_per_image: int = 1000, channels_last: bool = False, dfl_weight: float = 0.25) -> None:
        super().__init__()
        self.backbone, self.anchor_generator, self.head, self.transform = backbone, anchor_generator, head, transform
        self.head_type, self.num_classes = head.head, head.num_classes
        self.topk, self.focal_alpha, self.focal_gamma, self.qfl_beta = topk, focal_alpha, focal_gamma, qfl_beta
        self.box_loss_weight, self.quality_loss_weight, self.dfl_weight = box_loss_weight, quality_loss_weight, dfl_weight
        self.score_thresh, self.topk_candidates = score_thresh, topk_candidates
        self.candidates_per_image, self.channels_last = candidates_per_image, channels_last
        self.default_method = "nms"

    # -- input checks ---------------------------------------------------------------------

    def _check_inputs(self, images: Sequence[Tensor], targets: Sequence[dict] | None, need_targets: bool) -> None:
        check_detection_inputs(images, targets, self.num_classes, need_targets)

    # -- forward ----------------------------------------------------------------------------

    def _run(self, images: Sequence[Tensor], targets: Sequence[dict] | None):
        """Resize and batch, backbone, head, anchors: what training and inference share.

        Returns ``(image_list, targets, out, anchors (N, 4), strides (N, 2), counts)`` with
        ``strides`` the ``(x, y)`` stride of each anchor's level, as the anchor generator spaces
        them (padded image size // feature size).
        """
        image_list, targets = self.transform(list(images), [dict(t) for t in targets] if targets is not None else None)
        x = image_list.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = list(self.backbone(x).values())
        out = self.head(features)
        anchors = self.anchor_generator(image_list, features)[0]  # (N, 4), the same for every image
        counts = [f.shape[-2] * f.shape[-1] * self.head.num_anchors for f in features]
        h, w = x.shape[-2:]
        strides = torch.cat([anchors.new_tensor([w // f.shape[-1], h // f.shape[-2]]).expand(c, 2)
                             for f, c in zip(features, counts)])
        return image_list, targets, out, anchors, strides, counts

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict] | None = None):
        self._check_inputs(images, targets, need_targets=self.training)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets, out, anchors, strides, counts = self._run(images, targets)
        if self.training:
            return self._losses(out, anchors, strides, counts, targets)
        cands = self._candidates(out, anchors, strides, counts, image_list.image_sizes)
        return self.transform.postprocess(cands, image_list.image_sizes, original_sizes)

    # -- boxes ----------------------------------------------------------------------------------

    def _box_out(self, out: dict[str, Tensor]) -> Tensor:
        """The box output: deltas (B, N, 4) or distribution logits (B, N, 4, reg_max + 1)."""
        return (out["bbox_deltas"] if self.head.reg_max is None else out["bbox_dist"]).float()

    def _decode(self, box_out: Tensor, anchors: Tensor, strides: Tensor) -> Tensor:
        """Boxes (M, 4) from the box outputs of M anchors (M, 4) | (M, 4, n + 1), their boxes (M, 4)
        and strides (M, 2): ATSS's delta coder, or GFL's expected distances (in strides) from the
        anchor centre."""
        if self.head.reg_max is None:
            return decode_boxes(box_out, anchors, BOX_CODER_WEIGHTS)
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        return distances_to_boxes(centers, distribution_expectation(box_out) * strides.repeat(1, 2))

    # -- training -----------------------------------------------------------------------------

    def _assign(self, anchors: Tensor, counts: list[int], targets: list[dict]):
        """ATSS per image. Returns the image and anchor index of every positive (P,), (P,), its ground
        truth box (P, 4) and 0-based class (P,)."""
        matched, offset = [], 0
        for t in targets:  # ground truths indexed globally over the batch
            m = _atss_assign(anchors, counts, t["boxes"].to(anchors), self.topk)
            matched.append(torch.where(m >= 0, m + offset, m))
            offset += t["boxes"].shape[0]
        matched = torch.stack(matched)  # (B, N)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(anchors)
        gt_labels = torch.cat([t["labels"] for t in targets]).to(anchors.device)
        b_idx, a_idx = (matched >= 0).nonzero(as_tuple=True)
        gt_idx = matched[b_idx, a_idx]
        return b_idx, a_idx, gt_boxes[gt_idx], gt_labels[gt_idx] - 1

    def _losses(self, out: dict[str, Tensor], anchors: Tensor, strides: Tensor, counts: list[int],
                targets: list[dict]) -> dict[str, Tensor]:
        cls_logits = out["cls_logits"].float()
        b_idx, a_idx, pos_gt, pos_cls = self._assign(anchors, counts, targets)
        num_pos = max(b_idx.numel(), 1)  # known on the host since the assignment's nonzero()
        pos_anchors, pos_box_out = anchors[a_idx], self._box_out(out)[b_idx, a_idx]
        pred = self._decode(pos_box_out, pos_anchors, strides[a_idx])  # (P, 4)
        giou = giou_loss(pred, pos_gt)  # (P,)
        losses: dict[str, Tensor] = {}

        if self.head_type == "atss":
            onehot = torch.zeros_like(cls_logits)
            onehot[b_idx, a_idx, pos_cls] = 1.0
            losses["loss_cls"] = sigmoid_focal_loss(cls_logits, onehot, self.focal_alpha, self.focal_gamma) / num_pos
            ctr = centerness_targets((pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2, pos_gt)
            losses["loss_box"] = self.box_loss_weight * (ctr * giou).sum() / ctr.sum().clamp(min=1e-6)
            ctr_logits = out["centerness_logits"].float()[b_idx, a_idx]
            losses["loss_centerness"] = self.quality_loss_weight * centerness_loss(ctr_logits, ctr) / num_pos
            return losses

        iou = _elementwise_iou(pred.detach(), pos_gt)  # (P,) the soft target of GFL and CLQ
        soft = torch.zeros_like(cls_logits)
        soft[b_idx, a_idx, pos_cls] = iou
        if self.head_type == "gfl":
            losses["loss_cls"] = quality_focal_loss(cls_logits, soft, self.qfl_beta) / num_pos
            weight = torch.sigmoid(cls_logits[b_idx, a_idx]).detach().amax(dim=1)
        else:
            lqe_logits = out["lqe_logits"].float().unsqueeze(-1)  # (B, N, 1), shared by the K classes
            iou_logits = out["iou_logits"].float()[b_idx, a_idx]
            joint_loss, iou_loss = clq_loss(cls_logits, lqe_logits, soft, iou_logits, iou, beta=self.qfl_beta)
            losses["loss_cls"] = joint_loss / num_pos
            losses["loss_iou"] = self.quality_loss_weight * iou_loss / num_pos
            joint = torch.sigmoid(cls_logits[b_idx, a_idx]) * torch.sigmoid(lqe_logits[b_idx, a_idx])
            weight = joint.detach().amax(dim=1)
        weight_sum = weight.sum().clamp(min=1e-6)
        losses["loss_box"] = self.box_loss_weight * (weight * giou).sum() / weight_sum
        if self.head.reg_max is not None:  # GFL's DFL on the 4 sides, in strides, as its code
            centers = (pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2
            target = boxes_to_distances(centers, pos_gt) / strides[a_idx].repeat(1, 2)
            target = target.clamp(0, self.head.reg_max - 0.01)
            dfl = distribution_focal_loss(pos_box_out, target, reduction="none").mean(dim=1)  # (P,)
            losses["loss_dfl"] = self.dfl_weight * (weight * dfl).sum() / weight_sum
        return losses

    # -- inference ------------------------------------------------------------------------------

    def _scores(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(select (B, N, K), score (B, N, K), per-anchor extras {name: (B, N)})``."""
        cls = torch.sigmoid(out["cls_logits"].float())
        if self.head_type == "atss":
            ctr = torch.sigmoid(out["centerness_logits"].float())
            return cls, cls * ctr.unsqueeze(-1), {"quality": ctr}
        if self.head_type == "clq":
            joint = cls * torch.sigmoid(out["lqe_logits"].float()).unsqueeze(-1)
            return joint, joint, {"quality": torch.sigmoid(out["iou_logits"].float())}
        return cls, cls, {}

    def _candidates(self, out: dict[str, Tensor], anchors: Tensor, strides: Tensor, counts: list[int],
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        select, score, extras = self._scores(out)
        bsz, n, k = score.shape
        masked = select.masked_fill(select <= self.score_thresh, -1.0)
        # per level: the topk_candidates best (anchor, class) pairs, batched over images, no sync
        flat_idx, start = [], 0
        for c in counts:
            level = masked[:, start:start + c].reshape(bsz, -1)
            top = level.topk(min(self.topk_candidates, level.shape[1]), dim=1).indices
            flat_idx.append(top + start * k)
            start += c
        flat_idx = torch.cat(flat_idx, dim=1)  # (B, T) indices into N * K
        sel = masked.reshape(bsz, -1).gather(1, flat_idx)
        best = sel.topk(min(self.candidates_per_image, sel.shape[1]), dim=1)
        flat_idx = flat_idx.gather(1, best.indices)  # (B, C), sorted by the selection score
        valid_counts = (best.values > self.score_thresh).sum(dim=1).tolist()  # one sync for the batch
        anchor_idx, cls_idx = flat_idx // k, flat_idx % k
        box_out = self._box_out(out)
        flat = box_out.reshape(bsz, box_out.shape[1], -1)
        picked = flat.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))
        rows = anchor_idx.reshape(-1)
        boxes = self._decode(picked.reshape(-1, *box_out.shape[2:]), anchors[rows], strides[rows])
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # (B, 2) as (h, w)
        limit = sizes.flip(1).repeat(1, 2).repeat_interleave(anchor_idx.shape[1], dim=0)  # (B*C, 4)
        boxes = torch.minimum(boxes.clamp(min=0), limit).reshape(bsz, -1, 4)
        fields = {
            "boxes": boxes,
            "scores": score.reshape(bsz, -1).gather(1, flat_idx),
            "labels": cls_idx + 1,
        }
        for name, value in extras.items():
            fields[name] = value.gather(1, anchor_idx)
        if self.head_type in ("atss", "clq"):
            fields["cls_scores"] = torch.sigmoid(out["cls_logits"].float()).reshape(bsz, -1).gather(1, flat_idx)
        return [{name: v[b, :valid_counts[b]] for name, v in fields.items()} for b in range(bsz)]

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], method: str | None = None, max_detections: int = 100,
               **params) -> list[dict[str, Tensor]]:
        """Final detections: candidates post-processed with ``method`` (default :attr:`default_method`).

        Args:
            images: list of (3, H, W) float images in [0, 1].
            method: one of :data:`locconf.postprocess.METHODS` (``None``: ``"nms"``).
            max_detections: per image.
            **params: keyword arguments of the post-processing method (e.g. ``iou_threshold``).
        """
        method = self.default_method if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        was_training = self.training
        self.eval()
        try:
            candidates = self(images)
        finally:
            self.train(was_training)
        return [postprocess(c, method, max_detections=max_detections, **params) for c in candidates]


    @torch.no_grad()
    def positive_samples(self, images: Sequence[Tensor], targets: Sequence[dict]) -> list[dict[str, Tensor]]:
        """The predictions of the anchors that ATSS assigns to a ground truth: what the losses train.

        Runs the network in evaluation mode (its mode is restored) and returns, per image, for every
        positive anchor: ``boxes`` (P, 4) its predicted box (input image coordinates, not clipped),
        ``iou`` (P,) the IoU of that box with its ground truth (computed at the network's resolution,
        the same up to the rounding of the resize), ``labels`` (P,) the ground truth's
        class, ``scores`` (P,) the detector's score for that class and, where the head has them,
        ``cls_scores`` and ``quality`` (P,). With it one can see, for instance, how well each
        head's score ranks its own training samples by localization accuracy.
        """
        self._check_inputs(images, targets, need_targets=True)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        was_training = self.training
        self.eval()
        try:
            return self._positive_samples(images, targets, original_sizes)
        finally:
            self.train(was_training)

    def _positive_samples(self, images, targets, original_sizes) -> list[dict[str, Tensor]]:
        image_list, targets, out, anchors, strides, counts = self._run(images, targets)
        b_idx, a_idx, pos_gt, pos_cls = self._assign(anchors, counts, targets)
        _, score, extras = self._scores(out)
        boxes = self._decode(self._box_out(out)[b_idx, a_idx], anchors[a_idx], strides[a_idx])
        fields = {"boxes": boxes, "iou": _elementwise_iou(boxes, pos_gt), "labels": pos_cls + 1,
                  "scores": score[b_idx, a_idx, pos_cls]}
        for name, value in extras.items():
            fields[name] = value[b_idx, a_idx]
        if self.head_type in ("atss", "clq"):
            fields["cls_scores"] = torch.sigmoid(out["cls_logits"].float())[b_idx, a_idx, pos_cls]
        per_image = torch.bincount(b_idx, minlength=len(images)).tolist()
        split = [dict(zip(fields, values)) for values in zip(*(v.split(per_image) for v in fields.values()))]
        return self.transform.postprocess(split, image_list.image_sizes, original_sizes)  # needs eval mode


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _number(value, name: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not numeric or value < low or value > high or (low_open and value == low) or math.isinf(value):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")
    return float(value)


def build_one_stage(
    num_classes: int,
    *,
    head: str = "atss",
    backbone: str = "resnet18",
    weights: str | os.PathLike | None = None,
    fpn_channels: int = 128,
    returned_layers: Sequence[int] = (2, 3, 4),
    extra_levels: str = "pool",
    norm: str = "batch",
    norm_groups: int = 16,
    frozen_stages: int = -1,
    head_convs: int = 4,
    head_norm_groups: int = 32,
    anchor_sizes: Sequence[float] | None = None,
    aspect_ratios: Sequence[float] = (1.0,),
    topk: int = 9,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    qfl_beta: float = 2.0,
    box_loss_weight: float = 2.0,
    quality_loss_weight: float = 1.0,
    lqe_channels: int = 64,
    gfl_box: str = "distribution",
    reg_max: int = 16,
    dfl_weight: float = 0.25,
    min_size: int = 400,
    max_size: int = 1333,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    candidates_per_image: int = 1000,
    channels_last: bool = False,
) -> OneStageDetector:
    """Build a randomly initialised one-stage detector (see the module docstring for the heads).

    Args:
        num_classes: object classes ``K`` (labels ``1..K``; sigmoid outputs, no background class).
        head: ``"atss"`` | ``"clq"`` | ``"gfl"``.
        backbone, weights, fpn_channels, returned_layers, norm, norm_groups, frozen_stages: the
            backbone + FPN of :func:`locconf.models.backbone.build_fpn_backbone` (a torchvision ResNet
            or any timm model; ``weights="imagenet"`` for ``efficientnet_lite0`` .. ``lite2``).
        extra_levels: FPN levels above the last stage: ``"pool"`` (one max-pooled level, as the
            two-stage models; P3-P6 for stages 2-4), ``"p6p7"`` (two stride-2 convolutions on P5,
            RetinaNet / ATSS; P3-P7) or ``"none"``.
        head_convs: convolutions per head tower (4 in ATSS / GFL; 0 allowed).
        head_norm_groups: GroupNorm groups of the towers (capped at ``fpn_channels``; must divide it).
        anchor_sizes: one anchor size per level; default ``4 x stride`` (32, 64, 128, ... for
            P3, P4, P5, ...), half of ATSS's COCO setting (8 x stride), for small objects.
        aspect_ratios: anchors per location (h / w); ATSS uses one square anchor.
        topk: ATSS candidates per level (9).
        focal_alpha, focal_gamma: Focal Loss of ``atss`` (0.25, 2).
        qfl_beta: the exponent of the quality focal loss of ``gfl`` and ``clq`` (2).
        box_loss_weight: weight of the GIoU loss (2, as ATSS and GFL).
        quality_loss_weight: weight of the centerness (atss) / predicted-IoU (clq) loss.
        lqe_channels: hidden width of CLQ's LQE branch.
        gfl_box: the box branch of ``head="gfl"``: ``"distribution"`` (GFL's general distribution
            of the four side distances, ``reg_max + 1`` bins each, with the DFL; the paper's) or
            ``"delta"`` (ATSS's deltas, so that ``atss`` / ``gfl`` / ``clq`` differ only in the
            score representation). Ignored by the other heads.
        reg_max: largest distance of the distribution, in strides (16 in GFL: 17 bins per side).
        dfl_weight: weight of the Distribution Focal Loss (0.25 in GFL).
        min_size, max_size: the resize rule of ``GeneralizedRCNNTransform``.
        score_thresh: candidates need a score above this (for ``atss`` the class probability).
        topk_candidates: best (anchor, class) pairs kept per level before merging levels.
        candidates_per_image: at most this many candidates per image.
        channels_last: run the network in ``torch.channels_last`` memory format (faster on CPU).
    """
    _positive_int(num_classes, "num_classes")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if gfl_box not in GFL_BOXES:
        raise ValueError(f"gfl_box must be one of {GFL_BOXES}, got {gfl_box!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if extra_levels not in EXTRA_LEVELS:
        raise ValueError(f"extra_levels must be one of {EXTRA_LEVELS}, got {extra_levels!r}")
    _positive_int(fpn_channels, "fpn_channels")
    _positive_int(head_convs, "head_convs", minimum=0)
    _positive_int(head_norm_groups, "head_norm_groups")
    _positive_int(lqe_channels, "lqe_channels")
    _positive_int(reg_max, "reg_max")
    _positive_int(topk, "topk")
    _positive_int(topk_candidates, "topk_candidates")
    _positive_int(candidates_per_image, "candidates_per_image")
    _positive_int(min_size, "min_size")
    if not isinstance(max_size, int) or max_size < min_size:
        raise ValueError(f"max_size must be an int >= min_size ({min_size}), got {max_size!r}")
    groups = min(head_norm_groups, fpn_channels)
    if fpn_channels % groups:
        raise ValueError(f"head_norm_groups ({head_norm_groups}) must divide fpn_channels ({fpn_channels})")
    layers = check_returned_layers(returned_layers)
    num_extra = {"pool": 1, "p6p7": 2, "none": 0}[extra_levels]
    strides = [2 ** (i + 1) for i in layers] + [2 ** (layers[-1] + 1 + j) for j in range(1, num_extra + 1)]
    if anchor_sizes is None:
        anchor_sizes = [4.0 * s for s in strides]
    anchor_sizes = list(anchor_sizes)
    if len(anchor_sizes) != len(strides):
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({len(strides)}), got {len(anchor_sizes)}")
    for s in anchor_sizes:
        _number(s, "anchor_sizes", 0.0, low_open=True)
    aspect_ratios = list(aspect_ratios)
    if not aspect_ratios:
        raise ValueError("aspect_ratios must not be empty")
    for r in aspect_ratios:
        _number(r, "aspect_ratios", 0.0, low_open=True)
    _number(focal_alpha, "focal_alpha", 0.0, 1.0)
    _number(focal_gamma, "focal_gamma", 0.0, 10.0)
    _number(qfl_beta, "qfl_beta", 0.0, 10.0)
    _number(box_loss_weight, "box_loss_weight", 0.0, 1e6)
    _number(quality_loss_weight, "quality_loss_weight", 0.0, 1e6)
    _number(dfl_weight, "dfl_weight", 0.0, 1e6)
    _number(score_thresh, "score_thresh", 0.0, 1.0)
    if score_thresh >= 1.0:
        raise ValueError(f"score_thresh must be < 1, got {score_thresh}")

    extra = {"pool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(fpn_channels, fpn_channels), "none": None}[extra_levels]
    body = build_fpn_backbone(backbone, fpn_channels=fpn_channels, returned_layers=layers, norm=norm,
                              norm_groups=norm_groups, extra_blocks=extra, weights=weights,
                              frozen_stages=frozen_stages)
    if extra_levels == "none":  # build_fpn_backbone's default is a pooled level; remove it
        body.fpn.extra_blocks = None
    anchor_gen = AnchorGenerator(sizes=tuple((float(s),) for s in anchor_sizes),
                                 aspect_ratios=(tuple(float(r) for r in aspect_ratios),) * len(strides))
    dense = DenseHead(fpn_channels, len(aspect_ratios), num_classes, head, len(strides), num_convs=head_convs,
                      norm_groups=groups, lqe_channels=lqe_channels,
                      reg_max=reg_max if head == "gfl" and gfl_box == "distribution" else None)
    transform = GeneralizedRCNNTransform(min_size, max_size, image_mean=list(body.image_mean),
                                         image_std=list(body.image_std))
    model = OneStageDetector(body, anchor_gen, dense, transform, topk=topk, focal_alpha=focal_alpha,
                             focal_gamma=focal_gamma, qfl_beta=qfl_beta, box_loss_weight=box_loss_weight,
                             quality_loss_weight=quality_loss_weight, score_thresh=score_thresh,
                             topk_candidates=topk_candidates, candidates_per_image=candidates_per_image,
                             channels_last=channels_last, dfl_weight=dfl_weight)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
