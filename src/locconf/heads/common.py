"""What the RoI stage hands to a localization-quality head, and the small MLP the heads share.

A quality head of the two-stage detector (:mod:`locconf.models.rcnn`) is an ``nn.Module`` with

- ``name``: its ``quality=`` name in :func:`locconf.models.build_rcnn`;
- ``default_method``: the post-processing of its paper (:data:`locconf.postprocess.METHODS`);
- ``signal``: the candidate field it predicts, ``"quality"`` (N,) in [0, 1] or ``"variances"`` (N, 4);
- ``from_options(context: HeadContext, options: dict) -> head`` (classmethod): build it from what
  the detector knows and ``build_rcnn``'s keyword options (the head reads its own keys);
- ``loss(batch: RoIBatch) -> dict[str, Tensor]``: its named training losses;
- ``predict(batch: RoIBatch) -> Tensor``: the signal for ``batch.boxes`` at inference;
- optionally ``box_coding = "corner"`` (the box regressor uses corner offsets) and
  ``replaces_box_loss = True`` (its loss replaces the box regression loss).

Each method lives in its own file: :mod:`.iou_net`, :mod:`.dir`, :mod:`.dir_foresight`,
:mod:`.iou_direct`, :mod:`.kl`; ``TWO_STAGE_HEADS`` in :mod:`locconf.heads` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RoIBatch", "HeadContext", "mlp_branch", "zero_loss", "bce_with_logits", "bce_from_log_probs"]


@dataclass(frozen=True)
class HeadContext:
    """What the detector tells a quality head's ``from_options`` about itself.

    Attributes:
        in_channels: FPN channels C.
        featmap_names: the FPN levels the box head pools from.
        pool_size: the box head's pooled size S.
        representation_size: width of the quality branches' hidden layers.
        box_representation_size: width R of the box head's representation.
        box_groups: column groups of the box regressor (1 class-agnostic, else classes + 1).
        num_classes: object classes K.
        box_pool: the box head's pooling operator, ``"roi_align"`` or ``"prroi"`` (a head that
            mixes its own pooling with the box head's features uses the same operator).
    """

    in_channels: int
    featmap_names: list[str]
    pool_size: int
    representation_size: int
    box_representation_size: int
    box_groups: int
    num_classes: int
    box_pool: str = "roi_align"


@dataclass
class RoIBatch:
    """The RoI stage's tensors for one batch of images (``n_i`` rows for image ``i``, N in all).

    Attributes:
        features: FPN maps, each (B, C, H_l, W_l).
        image_sizes: (h, w) of each (resized) image.
        proposals: per image (n_i, 4) proposal boxes that the rows come from.
        pooled: (P, C, S, S) RoIAlign features of the proposals (P rows; see ``index``).
        box_features: (P, R) the box head's representation of the proposals.
        boxes: per image (n_i, 4) regressed boxes (detached) whose quality is wanted.
        index: (N,) the row of ``pooled`` / ``box_features`` each box comes from (in training the
            identity; at inference several class candidates can share one proposal).
        gt_boxes: training only, per image (n_i, 4) the ground truth matched to each proposal.
        positive: training only, per image (n_i,) bool, the proposals labelled foreground.
        targets: training only, the images' targets (``boxes`` (M, 4), ``labels`` (M,)).
        box_class: (N,) the column group of the box regressor each row uses (0 when regression is
            class-agnostic, else the row's class).
        deltas: training only, (N, 4) predicted regression of each row for its target class.
        target_deltas: training only, (N, 4) regression targets of each row.
        labels: (N,) the class (1..K) of each row's box: at inference the candidate's class, in
            training the RoI's label (0 = background); used by class-aware heads.
    """

    features: dict[str, Tensor]
    image_sizes: list[tuple[int, int]]
    proposals: list[Tensor]
    pooled: Tensor
    box_features: Tensor
    boxes: list[Tensor]
    index: Tensor
    gt_boxes: Optional[list[Tensor]] = None
    positive: Optional[list[Tensor]] = None
    targets: Optional[list[dict]] = None
    box_class: Optional[Tensor] = None
    deltas: Optional[Tensor] = None
    target_deltas: Optional[Tensor] = None
    labels: Optional[Tensor] = None


def mlp_branch(in_features: int, hidden: int, out_features: int = 1) -> nn.Sequential:
    """FC-ReLU, FC-ReLU, FC: a regression branch of DIR (the sigmoid is applied by the caller)."""
    if in_features < 1 or hidden < 1 or out_features < 1:
        raise ValueError(f"layer sizes must be >= 1, got {in_features}, {hidden}, {out_features}")
    return nn.Sequential(
        nn.Flatten(1),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_features),
    )


def zero_loss(module: nn.Module) -> Tensor:
    """A zero that depends on every parameter of ``module`` (keeps DDP happy when a batch has no
    positive sample, and keeps the loss dict's keys the same for every batch)."""
    return sum(p.sum() for p in module.parameters()) * 0.0


def bce_with_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy of ``sigmoid(logits)`` (N,) against soft targets (N,) in [0, 1].

    Computed from the logits (``F.binary_cross_entropy_with_logits``, in float32), so its gradient
    ``sigmoid(x) - y`` is exact at any logit. The former form, BCE of the sigmoid probability clamped
    to ``[1e-6, 1 - 1e-6]``, had a zero gradient wherever the clamp was active (``|x| > 13.8``): a
    head pushed there by targets of exactly 1 (DIR's Purity often is) could not come back.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def bce_from_log_probs(log_p: Tensor, log_1mp: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy ``-(y log p + (1 - y) log(1 - p))`` from ``log p`` and ``log(1 - p)``
    (each (N,)), for a probability that is not one sigmoid (DIR's IoU from Purity and Integrity,
    Eq. 5): the caller computes both logarithms stably from the logits, so no clamp stops the
    gradient."""
    target = target.float()
    return -(target * log_p.float() + (1 - target) * log_1mp.float()).mean()
