"""``head="gfl"``: Generalized Focal Loss (Li et al., NeurIPS 2020), both halves, on ATSS's
anchor-based assignment as GFL itself is built.

* QFL (Sec. 3.2): the class output is itself the joint class x localization-quality score,
  trained with QFL whose soft target at the positive class is the IoU between the *decoded
  predicted box* (detached) and its ground truth, normalised by the number of positives.
  Score = ``sigmoid(C)``; GFL predicts no separate localization quality, so its candidates have no
  ``quality``.
* General distribution and DFL (Sec. 3.3): each of the four distances from the anchor centre to
  the box sides (left, top, right, bottom), in units of the level's stride, is a discrete
  distribution over ``0, 1, ..., reg_max`` (``reg_max = 16``, 17 bins, GFL's value), predicted as
  ``4 (reg_max + 1)`` logits per anchor (scaled per level, as GFL's code scales them). The box is
  decoded from the distributions' expectations ``sum_j softmax_j * j`` times the stride
  (:meth:`~.common.DenseHead.decode`). DFL (Eq. 6, :func:`locconf.losses.distribution_focal_loss`)
  against the ground-truth distances clamped to ``[0, reg_max - 0.1]`` (:data:`DFL_TARGET_EPS`; GFL's
  code, github.com/implus/GFocal ``mmdet/core/bbox/transforms.py``, and MMDetection's
  ``bbox2distance``, ``eps=0.1``: a target stays below the last bin, so its upper neighbour exists),
  weight 0.25, averaged over the four sides, weighted per positive by the detached maximum class
  score and normalised by the sum of those weights (GFL's code).
* GIoU on the decoded box, weight 2, with the same weights and normalisation (GFL's code).

``gfl_box="delta"`` keeps the former variant (ATSS's delta box branch with QFL, no DFL), in which
``atss`` / ``gfl`` / ``clq`` differ only in the score representation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...boxes import elementwise_box_iou
from ...losses import distribution_focal_loss, giou_loss, quality_focal_loss
from .common import DenseHead, DenseScores, Positives, boxes_to_distances, weighted_loss

__all__ = ["GFLHead", "GFL_BOXES", "DFL_TARGET_EPS"]

GFL_BOXES = ("distribution", "delta")
#: DFL's targets are clamped to ``reg_max - DFL_TARGET_EPS`` (GFL's and MMDetection's ``bbox2distance``).
DFL_TARGET_EPS = 0.1


class GFLHead(DenseHead):
    """GFL's head (arguments beyond the base's: ``qfl_beta`` of the QFL; ``gfl_box``, one of
    :data:`GFL_BOXES`; ``reg_max`` of the distribution; ``dfl_weight``).

    Outputs ``cls_logits`` and ``bbox_dist`` (or ``bbox_deltas``); losses ``loss_cls``,
    ``loss_box`` and, with the distribution, ``loss_dfl``."""

    name = "gfl"

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_levels: int, *,
                 qfl_beta: float = 2.0, gfl_box: str = "distribution", reg_max: int = 16, dfl_weight: float = 0.25,
                 **common) -> None:
        if gfl_box not in GFL_BOXES:
            raise ValueError(f"gfl_box must be one of {GFL_BOXES}, got {gfl_box!r}")
        super().__init__(in_channels, num_anchors, num_classes, num_levels,
                         reg_max=reg_max if gfl_box == "distribution" else None, **common)
        self.qfl_beta, self.dfl_weight = qfl_beta, dfl_weight

    def loss(self, out: dict[str, Tensor], pos: Positives) -> dict[str, Tensor]:
        cls_logits = out["cls_logits"].float()
        iou = elementwise_box_iou(pos.boxes.detach(), pos.gt_boxes)  # (P,) QFL's soft target
        losses = {"loss_cls": quality_focal_loss(cls_logits, pos.class_targets(cls_logits, iou), self.qfl_beta)
                  / pos.num_pos}
        weight = torch.sigmoid(pos.at(cls_logits)).detach().amax(dim=1)
        losses["loss_box"] = weighted_loss(giou_loss(pos.boxes, pos.gt_boxes), weight, self.box_loss_weight)
        if self.reg_max is not None:  # GFL's DFL on the 4 sides, in strides, as its code
            target = boxes_to_distances(pos.centers, pos.gt_boxes) / pos.strides.repeat(1, 2)
            target = target.clamp(0, self.reg_max - DFL_TARGET_EPS)
            dfl = distribution_focal_loss(pos.box_out, target, reduction="none").mean(dim=1)  # (P,)
            losses["loss_dfl"] = weighted_loss(dfl, weight, self.dfl_weight)
        return losses

    def predict(self, out: dict[str, Tensor]) -> DenseScores:
        cls = torch.sigmoid(out["cls_logits"].float())
        return DenseScores(select=cls, scores=cls)
