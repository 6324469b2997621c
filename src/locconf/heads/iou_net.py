"""IoU-Net's IoU predictor (Jiang et al., ECCV 2018, arXiv 1807.11590; seeds 000-001).

As described in Sec. 3 of the paper:

- **Features**: Precise RoI Pooling (:class:`locconf.prroi_pool.MultiScalePrRoIPool`), whose output
  is a continuous, differentiable function of the box coordinates, so the predicted IoU can be
  climbed by gradient ascent (Sec. 3.3).
- **Head**: two fully connected layers (1024 wide in the paper) and an output unit.
- **Training** (Sec. 3.1): not on RPN proposals but on boxes jittered around the ground truth and
  kept with IoU >= 0.5, sampled uniformly over IoU (here: balanced over IoU bins,
  :func:`locconf.boxes.jitter_boxes`); the target is the IoU with the best-matching ground-truth
  box.
- **How many training boxes**: the paper does not give the number. The MMDetection
  reimplementation github.com/thisisi3/OpenMMLab-IoUNet, which reproduces the paper's +1.7 AP,
  trains on about 1,000 jittered boxes per image (``sample_num=1000``; 30-50 per IoU bin and
  ground truth capped at 1,000 per image performed the same). Our defaults are in that regime:
  ``boxes_per_gt=128`` (at most 130 per ground truth: 26 in each of the 5 IoU bins) and
  ``max_boxes_per_image=1000``, a random subset (uniform, so the IoU balance holds in expectation)
  where an image has more. Each box costs a PrRoIPool and a pass of the MLP; on a CPU, 64 per
  ground truth capped at 512 per image is the practical setting.
- **Loss**: ``iou_loss="bce"`` (default): binary cross-entropy on the sigmoid output, as the issue
  and DIR's comparison specify. ``"smooth_l1"``: the paper's regression loss as the
  reimplementation above reads it ("the paper uses SmoothL1Loss"; we could not check the paper's
  text for it, so it is not the default): smooth L1 (beta 1) between the predicted IoU (still the
  sigmoid output, ours, so that it stays in [0, 1] for IoU-guided NMS and refinement) and the
  target, i.e. half the squared error since both lie in [0, 1]. The reimplementation found BCE
  0.3 AP better on COCO.
- **Inference**: the predicted IoU of every candidate is its localization confidence, used by
  IoU-guided NMS (Sec. 3.2; ``postprocess(..., "iou-guided")``) and, optionally, as the objective
  of optimization-based refinement (Sec. 3.3, Algorithm 2; :meth:`IoUNetHead.refine`,
  :func:`locconf.refine.refine_boxes`).

Choices: the predictor is class-agnostic by default (one output, like DIR's regressors); the
paper's is class-aware, which ``num_classes=K`` gives (K outputs, the one of the box's class read:
in training the class of the best-matching ground truth, at inference the candidate's class; the
refinement climbs the IoU of the candidate's class). With one class the two are the same model. ``refine_keep_best=True`` (an option,
ours) makes the refinement return the best box each candidate visited instead of Algorithm 2's
box at the stopping step; ``build_rcnn`` passes ``refine_keep_best=False``, the paper's rule.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from ..boxes import box_iou, jitter_boxes
from ..prroi_pool import MultiScalePrRoIPool
from ..refine import refine_boxes
from .common import HeadContext, RoIBatch, bce, mlp_branch, zero_loss

__all__ = ["IoUNetHead", "IOU_LOSSES"]

IOU_LOSSES = ("bce", "smooth_l1")


class IoUNetHead(nn.Module):
    """IoU predictor on PrRoIPool features.

    Args:
        in_channels: FPN channels C.
        featmap_names: FPN levels to pool from.
        pool_size: PrRoIPool output size S.
        representation_size: width of the two hidden FC layers.
        boxes_per_gt: jittered training boxes wanted per ground-truth box (see the module
            docstring; :func:`locconf.boxes.jitter_boxes` keeps up to ``ceil(n / 5)`` per IoU bin).
        loss_weight: scale of the loss.
        max_boxes_per_image: cap on the training boxes of one image (a uniform random subset).
        iou_loss: ``"bce"`` | ``"smooth_l1"`` (module docstring).
        refine_keep_best: default of :meth:`refine`'s ``keep_best`` (module docstring).
        num_classes: None (one class-agnostic output) or K: class-aware, one output per class.
    """

    name, default_method, signal = "iou_net", "iou-guided", "quality"

    @classmethod
    def from_options(cls, context: HeadContext, options: Mapping[str, Any]) -> "IoUNetHead":
        """Built with ``build_rcnn``'s ``iou_net_boxes_per_gt``, ``iou_net_max_boxes_per_image``,
        ``iou_net_loss``, ``refine_keep_best`` and ``iou_net_class_aware``."""
        return cls(context.in_channels, context.featmap_names, context.pool_size, context.representation_size,
                   options["iou_net_boxes_per_gt"], max_boxes_per_image=options["iou_net_max_boxes_per_image"],
                   iou_loss=options["iou_net_loss"], refine_keep_best=options["refine_keep_best"],
                   num_classes=context.num_classes if options["iou_net_class_aware"] else None)

    def __init__(self, in_channels: int, featmap_names: Sequence[str], pool_size: int = 7,
                 representation_size: int = 1024, boxes_per_gt: int = 128, loss_weight: float = 1.0,
                 max_boxes_per_image: int = 1000, iou_loss: str = "bce", refine_keep_best: bool = True,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        if in_channels < 1 or pool_size < 1 or boxes_per_gt < 1:
            raise ValueError(f"in_channels, pool_size and boxes_per_gt must be >= 1, got "
                             f"{in_channels}, {pool_size}, {boxes_per_gt}")
        if isinstance(max_boxes_per_image, bool) or not isinstance(max_boxes_per_image, int) or max_boxes_per_image < 1:
            raise ValueError(f"max_boxes_per_image must be an int >= 1, got {max_boxes_per_image!r}")
        if loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight}")
        if iou_loss not in IOU_LOSSES:
            raise ValueError(f"iou_loss must be one of {IOU_LOSSES}, got {iou_loss!r}")
        if not isinstance(refine_keep_best, bool):
            raise ValueError(f"refine_keep_best must be a bool, got {refine_keep_best!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.pool = MultiScalePrRoIPool(list(featmap_names), pool_size)
        self.iou = mlp_branch(in_channels * pool_size * pool_size, representation_size, num_classes or 1)
        self.boxes_per_gt = int(boxes_per_gt)
        self.max_boxes_per_image = max_boxes_per_image
        self.loss_weight = float(loss_weight)
        self.iou_loss = iou_loss
        self.refine_keep_best = refine_keep_best

    def score_boxes(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]],
                    labels: Optional[Tensor] = None) -> Tensor:
        """(sum n_i,) predicted IoU of per-image boxes; differentiable in the box coordinates.
        A class-aware head reads the output of each box's class, ``labels`` (sum n_i,) in 1..K."""
        out = torch.sigmoid(self.iou(self.pool(features, boxes, image_sizes)))
        if self.num_classes is None:
            return out.squeeze(1)
        if labels is None:
            raise ValueError("a class-aware IoU head (num_classes set) needs the boxes' labels")
        return out.gather(1, (labels.to(torch.int64) - 1).clamp(0, self.num_classes - 1)[:, None]).squeeze(1)

    def training_boxes(self, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """One image's IoU-balanced training boxes and their targets.

        ``gt_boxes`` (M, 4) -> ``(boxes (K, 4), iou (K,))``: :func:`locconf.boxes.jitter_boxes` with
        ``boxes_per_gt`` per ground truth, then a uniform random subset of ``max_boxes_per_image``
        where there are more (torch's global generator); the target is the IoU with the
        best-matching ground truth. Every loop is inside ``jitter_boxes`` (vectorised).
        """
        boxes, iou, _ = self._training_boxes(gt_boxes)
        return boxes, iou

    def _training_boxes(self, gt_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`training_boxes` and the index (K,) of each box's best-matching ground truth."""
        jittered, _ = jitter_boxes(gt_boxes, self.boxes_per_gt)
        if len(jittered) > self.max_boxes_per_image:
            keep = torch.randperm(len(jittered), device=jittered.device)[:self.max_boxes_per_image]
            jittered = jittered[keep.sort().values]
        if len(jittered) == 0:
            return jittered, gt_boxes.new_zeros((0,)), torch.zeros(0, dtype=torch.int64, device=gt_boxes.device)
        best = box_iou(jittered, gt_boxes).max(dim=1)
        return jittered.detach(), best.values, best.indices

    def loss(self, batch: RoIBatch) -> dict[str, Tensor]:
        """BCE (or smooth L1) of the predicted IoU of jittered ground-truth boxes (IoU >= 0.5); a
        class-aware head reads each box's output at the class of its best-matching ground truth."""
        boxes, targets, matched = zip(*(self._training_boxes(t["boxes"]) for t in batch.targets))
        labels = None
        if self.num_classes is not None:
            labels = torch.cat([t["labels"][m] for t, m in zip(batch.targets, matched)])
        target = torch.cat(targets)
        if target.numel() == 0:
            return {"loss_iou_net": zero_loss(self)}
        pred = self.score_boxes(batch.features, list(boxes), batch.image_sizes, labels)
        if self.iou_loss == "smooth_l1":
            value = F.smooth_l1_loss(pred.float(), target.float(), beta=1.0)
        else:
            value = bce(pred, target)
        return {"loss_iou_net": self.loss_weight * value}

    def predict(self, batch: RoIBatch) -> Tensor:
        """(N,) predicted IoU of ``batch.boxes``."""
        if batch.index.numel() == 0:
            return batch.pooled.new_zeros((0,))
        return self.score_boxes(batch.features, batch.boxes, batch.image_sizes, batch.labels)

    def refine(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]],
               steps: int = 5, step_size: float = 0.5, labels: Optional[list[Tensor]] = None,
               **kwargs) -> tuple[list[Tensor], list[Tensor]]:
        """Optimization-based refinement (Algorithm 2): per image, gradient ascent of the predicted IoU.

        ``labels``: per image (n_i,) the boxes' classes (needed by a class-aware head).
        Returns per image the refined boxes (n_i, 4) and their predicted IoU (n_i,); other keyword
        arguments go to :func:`locconf.refine.refine_boxes` (``min_gain``, ``max_drop``,
        ``keep_best``, ...); ``keep_best`` defaults to ``refine_keep_best``.
        """
        kwargs.setdefault("keep_best", self.refine_keep_best)
        out_boxes, out_scores = [], []
        for i, b in enumerate(boxes):
            feats = {k: v[i:i + 1] for k, v in features.items()}
            size, lab = image_sizes[i], None if labels is None else labels[i]

            def score_fn(x: Tensor, feats=feats, size=size, lab=lab) -> Tensor:
                if lab is None:
                    return self.score_boxes(feats, [x], [size])
                return self.score_boxes(feats, [x], [size], lab)

            result = refine_boxes(score_fn, b, steps=steps, step_size=step_size, image_size=size, **kwargs)
            out_boxes.append(result.boxes)
            out_scores.append(result.scores)
        return out_boxes, out_scores
