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
- **Loss** (the paper does not state it; the reimplementation above, which reproduces the paper's
  gain, is our reference; its ``mmdet/iounet/iou_head.py`` and the configs
  ``configs/iounet/faster_rcnn_iou_r50_fpn_1x_coco.py`` (smooth L1) and
  ``assets/faster_rcnn_iou_r50_fpn_bce_1x_coco.py`` (BCE)):

  - ``iou_loss="bce"`` (default; the reimplementation found it 0.3 AP better on COCO): binary
    cross-entropy of ``sigmoid(x)`` against the IoU, computed from the logit ``x``
    (:func:`.common.bce_with_logits`: exact at any logit, as the reference's
    ``binary_cross_entropy_with_logits``); the predicted IoU is ``sigmoid(x)``.
  - ``iou_loss="smooth_l1"``: the reference's regression, "the paper uses SmoothL1Loss" as the
    reimplementation reads it: the output ``x`` is linear, trained with smooth L1 (beta 1) against
    the normalised target ``(IoU - 0.5) / 0.5`` (``target_norm=dict(mean=0.5, std=0.5)``), and the
    predicted IoU is ``0.5 x + 0.5``, mapped back. The refinement climbs that linear value, as the
    reference's; the candidates' ``quality`` is it clamped to [0, 1] (the candidates contract; the
    reference leaves it unclamped: only boxes predicted beyond 0 or 1 tie).
  - ``loss_weight=5.0`` (the reference's ``loss_weight=5.0``, in both configs), on the mean over
    the jittered boxes (the reference divides by their count). Before issue 29 the weight was 1
    and the smooth-L1 option regressed the *sigmoid* output ``p`` against the raw IoU: for an
    error ``e`` in IoU units its gradient at the output unit was ``e p (1 - p) <= e / 4``, the
    reference's is ``5 x 2 e = 10 e``, at least 40 times more.
- **Inference**: the predicted IoU of every candidate is its localization confidence, used by
  IoU-guided NMS (Sec. 3.2; ``postprocess(..., "iou-guided")``) and, optionally, as the objective
  of optimization-based refinement (Sec. 3.3, Algorithm 2; :meth:`IoUNetHead.refine`,
  :func:`locconf.refine.refine_boxes`).
- **Score of a refined box** (``score``): ``"cluster_max"`` (default) keeps what IoU-guided NMS gave
  it, the best classification score of its cluster (Algorithm 1, the paper's); ``"cls_x_iou"``
  multiplies it by the refined box's predicted IoU, as every configuration of the reimplementation
  does (``use_iou_score=True`` in the ``refine`` section; its ``mmdet/iounet/iou_roi_head.py``,
  ``refine_by_iou``) and only after refinement (:meth:`final_scores`).

Choices: the predictor is class-agnostic by default (one output, like DIR's regressors); the
paper's is class-aware, which ``num_classes=K`` gives (K outputs, the one of the box's class read:
in training the class of the best-matching ground truth, at inference the candidate's class; the
refinement climbs the IoU of the candidate's class). With one class the two are the same model. ``refine_keep_best=True`` (an option,
ours) makes the refinement return the best box each candidate visited instead of Algorithm 2's
box at the stopping step; ``build_rcnn`` passes ``refine_keep_best=False``, the paper's rule.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from ..boxes import box_iou, jitter_boxes
from ..prroi_pool import MultiScalePrRoIPool
from ..refine import refine_boxes
from .common import HeadContext, RoIBatch, bce_with_logits, mlp_branch, zero_loss

__all__ = ["IoUNetHead", "IOU_LOSSES", "IOU_NET_SCORES"]

IOU_LOSSES = ("bce", "smooth_l1")
#: The score of a refined box: the paper's cluster-max class score, or the reference's class x IoU.
IOU_NET_SCORES = ("cluster_max", "cls_x_iou")


class IoUNetHead(nn.Module):
    """IoU predictor on PrRoIPool features.

    Args:
        in_channels: FPN channels C.
        featmap_names: FPN levels to pool from.
        pool_size: PrRoIPool output size S.
        representation_size: width of the two hidden FC layers.
        boxes_per_gt: jittered training boxes wanted per ground-truth box (see the module
            docstring; :func:`locconf.boxes.jitter_boxes` keeps up to ``ceil(n / 5)`` per IoU bin).
        loss_weight: scale of the loss (5, the reference's; module docstring).
        max_boxes_per_image: cap on the training boxes of one image (a uniform random subset).
        iou_loss: ``"bce"`` | ``"smooth_l1"`` (module docstring).
        refine_keep_best: default of :meth:`refine`'s ``keep_best`` (module docstring).
        num_classes: None (one class-agnostic output) or K: class-aware, one output per class.
        score: the score of a refined box, ``"cluster_max"`` | ``"cls_x_iou"`` (module docstring).
    """

    name, default_method, signal = "iou_net", "iou-guided", "quality"

    @classmethod
    def from_options(cls, context: HeadContext, options: Mapping[str, Any]) -> "IoUNetHead":
        """Built with ``build_rcnn``'s ``iou_net_boxes_per_gt``, ``iou_net_max_boxes_per_image``,
        ``iou_net_loss``, ``iou_net_loss_weight``, ``iou_net_score``, ``refine_keep_best`` and
        ``iou_net_class_aware``."""
        return cls(context.in_channels, context.featmap_names, context.pool_size, context.representation_size,
                   options["iou_net_boxes_per_gt"], loss_weight=options["iou_net_loss_weight"],
                   max_boxes_per_image=options["iou_net_max_boxes_per_image"],
                   iou_loss=options["iou_net_loss"], refine_keep_best=options["refine_keep_best"],
                   num_classes=context.num_classes if options["iou_net_class_aware"] else None,
                   score=options["iou_net_score"])

    def __init__(self, in_channels: int, featmap_names: Sequence[str], pool_size: int = 7,
                 representation_size: int = 1024, boxes_per_gt: int = 128, loss_weight: float = 5.0,
                 max_boxes_per_image: int = 1000, iou_loss: str = "bce", refine_keep_best: bool = True,
                 num_classes: Optional[int] = None, score: str = "cluster_max") -> None:
        super().__init__()
        if in_channels < 1 or pool_size < 1 or boxes_per_gt < 1:
            raise ValueError(f"in_channels, pool_size and boxes_per_gt must be >= 1, got "
                             f"{in_channels}, {pool_size}, {boxes_per_gt}")
        if isinstance(max_boxes_per_image, bool) or not isinstance(max_boxes_per_image, int) or max_boxes_per_image < 1:
            raise ValueError(f"max_boxes_per_image must be an int >= 1, got {max_boxes_per_image!r}")
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
                or not math.isfinite(loss_weight) or loss_weight < 0:
            raise ValueError(f"loss_weight must be a finite number >= 0, got {loss_weight!r}")
        if score not in IOU_NET_SCORES:
            raise ValueError(f"score must be one of {IOU_NET_SCORES}, got {score!r}")
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
        self.score = score

    def raw_output(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]],
                   labels: Optional[Tensor] = None) -> Tensor:
        """(sum n_i,) the output unit of each box, before any mapping: a logit (``"bce"``) or the
        normalised IoU ``(IoU - 0.5) / 0.5`` (``"smooth_l1"``). A class-aware head reads the output
        of each box's class, ``labels`` (sum n_i,) in 1..K."""
        out = self.iou(self.pool(features, boxes, image_sizes))
        if self.num_classes is None:
            return out.squeeze(1)
        if labels is None:
            raise ValueError("a class-aware IoU head (num_classes set) needs the boxes' labels")
        return out.gather(1, (labels.to(torch.int64) - 1).clamp(0, self.num_classes - 1)[:, None]).squeeze(1)

    def predicted_iou(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]],
                      labels: Optional[Tensor] = None) -> Tensor:
        """(sum n_i,) predicted IoU, what the refinement climbs: ``sigmoid(x)`` (``"bce"``) or
        ``0.5 x + 0.5`` (``"smooth_l1"``, unclamped as the reference's); differentiable in the boxes."""
        out = self.raw_output(features, boxes, image_sizes, labels)
        return torch.sigmoid(out) if self.iou_loss == "bce" else out * 0.5 + 0.5

    def score_boxes(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]],
                    labels: Optional[Tensor] = None) -> Tensor:
        """(sum n_i,) predicted IoU of per-image boxes in [0, 1] (:meth:`predicted_iou`, clamped for
        ``"smooth_l1"``), the candidates' ``quality``."""
        out = self.predicted_iou(features, boxes, image_sizes, labels)
        return out if self.iou_loss == "bce" else out.clamp(0.0, 1.0)

    def final_scores(self, scores: Tensor, iou: Tensor) -> Tensor:
        """The score of refined boxes (N,) from their IoU-guided NMS score (N,) and refined IoU (N,):
        unchanged (``"cluster_max"``) or ``scores * iou`` (``"cls_x_iou"``)."""
        return scores if self.score == "cluster_max" else scores * iou.to(scores.dtype)

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
        """``loss_weight`` x BCE of the logit (or smooth L1 of the linear output against
        ``(IoU - 0.5) / 0.5``) of jittered ground-truth boxes (IoU >= 0.5); a class-aware head
        reads each box's output at the class of its best-matching ground truth."""
        boxes, targets, matched = zip(*(self._training_boxes(t["boxes"]) for t in batch.targets))
        labels = None
        if self.num_classes is not None:
            labels = torch.cat([t["labels"][m] for t, m in zip(batch.targets, matched)])
        target = torch.cat(targets)
        if target.numel() == 0:
            return {"loss_iou_net": zero_loss(self)}
        out = self.raw_output(batch.features, list(boxes), batch.image_sizes, labels)
        return {"loss_iou_net": self.loss_weight * self.loss_value(out, target)}

    def loss_value(self, out: Tensor, iou: Tensor) -> Tensor:
        """The unweighted loss of output units ``out`` (N,) (:meth:`raw_output`) against target IoUs
        ``iou`` (N,): BCE from the logits, or smooth L1 (beta 1) against ``(iou - 0.5) / 0.5``."""
        if self.iou_loss == "smooth_l1":
            return F.smooth_l1_loss(out.float(), (iou.float() - 0.5) / 0.5, beta=1.0)
        return bce_with_logits(out, iou)

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
        Returns per image the refined boxes (n_i, 4) and their predicted IoU (n_i,) in [0, 1] (the
        ascent climbs :meth:`predicted_iou`); other keyword arguments go to
        :func:`locconf.refine.refine_boxes` (``min_gain``, ``max_drop``, ``keep_best``, ...);
        ``keep_best`` defaults to ``refine_keep_best``.
        """
        kwargs.setdefault("keep_best", self.refine_keep_best)
        out_boxes, out_scores = [], []
        for i, b in enumerate(boxes):
            feats = {k: v[i:i + 1] for k, v in features.items()}
            size, lab = image_sizes[i], None if labels is None else labels[i]

            def score_fn(x: Tensor, feats=feats, size=size, lab=lab) -> Tensor:
                if lab is None:
                    return self.predicted_iou(feats, [x], [size])
                return self.predicted_iou(feats, [x], [size], lab)

            result = refine_boxes(score_fn, b, steps=steps, step_size=step_size, image_size=size, **kwargs)
            out_boxes.append(result.boxes)
            out_scores.append(result.scores if self.iou_loss == "bce" else result.scores.clamp(0.0, 1.0))
        return out_boxes, out_scores
