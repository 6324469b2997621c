"""Cascade R-CNN's RoI stage (Cai & Vasconcelos, CVPR 2018, arXiv 1712.00726), with a quality head
on its last stage.

A cascade of box stages, each with its own box head (two FC layers, classifier, class-agnostic
regressor), trained at a rising IoU threshold (0.5, 0.6, 0.7): stage ``t`` samples its RoIs from the
boxes stage ``t - 1`` regressed, so that the later, stricter stages see the better boxes they are
meant to refine. As in MMDetection's and detectron2's implementations (except where said):

- **Training**: stage 1 samples from the RPN proposals; a later stage from the previous stage's
  regressed sampled RoIs (detached, the ground-truth copies dropped), with the ground truth added
  again and its own IoU threshold for foreground and background. Box coding weights grow with the
  stage (targets' std 0.1/0.2, 0.05/0.1, 0.033/0.067: weights (10, 10, 5, 5) x 1, 2, 3), and the
  stages' losses are weighted 1, 0.5, 0.25 (MMDetection's ``stage_loss_weights``). The loss names
  carry the stage: ``loss_classifier_s1``, ``loss_box_reg_s1``, ...
- **Inference**: each stage classifies its own input boxes and regresses them for the next; the
  class score is the mean of the stages' softmax probabilities, as detectron2 computes it
  (``detectron2/modeling/roi_heads/cascade_rcnn.py``: the mean of each stage's ``predict_probs``),
  and the box is the last stage's regression. MMDetection differs: it averages the stages' raw
  classification outputs (logits) and applies the softmax to that mean
  (``mmdet/models/roi_heads/cascade_roi_head.py``, ``_refine_roi`` / ``simple_test``); the two
  agree when the stages agree and differ in how a confident stage outweighs a hesitant one.
- **Quality head** (DIR Table 1, third block; IoU-Net Sec. 4.4): trained on the last stage's RoIs
  and regressed boxes, and predicts for the final candidates, exactly as on a one-stage box head.
  DIR trains its head on "the positive samples of the classification branch" (Sec. 3.3), which on
  the last stage are the RoIs at IoU >= 0.7: the head then never sees a worse box, and on the NEON
  crowns it predicts 0.89 on average for every candidate and anti-correlates with the true IoU (Pearson -0.17
  on val, -0.12 on the training tiles themselves; ``benchmarks/results/
  localization_limits_neon_cascade_dir.md``). ``quality_fg_iou`` (e.g. 0.5, Faster R-CNN's
  threshold) trains it instead on every sampled last-stage RoI whose IoU with a ground
  truth reaches that value: an option, because the paper does not say which positives its cascade
  used.

The first stage is :class:`locconf.models.rcnn.RoIHeads`' own machinery with ``scale=1``; the only
new code is the loop over stages.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from ..boxes import clip_boxes
from .roi_heads import BoxHead, RoIHeads

__all__ = ["CascadeRoIHeads", "CASCADE_LOSS_WEIGHTS"]

#: MMDetection's ``stage_loss_weights`` for three stages (its cascade_rcnn_r50_fpn_1x config).
CASCADE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class CascadeRoIHeads(RoIHeads):
    """Cascade R-CNN's RoI stage (module docstring).

    Args:
        box_pool: pooling of the RoIs' features (shared by the stages).
        box_heads: one :class:`locconf.models.rcnn.BoxHead` per stage, class-agnostic.
        iou_thresholds: each stage's foreground / background IoU threshold, e.g. (0.5, 0.6, 0.7).
        quality_head: a head of :mod:`locconf.heads` on the last stage, or None.
        stage_loss_weights: each stage's loss weight (default ``0.5 ** t``: for three stages
            :data:`CASCADE_LOSS_WEIGHTS`).
        coding_scales: each stage's box coding weight multiplier (default 1, 2, 3, ...).
        quality_fg_iou: None (default, DIR's rule): the quality head trains on the last stage's
            positives; a value in (0, 1): on every sampled last-stage RoI whose IoU with a ground
            truth is at least this, matched to that ground truth (module docstring).
        **kwargs: the other arguments of :class:`locconf.models.rcnn.RoIHeads` (sampling,
            candidates, refinement); masks are not supported.
    """

    def __init__(self, box_pool: nn.Module, box_heads: Sequence[BoxHead], iou_thresholds: Sequence[float],
                 quality_head: Optional[nn.Module] = None, *, stage_loss_weights: Optional[Sequence[float]] = None,
                 coding_scales: Optional[Sequence[float]] = None, quality_fg_iou: Optional[float] = None,
                 **kwargs) -> None:
        thresholds = [float(t) for t in iou_thresholds]
        if len(thresholds) < 1 or len(box_heads) != len(thresholds):
            raise ValueError(f"cascade needs one box head per IoU threshold, got {len(box_heads)} heads and "
                             f"thresholds {thresholds}")
        if any(not 0 < t < 1 for t in thresholds):
            raise ValueError(f"cascade IoU thresholds must be in (0, 1), got {thresholds}")
        if any(h.box_groups != 1 for h in box_heads):
            raise ValueError("cascade stages regress class-agnostic boxes (class_agnostic_box=True), as Cascade R-CNN")
        if getattr(quality_head, "replaces_box_loss", False) or getattr(quality_head, "signal", "quality") != "quality":
            raise ValueError("a cascade takes a quality head that predicts 'quality' (iou_net, dir, dir_foresight, "
                             "iou_direct); KL-Loss's variances are not defined on a cascade here")
        if quality_fg_iou is not None and not 0 < quality_fg_iou < 1:
            raise ValueError(f"quality_fg_iou must be None or in (0, 1), got {quality_fg_iou!r}")
        n = len(thresholds)
        weights = list(stage_loss_weights) if stage_loss_weights is not None else [0.5 ** t for t in range(n)]
        scales = list(coding_scales) if coding_scales is not None else [float(i + 1) for i in range(n)]
        if len(weights) != n or len(scales) != n or min(weights) < 0 or min(scales) <= 0:
            raise ValueError(f"stage_loss_weights (>= 0) and coding_scales (> 0) need one value per stage ({n}), "
                             f"got {weights}, {scales}")
        super().__init__(box_pool, box_heads[-1], quality_head, fg_iou_thresh=thresholds[-1],
                         bg_iou_thresh=thresholds[-1], **kwargs)
        if self.has_mask:
            raise ValueError("a cascade has no mask head here")
        self.earlier_heads = nn.ModuleList(box_heads[:-1])  # the last stage's head is self.box_head
        self.iou_thresholds, self.stage_loss_weights, self.coding_scales = thresholds, weights, scales
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in thresholds]
        self.quality_fg_iou = quality_fg_iou

    @property
    def num_stages(self) -> int:
        return len(self.iou_thresholds)

    def stage_head(self, t: int) -> BoxHead:
        """The box head of stage ``t`` (0-based)."""
        return self.box_head if t == self.num_stages - 1 else self.earlier_heads[t]

    def _next_proposals(self, deltas: Tensor, proposals: list[Tensor], image_sizes, scale: float,
                        keep: Optional[list[Tensor]] = None) -> list[Tensor]:
        """The boxes a stage regressed from ``proposals`` (detached, clipped), per image; ``keep``
        (per image bool) selects rows."""
        boxes = self.decode(deltas.detach(), torch.cat(proposals), scale)
        out = [clip_boxes(b, s) for b, s in zip(boxes.split([len(p) for p in proposals]), image_sizes)]
        return out if keep is None else [b[k] for b, k in zip(out, keep)]

    def _train(self, features, proposals, image_sizes, targets) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for t in range(self.num_stages):
            scale = self.coding_scales[t]
            stage = self._train_stage(features, proposals, image_sizes, targets, self.matchers[t],
                                      self.stage_head(t), scale)
            losses.update({f"{k}_s{t + 1}": self.stage_loss_weights[t] * v for k, v in stage.losses.items()})
            if t < self.num_stages - 1:
                proposals = self._next_proposals(stage.pred, stage.proposals, image_sizes, scale,
                                                 keep=[~g for g in stage.is_gt])
        self._add_quality_loss(losses, f"loss_box_reg_s{self.num_stages}", features, image_sizes, targets,
                               self._quality_positives(stage, targets), self.coding_scales[-1])
        return losses

    def _quality_positives(self, stage, targets):
        """The last stage as its quality head sees it: unchanged, or with ``quality_fg_iou``, the
        labels and matched ground truth of every sampled RoI re-derived from its best IoU with the
        ground truth (foreground at IoU >= ``quality_fg_iou``)."""
        if self.quality_fg_iou is None or self.quality_head is None:
            return stage
        labels, matched = [], []
        for rois, old_labels, old_matched, t in zip(stage.proposals, stage.labels, stage.matched, targets):
            gt = t["boxes"]
            if gt.shape[0] == 0:
                labels.append(old_labels)
                matched.append(old_matched)
                continue
            best, idx = box_iou(rois, gt.to(rois.dtype)).max(dim=1)
            fg = t["labels"][idx].to(old_labels.dtype)
            labels.append(torch.where(best >= self.quality_fg_iou, fg, torch.zeros_like(fg)))
            matched.append(gt[idx].to(old_matched.dtype))
        return replace(stage, labels=labels, matched=matched)

    def _box_predictions(self, features, proposals, image_sizes):
        scores = None
        for t in range(self.num_stages):
            pooled, rep, logits, deltas = self._forward_box(features, proposals, image_sizes, self.stage_head(t))
            probs = F.softmax(logits.float(), dim=-1)[:, 1:]
            scores = probs if scores is None else scores + probs
            if t < self.num_stages - 1:
                proposals = self._next_proposals(deltas.float(), proposals, image_sizes, self.coding_scales[t])
        boxes = self.decode(deltas.float(), torch.cat(proposals).float(), self.coding_scales[-1])
        return proposals, pooled, rep, scores / self.num_stages, boxes
