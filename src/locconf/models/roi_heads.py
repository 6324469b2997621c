"""The RoI stage of the two-stage detector: Fast R-CNN's box head and the RoI heads that sample,
classify, regress, run a quality head and return candidates.

:class:`RoIHeads` is split into small steps instead of one monolithic forward: ``_sample`` (match
proposals to ground truth, sample a balanced batch) -> ``_forward_box`` (pool, box head, classifier
and regressor) -> ``_box_losses`` -> the quality head's ``loss`` / ``predict`` (:mod:`locconf.heads`,
one file per method) -> ``_candidates`` -> ``_forward_mask``. :mod:`locconf.models.cascade` reuses
the steps stage by stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import box_iou as tv_box_iou

from ..boxes import clip_boxes, decode_boxes, decode_corners, encode_boxes, encode_corners
from ..heads import IoUNetHead, RoIBatch
from ..losses import giou_loss
from ..postprocess import postprocess

__all__ = ["BoxHead", "RoIHeads", "BOX_LOSSES", "REFINE_ORDERS"]

BOX_LOSSES = ("smooth_l1", "giou")
REFINE_ORDERS = ("after_nms", "before_nms")
_CENTER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Faster R-CNN's box coding weights (1 / target std)

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
    def encode(self, boxes: Tensor, reference: Tensor, scale: float = 1.0) -> Tensor:
        """Regression targets of ``boxes`` (N, 4) from ``reference`` (N, 4); ``scale`` multiplies
        the coding weights (Cascade R-CNN's later stages: their targets' spread is smaller)."""
        if self.coding == "corner":
            return encode_corners(boxes, reference, weight=10.0 * scale)
        return encode_boxes(boxes, reference, weights=tuple(w * scale for w in _CENTER_WEIGHTS))

    def decode(self, deltas: Tensor, reference: Tensor, scale: float = 1.0) -> Tensor:
        """Inverse of :meth:`encode`."""
        if self.coding == "corner":
            return decode_corners(deltas, reference, weight=10.0 * scale)
        return decode_boxes(deltas, reference, weights=tuple(w * scale for w in _CENTER_WEIGHTS))

    # -- training samples ---------------------------------------------------------------------
    def sample(self, proposals: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], ...]:
        """Add the ground truth to the proposals, match, and sample a balanced set per image.

        Returns per image: sampled proposals (n_i, 4), labels (n_i,) (0 = background), matched
        ground-truth boxes (n_i, 4) (zeros for background) and the matched index (n_i,).
        """
        return self._sample(proposals, targets, self.matcher)[:4]

    def _sample(self, proposals: list[Tensor], targets: list[dict],
                matcher: det_utils.Matcher) -> tuple[list[Tensor], ...]:
        """:meth:`sample` with a given matcher; also returns per image which sampled rows are the
        ground-truth boxes themselves (n_i,) bool."""
        out = ([], [], [], [], [])
        all_labels, all_props, all_gt, all_idx, all_is_gt = [], [], [], [], []
        for props, t in zip(proposals, targets):
            gt, gt_labels = t["boxes"], t["labels"]
            is_gt = torch.arange(props.shape[0] + gt.shape[0], device=props.device) >= props.shape[0]
            props = torch.cat([props, gt.to(props.dtype)])
            if gt.shape[0] == 0:
                idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                labels = torch.zeros_like(idx)
                matched = props.new_zeros(props.shape)
            else:
                match = matcher(tv_box_iou(gt, props))
                idx = match.clamp(min=0)
                labels = gt_labels[idx].to(torch.int64)  # indexing copies; int64 for cross-entropy
                labels[match == matcher.BELOW_LOW_THRESHOLD] = 0
                labels[match == matcher.BETWEEN_THRESHOLDS] = -1
                matched = gt[idx]
            all_labels.append(labels)
            all_props.append(props)
            all_gt.append(matched)
            all_idx.append(idx)
            all_is_gt.append(is_gt)
        pos, neg = self.sampler(all_labels)
        for p, n, *rows in zip(pos, neg, all_props, all_labels, all_gt, all_idx, all_is_gt):
            keep = (p | n).nonzero().squeeze(1)
            for lst, x in zip(out, rows):
                lst.append(x[keep])
        return out

    # -- box stage ------------------------------------------------------------------------------
    def _forward_box(self, features: dict[str, Tensor], proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]],
                     box_head: Optional[BoxHead] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pooled features (N, C, S, S), representation (N, R), logits (N, K + 1), deltas (N, 4 G)
        of ``box_head`` (default: :attr:`box_head`)."""
        pooled = self.box_pool(features, proposals, image_sizes)
        rep, logits, deltas = (box_head if box_head is not None else self.box_head)(pooled)
        return pooled, rep, logits, deltas

    def _box_losses(self, logits: Tensor, deltas: Tensor, target_deltas: Tensor, labels: Tensor,
                    proposals: Tensor, gt_boxes: Tensor, scale: float = 1.0) -> dict[str, Tensor]:
        """Cross-entropy over all sampled RoIs; over the positives smooth-L1 (beta 1/9) on the deltas
        or ``giou_weight`` x GIoU loss on the decoded boxes; summed and divided by the RoI count N."""
        pos = labels > 0
        if self.box_loss == "giou":
            boxes = self.decode(deltas[pos], proposals[pos], scale)
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
        stage = self._train_stage(features, proposals, image_sizes, targets, self.matcher, self.box_head)
        losses = stage.losses
        self._add_quality_loss(losses, "loss_box_reg", features, image_sizes, targets, stage)
        if self.has_mask:
            losses.update(self._mask_loss(features, stage.proposals, image_sizes, stage.labels,
                                          stage.matched_idx, targets))
        return losses

    def _train_stage(self, features, proposals, image_sizes, targets, matcher: det_utils.Matcher,
                     box_head: BoxHead, scale: float = 1.0) -> "_TrainStage":
        """Sample RoIs from ``proposals`` with ``matcher``, run ``box_head``, compute its losses
        (box coding weights times ``scale``)."""
        proposals, labels, matched, matched_idx, is_gt = self._sample(proposals, targets, matcher)
        pooled, rep, logits, deltas = self._forward_box(features, proposals, image_sizes, box_head)
        labels_all, props_all, gt_all = torch.cat(labels), torch.cat(proposals), torch.cat(matched)
        pos = labels_all > 0
        box_class = labels_all if box_head.box_groups > 1 else torch.zeros_like(labels_all)
        pred = self._select(deltas, box_class)
        target = torch.zeros_like(pred)
        target[pos] = self.encode(gt_all[pos], props_all[pos], scale).to(pred.dtype)
        losses = self._box_losses(logits, pred, target, labels_all, props_all, gt_all, scale)
        return _TrainStage(proposals, labels, matched, matched_idx, is_gt, pooled, rep, pred, target, box_class,
                           losses)

    def _add_quality_loss(self, losses: dict[str, Tensor], box_loss_key: str, features, image_sizes, targets,
                          stage: "_TrainStage", scale: float = 1.0) -> None:
        """The quality head's losses on ``stage``'s RoIs, added to ``losses`` (a head that replaces
        the box loss, KL-Loss, removes ``box_loss_key``)."""
        if self.quality_head is None:
            return
        counts = [len(p) for p in stage.proposals]
        boxes = self.decode(stage.pred.detach(), torch.cat(stage.proposals), scale)
        boxes = [clip_boxes(b, s) for b, s in zip(boxes.split(counts), image_sizes)]
        pos = torch.cat(stage.labels) > 0
        batch = RoIBatch(features, image_sizes, stage.proposals, stage.pooled, stage.rep, boxes,
                         torch.arange(len(stage.pred), device=stage.pred.device), list(stage.matched),
                         list(pos.split(counts)), targets, stage.box_class, stage.pred, stage.target,
                         torch.cat(stage.labels))
        if getattr(self.quality_head, "replaces_box_loss", False):
            del losses[box_loss_key]
        losses.update(self.quality_head.loss(batch))

    # -- candidates -----------------------------------------------------------------------------
    def _box_predictions(self, features, proposals, image_sizes) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor]:
        """Inference of the box stage: ``(proposals the rows come from (per image), pooled
        (N, C, S, S), representation (N, R), class scores (N, K) without background, decoded boxes
        (N, 4 G))``."""
        pooled, rep, logits, deltas = self._forward_box(features, proposals, image_sizes)
        scores = F.softmax(logits.float(), dim=-1)[:, 1:]
        return proposals, pooled, rep, scores, self.decode(deltas.float(), torch.cat(proposals).float())

    def _candidates(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        proposals, pooled, rep, scores, boxes = self._box_predictions(features, proposals, image_sizes)
        counts = [len(p) for p in proposals]
        n, k = scores.shape
        boxes = boxes.view(n, -1, 4)
        if self.box_head.box_groups == 1:
            boxes, groups = boxes.expand(n, k, 4), torch.zeros(k, dtype=torch.int64, device=scores.device)
        else:
            boxes, groups = boxes[:, 1:], torch.arange(1, k + 1, device=scores.device)
        labels = torch.arange(1, k + 1, device=scores.device)
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
                         box_class=torch.cat(cand_group), labels=torch.cat(cand_labels))
        signal = self.quality_head.signal
        if self.refine_steps > 0 and isinstance(self.quality_head, IoUNetHead):
            if self.refine_order == "after_nms":
                return self._nms_then_refine(features, image_sizes, out, self.quality_head.predict(batch))
            refined, quality = self.quality_head.refine(features, cand_boxes, image_sizes, self.refine_steps,
                                                         self.refine_step_size, labels=cand_labels)
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
        the ``refine_top_k`` highest-scoring kept boxes (the others keep their boxes and IoU); with
        the head's ``score="cls_x_iou"`` every kept box's score is then multiplied by its predicted
        IoU (refined or not) and the detections sorted by it again."""
        dets = []
        for o, q in zip(out, quality.float().split([len(o["boxes"]) for o in out])):
            dets.append(postprocess(dict(o, quality=q), "iou-guided", max_detections=len(q)))
        heads = [d["boxes"][:self.refine_top_k] for d in dets]
        refined, scores = self.quality_head.refine(features, heads, image_sizes, self.refine_steps,
                                                   self.refine_step_size,
                                                   labels=[d["labels"][:self.refine_top_k] for d in dets])
        out = []
        for d, b, q in zip(dets, refined, scores):
            k = len(b)
            d["boxes"] = torch.cat([b.to(d["boxes"].dtype), d["boxes"][k:]])
            d["quality"] = torch.cat([q.to(d["quality"].dtype), d["quality"][k:]])
            if self.quality_head.score != "cluster_max":  # IoUNetHead.final_scores, then by score again
                d["scores"] = self.quality_head.final_scores(d["scores"], d["quality"])
                order = torch.sort(d["scores"], descending=True, stable=True).indices
                d = {key: v[order] if isinstance(v, Tensor) and v.dim() and len(v) == len(order) else v
                     for key, v in d.items()}
            out.append(d)
        return out

    def _quality_above(self, batch: RoIBatch, scores: list[Tensor]) -> Tensor:
        """DIR's threshold ``a``: predict the quality of candidates scoring above it, 0 elsewhere."""
        keep = [(s > self.quality_thresh).nonzero().squeeze(1) for s in scores]
        offsets = [sum(len(s) for s in scores[:i]) for i in range(len(scores))]
        rows = torch.cat([k + o for k, o in zip(keep, offsets)])
        sub = RoIBatch(batch.features, batch.image_sizes, batch.proposals, batch.pooled, batch.box_features,
                       [b[k] for b, k in zip(batch.boxes, keep)], batch.index[rows], box_class=batch.box_class[rows],
                       labels=batch.labels[rows])
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


@dataclass
class _TrainStage:
    """One box stage in training: per image its sampled RoIs, labels, matched ground truth and
    index, and which RoIs are ground-truth copies; then pooled features, representation, the
    selected deltas (N, 4), their targets (N, 4), the regressor column group (N,) and its losses."""

    proposals: list[Tensor]
    labels: list[Tensor]
    matched: list[Tensor]
    matched_idx: list[Tensor]
    is_gt: list[Tensor]
    pooled: Tensor
    rep: Tensor
    pred: Tensor
    target: Tensor
    box_class: Tensor
    losses: dict[str, Tensor]
