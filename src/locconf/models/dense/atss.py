"""``head="atss"``: ATSS (Zhang et al., CVPR 2020), anchor-based version.

One square anchor per location (Sec. 5: with ATSS one anchor per location suffices), Focal Loss on
the classes, GIoU loss on the decoded boxes weighted by the centerness targets and normalised by
their sum, binary cross-entropy on a centerness branch of the regression tower (the ATSS code's
weights: box loss x2). Score = ``sigmoid(C) x centerness`` (the candidates are first selected on
``sigmoid(C) > score_thresh``, as the reference implementations do). ``quality`` in the candidates
is the predicted centerness; ``cls_scores`` is ``sigmoid(C)`` alone.

In CLQ's comparison (:mod:`.clq`) this head is the baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...losses import centerness_loss, giou_loss, sigmoid_focal_loss
from .common import DenseHead, DenseScores, Positives, weighted_loss

__all__ = ["ATSSHead", "centerness_targets"]


class ATSSHead(DenseHead):
    """ATSS's head: ``quality_pred`` is the centerness logit (arguments beyond the base's: the focal
    loss's ``focal_alpha``, ``focal_gamma``; ``quality_loss_weight`` of the centerness loss).

    Outputs ``cls_logits``, ``bbox_deltas`` and ``centerness_logits`` (B, N); losses ``loss_cls``,
    ``loss_box``, ``loss_centerness``."""

    name = "atss"
    quality_branch = True

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_levels: int, *,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, quality_loss_weight: float = 1.0,
                 **common) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_levels, **common)
        self.focal_alpha, self.focal_gamma, self.quality_loss_weight = focal_alpha, focal_gamma, quality_loss_weight

    def level_outputs(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> dict[str, Tensor]:
        return {**super().level_outputs(level, cls_feat, reg_feat), "centerness_logits": self.quality_pred(reg_feat)}

    def loss(self, out: dict[str, Tensor], pos: Positives) -> dict[str, Tensor]:
        cls_logits = out["cls_logits"].float()
        onehot = pos.class_targets(cls_logits, 1.0)
        ctr = centerness_targets(pos.centers, pos.gt_boxes)
        ctr_logits = pos.at(out["centerness_logits"].float())
        return {
            "loss_cls": sigmoid_focal_loss(cls_logits, onehot, self.focal_alpha, self.focal_gamma) / pos.num_pos,
            "loss_box": weighted_loss(giou_loss(pos.boxes, pos.gt_boxes), ctr, self.box_loss_weight),
            "loss_centerness": self.quality_loss_weight * centerness_loss(ctr_logits, ctr) / pos.num_pos,
        }

    def predict(self, out: dict[str, Tensor]) -> DenseScores:
        cls = torch.sigmoid(out["cls_logits"].float())
        ctr = torch.sigmoid(out["centerness_logits"].float())
        return DenseScores(select=cls, scores=cls * ctr.unsqueeze(-1), anchor_fields={"quality": ctr},
                           class_fields={"cls_scores": cls})


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS / ATSS centerness of ``points`` inside their assigned ``boxes``.

    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` with ``l, t, r, b`` the distances from
    the point to the box's sides (FCOS, Tian et al. 2019, Eq. 3; ATSS computes it at the anchor
    centre). Points on or outside a side get 0.

    Args:
        points: (N, 2) ``(x, y)``, e.g. anchor centres.
        boxes: (N, 4) the boxes they are assigned to.

    Returns:
        (N,) centerness in [0, 1].
    """
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(points.shape)}")
    if boxes.shape != (points.shape[0], 4):
        raise ValueError(f"boxes must have shape ({points.shape[0]}, 4) to match points, got {tuple(boxes.shape)}")
    lr = torch.stack([points[:, 0] - boxes[:, 0], boxes[:, 2] - points[:, 0]], dim=1).clamp(min=0)
    tb = torch.stack([points[:, 1] - boxes[:, 1], boxes[:, 3] - points[:, 1]], dim=1).clamp(min=0)

    def ratio(d: Tensor) -> Tensor:
        hi = d.amax(dim=1)
        return torch.where(hi > 0, d.amin(dim=1) / hi.clamp(min=1e-12), torch.zeros_like(hi))

    return torch.sqrt(ratio(lr) * ratio(tb))
