"""Decoupled IoU Regression (DIR, seed 002): Purity and Integrity predicted in hindsight.

Section 3 of the paper, as implemented here:

- **Hindsight** (Sec. 3.2, Eq. 7): the IoU of a regressed box ``b`` is predicted from the features
  of ``b`` itself, pooled by a second RoIAlign over the FPN, not from the features of the proposal
  it came from. The regressed boxes are detached: the head does not move the box regressor.
- **Decoupling** (Sec. 3.1, Eq. 3-5): two branches, each FC-ReLU, FC-ReLU, FC-sigmoid (Sec. 3.3),
  predict Purity ``s = area(b ∩ g) / area(b)`` and Integrity ``t = area(b ∩ g) / area(g)``; the
  IoU follows from Eq. 5, ``c = s t / (s + t - s t)``.
- **Training** (Sec. 3.3, Eq. 9-10): the regressed boxes of all *positive* (sampled) proposals,
  with binary cross-entropy on Purity, Integrity and the combined IoU against the true values for
  the ground truth each proposal was matched to; the three losses are added to Faster R-CNN's.
- **Inference** (Sec. 3.3): IoU is predicted only for boxes whose classification score exceeds a
  threshold ``a`` (``quality_thresh`` of :func:`locconf.models.build_rcnn`); the boxes are then
  ranked by the geometric mean ``sqrt(cls * IoU)`` (``postprocess(..., "quality")``).

The branches are class-agnostic, as in the paper (Sec. 4.2, "all the regressors ... are
class-agnostic").

Ablations of Sec. 4.3, as options of the same head (no copy of the code):

- ``confidence`` (Table 5): the localization confidence ``predict`` returns. ``"iou"`` (default,
  the paper's choice, 38.9 AP): Eq. 5's combined IoU. ``"purity"`` (37.9) or ``"integrity"``
  (37.7): one of the two alone; ``"geometric"`` (``sqrt(s t)``, 38.7) or ``"arithmetic"``
  (``(s + t) / 2``, 38.7): the two averaged. The paper does not say whether these rows were trained
  differently; here training is always Eq. 9-10 (all three losses) and only the confidence used at
  inference changes, so one trained model gives every row.
- ``train_features`` / ``inference_features`` (Table 4): the features the branches see in training
  and at inference, ``"boxes"`` (hindsight: the regressed boxes re-pooled, the paper's 38.9 AP) or
  ``"proposals"`` (foresight: the box head's RoIAlign features of each box's proposal). The four
  combinations are the table's rows: proposals/proposals 37.9 (:class:`~.dir_foresight.ForesightDIRHead`),
  proposals/boxes 38.3, boxes/proposals 37.5, boxes/boxes 38.9 (the default). The two poolings
  use the same operator and output size, so one trained head can be evaluated either way: the
  head's own pooling of the boxes is the box head's operator (``pool``, from ``build_rcnn``'s
  ``box_pool``): RoIAlign, the paper's, by default; Precise RoI Pooling with ``box_pool="prroi"``
  (then the proposals' features are PrRoIPool ones, and so are the boxes').

The BCE losses are computed from the branches' logits (:func:`.common.bce_with_logits`), and the
loss of the combined IoU from ``log c`` and ``log(1 - c)`` written in the two logits
(:func:`iou_log_probs`): exact at any logit, where a clamped probability would stop the gradient of
a saturated branch (Purity targets are often exactly 1).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from ..boxes import elementwise_integrity, elementwise_purity, iou_from_purity_integrity
from ..prroi_pool import MultiScalePrRoIPool
from .common import HeadContext, RoIBatch, bce_from_log_probs, bce_with_logits, mlp_branch, zero_loss

__all__ = ["DIRHead", "CONFIDENCES", "FEATURES", "POOLS", "iou_log_probs"]


CONFIDENCES = ("iou", "purity", "integrity", "geometric", "arithmetic")
FEATURES = ("boxes", "proposals")
POOLS = ("roi_align", "prroi")


def iou_log_probs(purity_logits: Tensor, integrity_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(log c, log(1 - c))`` of Eq. 5's IoU ``c = s t / (s + t - s t)``, ``s = sigmoid(a)``,
    ``t = sigmoid(b)``, from the logits ``a``, ``b`` (each (N,)), finite at any logit.

    With ``D = s + t - s t = s + t (1 - s)`` and ``1 - c = (s (1 - t) + t (1 - s)) / D``:
    ``log c = log s + log t - log D`` and ``log(1 - c) = logaddexp(log s + log(1 - t),
    log t + log(1 - s)) - log D``, ``log D = logaddexp(log s, log t + log(1 - s))``, with
    ``log s = logsigmoid(a)`` and ``log(1 - s) = logsigmoid(-a)``.
    """
    ls, l1s = F.logsigmoid(purity_logits), F.logsigmoid(-purity_logits)
    lt, l1t = F.logsigmoid(integrity_logits), F.logsigmoid(-integrity_logits)
    log_d = torch.logaddexp(ls, lt + l1s)
    return ls + lt - log_d, torch.logaddexp(ls + l1t, lt + l1s) - log_d


class DIRHead(nn.Module):
    """Purity and Integrity branches on re-pooled features of the regressed boxes.

    Args:
        in_channels: FPN channels C.
        featmap_names: FPN levels to pool from (those of the box head).
        pool_size: output size S of the second RoIAlign (7, as the box head; with
            ``"proposals"`` features it must equal the box head's pooling size).
        representation_size: width of the branches' hidden layers (1024 in the paper).
        loss_weight: scale of the three BCE losses (1 in Eq. 10).
        confidence: the localization confidence at inference (Table 5, module docstring):
            ``"iou"`` (Eq. 5, default), ``"purity"``, ``"integrity"``, ``"geometric"``,
            ``"arithmetic"``.
        train_features, inference_features: ``"boxes"`` (hindsight, default) or ``"proposals"``
            (foresight) in training / at inference (Table 4, module docstring).
        pool: the operator of the head's pooling of the boxes, ``"roi_align"`` (default, the
            paper's) or ``"prroi"``; ``from_options`` passes the box head's (module docstring).
    """

    name, default_method, signal = "dir", "quality", "quality"

    @classmethod
    def from_options(cls, context: HeadContext, options: Mapping[str, Any]) -> "DIRHead":
        """Built with ``build_rcnn``'s ``dir_confidence``, ``dir_train_features`` and
        ``dir_inference_features`` (None: the class's own default), pooling with the box head's
        operator (``context.box_pool``)."""
        chosen = {"confidence": options["dir_confidence"], "train_features": options["dir_train_features"],
                  "inference_features": options["dir_inference_features"]}
        return cls(context.in_channels, context.featmap_names, context.pool_size, context.representation_size,
                   pool=context.box_pool, **{k: v for k, v in chosen.items() if v is not None})

    def __init__(self, in_channels: int, featmap_names: Sequence[str], pool_size: int = 7,
                 representation_size: int = 1024, loss_weight: float = 1.0, *, confidence: str = "iou",
                 train_features: str = "boxes", inference_features: str = "boxes", pool: str = "roi_align") -> None:
        super().__init__()
        if in_channels < 1 or pool_size < 1:
            raise ValueError(f"in_channels and pool_size must be >= 1, got {in_channels}, {pool_size}")
        if loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        for name, value in (("train_features", train_features), ("inference_features", inference_features)):
            if value not in FEATURES:
                raise ValueError(f"{name} must be one of {FEATURES}, got {value!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = (MultiScalePrRoIPool(list(featmap_names), pool_size) if pool == "prroi"
                     else MultiScaleRoIAlign(list(featmap_names), pool_size, sampling_ratio=2))
        self.loss_weight = float(loss_weight)
        self.confidence = confidence
        self.train_features, self.inference_features = train_features, inference_features
        flat = in_channels * pool_size * pool_size
        self.purity = mlp_branch(flat, representation_size)
        self.integrity = mlp_branch(flat, representation_size)

    # -- features: hindsight re-pools the regressed boxes, foresight reuses the proposals' ----------
    def features(self, batch: RoIBatch, source: str | None = None) -> Tensor:
        """(N, C, S, S) features of ``batch.boxes``: ``source="boxes"`` pools the boxes again from
        the FPN, ``"proposals"`` takes the box head's RoIAlign features of each box's proposal;
        None: ``train_features`` in training mode, ``inference_features`` in eval mode."""
        if source is None:
            source = self.train_features if self.training else self.inference_features
        if source == "proposals":
            return batch.pooled[batch.index]
        return self.pool(batch.features, batch.boxes, batch.image_sizes)

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, S, S) features -> the logits ``(purity, integrity)``, each (N,)."""
        return self.purity(x).squeeze(1), self.integrity(x).squeeze(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C, S, S) features -> ``(purity, integrity, iou)``, each (N,) in [0, 1]."""
        a, b = self.logits(x)
        s, t = torch.sigmoid(a), torch.sigmoid(b)
        return s, t, iou_from_purity_integrity(s, t)

    @staticmethod
    def combine(purity: Tensor, integrity: Tensor, iou: Tensor, confidence: str) -> Tensor:
        """The localization confidence named ``confidence`` (Table 5) from the three outputs."""
        if confidence == "purity":
            return purity
        if confidence == "integrity":
            return integrity
        if confidence == "geometric":
            return torch.sqrt(purity * integrity)
        if confidence == "arithmetic":
            return (purity + integrity) / 2
        return iou

    @staticmethod
    def positives(batch: RoIBatch) -> tuple[RoIBatch, Tensor, Tensor]:
        """The rows of positive proposals: ``(sub-batch, boxes (K, 4), matched ground truth (K, 4))``."""
        pos = [p.nonzero().squeeze(1) for p in batch.positive]
        boxes = [b[i] for b, i in zip(batch.boxes, pos)]
        offsets = [sum(len(b) for b in batch.boxes[:k]) for k in range(len(pos))]
        rows = torch.cat([i + o for i, o in zip(pos, offsets)]) if pos else batch.index[:0]
        sub = RoIBatch(batch.features, batch.image_sizes, batch.proposals, batch.pooled, batch.box_features,
                       boxes, batch.index[rows])
        gts = torch.cat([g[i] for g, i in zip(batch.gt_boxes, pos)]) if pos else batch.pooled.new_zeros((0, 4))
        return sub, torch.cat(boxes) if boxes else gts, gts

    def loss(self, batch: RoIBatch) -> dict[str, Tensor]:
        """Eq. 9: BCE of Purity, Integrity and IoU over the boxes of positive proposals (from the
        logits, module docstring)."""
        sub, boxes, gts = self.positives(batch)
        if gts.shape[0] == 0:
            zero = zero_loss(self)
            return {"loss_purity": zero, "loss_integrity": zero, "loss_quality_iou": zero}
        a, b = self.logits(self.features(sub, self.train_features))
        purity = elementwise_purity(boxes, gts)
        integrity = elementwise_integrity(boxes, gts)
        iou = iou_from_purity_integrity(purity, integrity)
        w = self.loss_weight
        return {"loss_purity": w * bce_with_logits(a, purity), "loss_integrity": w * bce_with_logits(b, integrity),
                "loss_quality_iou": w * bce_from_log_probs(*iou_log_probs(a.float(), b.float()), iou)}

    def predict(self, batch: RoIBatch) -> Tensor:
        """(N,) localization confidence of ``batch.boxes``: by default the IoU of Eq. 5 from the
        predicted Purity and Integrity (``confidence`` selects a Table 5 alternative), from the
        ``inference_features``."""
        if batch.index.numel() == 0:
            return batch.pooled.new_zeros((0,))
        return self.combine(*self(self.features(batch, self.inference_features)), self.confidence)
