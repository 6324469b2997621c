"""DIR's foresight ablation (seed 002, Sec. 4.3, Tables 3-4, "Foresight IoU + P&I").

The same Purity and Integrity branches, losses and targets as :class:`~locconf.heads.dir.DIRHead`
(the IoU of the *regressed* box), but predicted from the features of the *proposal* the box came
from (Eq. 6), i.e. the RoIAlign features the box head already pooled: no second pooling. The
paper finds this worse (37.9 vs 38.9 AP, Pearson 0.633 vs 0.745 without P&I), because the head
must guess the IoU of a box it never sees and its target moves as the regressor trains.

The mixed rows of Table 4 (proposal features in training and box features at inference, or the
reverse) are ``train_features`` / ``inference_features`` of either class; this one only changes
the defaults (``build_rcnn(..., quality="dir_foresight")``).
"""

from __future__ import annotations

from typing import Sequence

from .dir import DIRHead

__all__ = ["ForesightDIRHead"]


class ForesightDIRHead(DIRHead):
    """Purity/Integrity of the regressed box from the proposal's features (see :class:`DIRHead`).

    :class:`DIRHead` with ``train_features="proposals"`` and ``inference_features="proposals"``
    (Table 4's first row, 37.9 AP); its other arguments, ``confidence`` included, are DIRHead's.
    """

    name = "dir_foresight"

    def __init__(self, in_channels: int, featmap_names: Sequence[str], pool_size: int = 7,
                 representation_size: int = 1024, loss_weight: float = 1.0, *, confidence: str = "iou",
                 train_features: str = "proposals", inference_features: str = "proposals",
                 pool: str = "roi_align") -> None:
        super().__init__(in_channels, featmap_names, pool_size, representation_size, loss_weight,
                         confidence=confidence, train_features=train_features,
                         inference_features=inference_features, pool=pool)
