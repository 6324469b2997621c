"""DIR's "Hindsight IoU" ablation (seed 002, Sec. 4.3, Table 3): one branch predicts IoU directly.

Features as in :class:`~locconf.heads.dir.DIRHead` (the regressed boxes re-pooled: hindsight), but
a single FC-ReLU, FC-ReLU, FC-sigmoid branch regresses the IoU itself with one BCE loss, instead of
Purity and Integrity combined by Eq. 5. The paper reports 38.3 AP against DIR's 38.9, and a Pearson
correlation with the true IoU of 0.743 against 0.755.

The head builds only its pooling and its one branch (not DIR's two): its state dict is ``iou.*``.
It trains on the same rows as DIR, the regressed boxes of the positive proposals
(:meth:`DIRHead.positives <locconf.heads.dir.DIRHead.positives>`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from ..boxes import elementwise_box_iou
from .common import HeadContext, RoIBatch, bce_with_logits, mlp_branch, zero_loss
from .dir import DIRHead

__all__ = ["DirectIoUHead"]


class DirectIoUHead(nn.Module):
    """One IoU branch on hindsight features.

    Args:
        in_channels: FPN channels C.
        featmap_names: FPN levels to pool from (those of the box head).
        pool_size: output size S of the second RoIAlign.
        representation_size: width of the branch's hidden layers.
        loss_weight: scale of the BCE loss.
    """

    name, default_method, signal = "iou_direct", "quality", "quality"

    @classmethod
    def from_options(cls, context: HeadContext, options: Mapping[str, Any]) -> "DirectIoUHead":
        """Built from the context alone (no option of its own)."""
        return cls(context.in_channels, context.featmap_names, context.pool_size, context.representation_size)

    def __init__(self, in_channels: int, featmap_names: Sequence[str], pool_size: int = 7,
                 representation_size: int = 1024, loss_weight: float = 1.0) -> None:
        super().__init__()
        if in_channels < 1 or pool_size < 1:
            raise ValueError(f"in_channels and pool_size must be >= 1, got {in_channels}, {pool_size}")
        if loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight}")
        self.pool = MultiScaleRoIAlign(list(featmap_names), pool_size, sampling_ratio=2)
        self.loss_weight = float(loss_weight)
        self.iou = mlp_branch(in_channels * pool_size * pool_size, representation_size)

    def features(self, batch: RoIBatch) -> Tensor:
        """(N, C, S, S) features of ``batch.boxes`` pooled again from the FPN (hindsight)."""
        return self.pool(batch.features, batch.boxes, batch.image_sizes)

    def forward(self, x: Tensor) -> tuple[None, None, Tensor]:
        """(N, C, S, S) -> ``(None, None, iou (N,))`` (the places of DIR's Purity and Integrity empty)."""
        return None, None, torch.sigmoid(self.iou(x)).squeeze(1)

    def loss(self, batch: RoIBatch) -> dict[str, Tensor]:
        """BCE of the predicted IoU over the regressed boxes of positive proposals."""
        sub, boxes, gts = DIRHead.positives(batch)
        if gts.shape[0] == 0:
            return {"loss_quality_iou": zero_loss(self)}
        logits = self.iou(self.features(sub)).squeeze(1)  # BCE from the logits: exact at any logit
        return {"loss_quality_iou": self.loss_weight * bce_with_logits(logits, elementwise_box_iou(boxes, gts))}

    def predict(self, batch: RoIBatch) -> Tensor:
        """(N,) predicted IoU of ``batch.boxes``."""
        if batch.index.numel() == 0:
            return batch.pooled.new_zeros((0,))
        return self(self.features(batch))[2]
