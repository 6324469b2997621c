"""``head="clq"``: CLQ (Liu, Wang, Guo, Tan, "Being Aware of Localization Accuracy By Generating
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
Our ``atss`` head (:mod:`.atss`) is the baseline of that comparison (the +1.2 AP). The full CLQ detector's other
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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...boxes import elementwise_box_iou
from ...losses import clq_loss, giou_loss
from .common import DenseHead, DenseScores, Positives, weighted_loss

__all__ = ["CLQHead", "iou_statistics"]


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


class CLQHead(DenseHead):
    """CLQ's design on ATSS: ``quality_pred`` is the predicted-IoU logit, ``lqe`` the LQE branch
    (arguments beyond the base's: ``qfl_beta`` of the joint loss, ``quality_loss_weight`` of the
    predicted-IoU loss, ``lqe_channels`` the LQE branch's hidden width).

    Outputs ``cls_logits``, ``bbox_deltas``, ``iou_logits`` and ``lqe_logits`` (B, N) (the LQE
    score is the sigmoid of the latter); losses ``loss_cls`` (the joint one), ``loss_box``,
    ``loss_iou``."""

    name = "clq"
    quality_branch = True

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_levels: int, *,
                 qfl_beta: float = 2.0, quality_loss_weight: float = 1.0, lqe_channels: int = 64, **common) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_levels, lqe_channels=lqe_channels, **common)
        self.qfl_beta, self.quality_loss_weight = qfl_beta, quality_loss_weight

    def build_branches(self, in_channels: int, lqe_channels: int) -> None:
        # sees the regression tower's features and the predicted-IoU statistics
        self.lqe = nn.Sequential(nn.Conv2d(in_channels + 3 * self.num_anchors, lqe_channels, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(lqe_channels, self.num_anchors, 1))

    def level_outputs(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> dict[str, Tensor]:
        out = super().level_outputs(level, cls_feat, reg_feat)
        q = self.quality_pred(reg_feat)  # (B, A, H, W)
        # the predicted IoU guides the LQE branch but is detached: it stays an IoU estimate trained
        # by its own loss only (the joint loss would pull it to 0 on every negative); the tower
        # features are not detached (trained end to end)
        stats = iou_statistics(torch.sigmoid(q.detach()))
        return {**out, "iou_logits": q, "lqe_logits": self.lqe(torch.cat([reg_feat, stats.to(reg_feat.dtype)], dim=1))}

    def loss(self, out: dict[str, Tensor], pos: Positives) -> dict[str, Tensor]:
        cls_logits = out["cls_logits"].float()
        iou = elementwise_box_iou(pos.boxes.detach(), pos.gt_boxes)  # (P,) the joint loss's soft target
        lqe_logits = out["lqe_logits"].float().unsqueeze(-1)  # (B, N, 1), shared by the K classes
        iou_logits = pos.at(out["iou_logits"].float())
        joint_loss, iou_loss = clq_loss(cls_logits, lqe_logits, pos.class_targets(cls_logits, iou), iou_logits, iou,
                                        beta=self.qfl_beta)
        joint = torch.sigmoid(pos.at(cls_logits)) * torch.sigmoid(pos.at(lqe_logits))
        return {
            "loss_cls": joint_loss / pos.num_pos,
            "loss_iou": self.quality_loss_weight * iou_loss / pos.num_pos,
            "loss_box": weighted_loss(giou_loss(pos.boxes, pos.gt_boxes), joint.detach().amax(dim=1),
                                      self.box_loss_weight),
        }

    def predict(self, out: dict[str, Tensor]) -> DenseScores:
        cls = torch.sigmoid(out["cls_logits"].float())
        joint = cls * torch.sigmoid(out["lqe_logits"].float()).unsqueeze(-1)
        return DenseScores(select=joint, scores=joint, anchor_fields={"quality": torch.sigmoid(out["iou_logits"].float())},
                           class_fields={"cls_scores": cls})
