"""The dense head every one-stage head builds on, and the protocol a head follows.

A one-stage detector (:class:`locconf.models.one_stage.OneStageDetector`) runs the backbone, one
dense head over the FPN levels and the anchor generator. In training it assigns anchors to ground
truths with ATSS (:mod:`.assign`, the same for every head), gathers the positives into a
:class:`Positives` and asks the head for its losses; at inference it asks the head for its scores
(:class:`DenseScores`), then selects and decodes the candidates itself, the same for every head.

A one-stage head is a subclass of :class:`DenseHead`, one file per method (:mod:`.atss`,
:mod:`.gfl`, :mod:`.clq`), registered by name in :data:`locconf.models.dense.HEADS` (one line).
The base class owns what the heads share: two GroupNorm towers (classification, regression), the
class logits (``K`` sigmoid outputs per anchor, no background class), the box branch with one
learnable scale per level (ATSS's deltas, or GFL's general distribution when ``reg_max`` is set),
an optional per-anchor logit ``quality_pred`` on the regression tower, the weight initialisation
and the decoding of boxes. A head defines:

- ``name``: its ``head=`` in :func:`locconf.models.build_one_stage`;
- ``quality_branch``: whether it has ``quality_pred`` (default False);
- ``default_method``: the post-processing ``detect`` applies (:data:`locconf.postprocess.METHODS`);
- ``__init__(in_channels, num_anchors, num_classes, num_levels, *, <its options>, **common)``:
  :func:`build_one_stage` passes the head those of its own arguments that the constructor names
  (:meth:`DenseHead.options`), and ``common`` (``num_convs``, ``norm_groups``,
  ``box_loss_weight``, ...) goes on to the base;
- ``build_branches(in_channels, **options)`` (optional): further modules, built after the shared
  ones and before the weights are initialised; ``options`` are the keyword arguments the head's
  ``__init__`` passes to the base beyond the base's own;
- ``level_outputs(level, cls_feat, reg_feat) -> dict[str, Tensor]`` (optional, extend ``super()``'s):
  the maps of one pyramid level from its two tower features. Besides the base's ``cls_logits`` and
  box output, every map is one value per anchor, (B, A, H, W), and ``forward`` returns it as (B, N);
- ``loss(out, pos: Positives) -> dict[str, Tensor]``: the head's named training losses, from
  ``forward``'s outputs ``out`` over the batch and the ATSS positives ``pos``;
- ``predict(out) -> DenseScores``: the score of every (anchor, class) pair and the extra
  candidate fields.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ...boxes import decode_boxes

__all__ = ["DenseHead", "Positives", "DenseScores", "Scale", "BOX_CODER_WEIGHTS", "distribution_expectation",
           "distances_to_boxes", "boxes_to_distances", "weighted_loss"]

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # ATSS's anchor-based box coder


@dataclass
class Positives:
    """The anchors ATSS assigns to a ground truth, over the whole batch (P rows).

    Attributes:
        image: (P,) the image of each positive.
        anchor: (P,) its anchor, an index into the ``N`` anchors of the head's outputs.
        gt_boxes: (P, 4) its ground-truth box.
        labels: (P,) the ground truth's class, 0-based (a column of ``cls_logits``).
        anchors: (P, 4) its anchor box.
        strides: (P, 2) the ``(x, y)`` stride of its pyramid level.
        box_out: (P, 4) | (P, 4, reg_max + 1) the head's box output at it (float).
        boxes: (P, 4) its decoded predicted box (differentiable).
        num_pos: ``max(P, 1)``, the losses' normaliser.
    """

    image: Tensor
    anchor: Tensor
    gt_boxes: Tensor
    labels: Tensor
    anchors: Tensor
    strides: Tensor
    box_out: Tensor
    boxes: Tensor
    num_pos: int

    @property
    def centers(self) -> Tensor:
        """(P, 2) the anchors' centres."""
        return (self.anchors[:, :2] + self.anchors[:, 2:]) / 2

    def at(self, values: Tensor) -> Tensor:
        """The rows of a per-anchor output (B, N, ...) at the positives -> (P, ...)."""
        return values[self.image, self.anchor]

    def class_targets(self, like: Tensor, values: Tensor | float) -> Tensor:
        """Targets shaped as ``like`` (B, N, K): ``values`` at each positive's class, 0 elsewhere.

        At least float32 even when ``like`` is half precision (mixed-precision training): the soft
        targets are IoUs (whatever precision they were computed in), kept at float32 precision."""
        targets = torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))
        if isinstance(values, Tensor):
            values = values.to(targets.dtype)
        targets[self.image, self.anchor, self.labels] = values
        return targets


@dataclass
class DenseScores:
    """What a head scores at inference, for all B images, N anchors and K classes.

    Attributes:
        select: (B, N, K) what candidates are ranked and thresholded on (``score_thresh``).
        scores: (B, N, K) the candidates' ``scores``.
        anchor_fields: further candidate fields (:class:`locconf.candidates.Candidates`), one value
            per anchor: name -> (B, N).
        class_fields: further candidate fields, one value per (anchor, class): name -> (B, N, K).
    """

    select: Tensor
    scores: Tensor
    anchor_fields: dict[str, Tensor] = field(default_factory=dict)
    class_fields: dict[str, Tensor] = field(default_factory=dict)


class Scale(nn.Module):
    """A learnable scalar multiplying the box deltas of one pyramid level (FCOS / ATSS)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _flatten(x: Tensor, num_anchors: int) -> Tensor:
    """(B, A * C, H, W) -> (B, H * W * A, C), the order of torchvision's anchors."""
    b, _, h, w = x.shape
    return x.view(b, num_anchors, -1, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, -1)


def distribution_expectation(logits: Tensor) -> Tensor:
    """GFL's integral (Sec. 3.3): ``(..., n + 1)`` logits over the values ``0..n`` -> ``(...)``
    expectation ``sum_j softmax(logits)_j * j``."""
    values = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return torch.softmax(logits, dim=-1) @ values


def distances_to_boxes(centers: Tensor, distances: Tensor) -> Tensor:
    """Boxes from centres (M, 2) and distances (M, 4) ``(left, top, right, bottom)`` -> (M, 4) xyxy."""
    return torch.cat([centers - distances[:, :2], centers + distances[:, 2:]], dim=1)


def boxes_to_distances(centers: Tensor, boxes: Tensor) -> Tensor:
    """Distances (M, 4) ``(left, top, right, bottom)`` from centres (M, 2) to the sides of boxes (M, 4)."""
    return torch.cat([centers - boxes[:, :2], boxes[:, 2:] - centers], dim=1)


def weighted_loss(values: Tensor, weight: Tensor, loss_weight: float) -> Tensor:
    """``loss_weight * sum(weight * values) / sum(weight)`` (the sum of the weights at least 1e-6):
    how ATSS and GFL weight and normalise their box losses over the positives."""
    return loss_weight * (weight * values).sum() / weight.sum().clamp(min=1e-6)


class DenseHead(nn.Module):
    """The shared dense head: two GroupNorm towers, the class and box outputs, decoding.

    Subclasses add the method (see the module docstring for the protocol); this class is abstract.

    Args:
        in_channels: FPN channels.
        num_anchors: anchors per location ``A``.
        num_classes: ``K`` (sigmoid outputs, no background class).
        num_levels: pyramid levels (one learnable box-output scale each).
        num_convs: convolutions per tower (4 in ATSS / GFL).
        norm_groups: GroupNorm groups of the towers.
        prior_prob: initial foreground probability of the class outputs (RetinaNet, Sec. 4.1).
        box_loss_weight: weight of the head's box (GIoU) loss.
        reg_max: ``None``: the box output is ATSS's 4 deltas per anchor; an int ``n``: GFL's
            general distribution, ``n + 1`` logits per box side (Sec. 3.3; ``n = 16`` in GFL).
        **branch_options: passed to :meth:`build_branches`.

    ``forward(features)`` takes the FPN maps (B, C, H_l, W_l) and returns a dict of tensors over all
    N = sum_l H_l W_l A anchors: ``cls_logits`` (B, N, K); ``bbox_deltas`` (B, N, 4) or, with
    ``reg_max``, ``bbox_dist`` (B, N, 4, reg_max + 1) logits of the distances (left, top, right,
    bottom) in strides; and the head's per-anchor outputs (B, N) (:meth:`level_outputs`).
    """

    name: str = ""
    quality_branch: bool = False
    default_method: str = "nms"

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_levels: int, *,
                 num_convs: int = 4, norm_groups: int = 32, prior_prob: float = 0.01,
                 box_loss_weight: float = 2.0, reg_max: int | None = None, **branch_options) -> None:
        super().__init__()
        self.num_anchors, self.num_classes, self.reg_max = num_anchors, num_classes, reg_max
        self.box_loss_weight = box_loss_weight
        self.cls_tower = _tower(in_channels, num_convs, norm_groups)
        self.reg_tower = _tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        box_outputs = 4 if reg_max is None else 4 * (reg_max + 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * box_outputs, 3, padding=1)
        self.quality_pred = nn.Conv2d(in_channels, num_anchors, 3, padding=1) if self.quality_branch else None
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        self.build_branches(in_channels, **branch_options)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def options(cls, available: dict) -> dict:
        """The entries of ``available`` that this head's ``__init__`` names (its own options)."""
        names = inspect.signature(cls).parameters
        return {k: v for k, v in available.items() if k in names}

    def build_branches(self, in_channels: int) -> None:
        """Hook: build the head's further modules (none here)."""

    # -- forward ------------------------------------------------------------------------------

    @property
    def box_key(self) -> str:
        return "bbox_deltas" if self.reg_max is None else "bbox_dist"

    def level_outputs(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> dict[str, Tensor]:
        """The maps of one level: class logits (B, A K, H, W) and box outputs (B, A 4 (n + 1), H, W)."""
        return {"cls_logits": self.cls_logits(cls_feat), self.box_key: self.scales[level](self.bbox_pred(reg_feat))}

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        if len(features) != len(self.scales):
            raise ValueError(f"features must have {len(self.scales)} levels, got {len(features)}")
        maps: dict[str, list[Tensor]] = {}
        for level, x in enumerate(features):
            for name, value in self.level_outputs(level, self.cls_tower(x), self.reg_tower(x)).items():
                flat = _flatten(value, self.num_anchors)
                maps.setdefault(name, []).append(flat if name in ("cls_logits", self.box_key) else flat[..., 0])
        out = {name: torch.cat(values, dim=1) for name, values in maps.items()}
        if self.reg_max is not None:
            box = out[self.box_key]
            out[self.box_key] = box.view(*box.shape[:2], 4, self.reg_max + 1)
        return out

    # -- boxes --------------------------------------------------------------------------------

    def box_output(self, out: dict[str, Tensor]) -> Tensor:
        """The box output: deltas (B, N, 4) or distribution logits (B, N, 4, reg_max + 1), as float."""
        return out[self.box_key].float()

    def decode(self, box_out: Tensor, anchors: Tensor, strides: Tensor) -> Tensor:
        """Boxes (M, 4) from the box outputs of M anchors (M, 4) | (M, 4, n + 1), their boxes (M, 4)
        and strides (M, 2): ATSS's delta coder, or GFL's expected distances (in strides) from the
        anchor centre."""
        if self.reg_max is None:
            return decode_boxes(box_out, anchors, BOX_CODER_WEIGHTS)
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        return distances_to_boxes(centers, distribution_expectation(box_out) * strides.repeat(1, 2))

    # -- the method ---------------------------------------------------------------------------

    def loss(self, out: dict[str, Tensor], pos: Positives) -> dict[str, Tensor]:
        """The head's named training losses (see the module docstring)."""
        raise NotImplementedError

    def predict(self, out: dict[str, Tensor]) -> DenseScores:
        """The head's scores and candidate fields at inference (see the module docstring)."""
        raise NotImplementedError
