"""KL-Loss (He et al., CVPR 2019; seed 003): a Gaussian box with a learned variance per coordinate.

Sources: the paper (arXiv 1809.08545) and the released code, github.com/ethanhe42/KL-Loss
(Detectron; read for this module: ``detectron/modeling/fast_rcnn_heads.py``,
``detectron/utils/boxes.py``, ``detectron/core/config.py``,
``configs/e2e_faster_rcnn_R-50-FPN_2x.yaml``).

- **Parameterisation** (Eq. 1): the box is regressed as four corner offsets normalised by the
  proposal's size (:func:`locconf.boxes.encode_corners`), so each coordinate has its own variance.
  Eq. 1 writes the offsets unscaled (``(x1 - x1_a) / w_a``); the released code multiplies them by
  Detectron's ``BBOX_REG_WEIGHTS`` (``bbox_transform_inv_xyxy``: ``wx``/``wy`` = 10 on all four
  corners with the default ``(10, 10, 5, 5)``, which its configs keep). The detector here encodes
  with ``weight = 10`` likewise, so the loss below sees the code's targets.
- **Head**: a fully connected layer beside the box regressor predicts ``alpha = log(sigma^2)`` for
  every regressed coordinate (weights N(0, 1e-4), bias 0, as the code's ``bbox_pred_std``, so
  training starts as plain smooth-L1 regression). With class-specific box regression
  (``build_rcnn(..., class_agnostic_box=False)``, Detectron's default and so the reference's)
  there is one ``alpha`` per class and coordinate (``num_box_groups``), each positive trained on
  its class's group, as in the code; class-agnostic (one group) is our default setting (DIR's).
- **Loss** (Eq. 9-10): with ``d = t - t*`` (prediction minus target, in the encoded units),

      ``L = exp(-alpha) * (|d| - 1/2) + alpha / 2``      for ``|d| > 1``,
      ``L = exp(-alpha) * d^2 / 2 + alpha / 2``          otherwise,

  i.e. ``exp(-alpha) * smoothL1(d; beta=1) + alpha / 2``. The code switches at exactly 1 too
  (its ``GE``/``LT`` against ``one`` on the ``bbox_inside_weights``-masked difference, and
  Caffe2's ``SmoothL1Loss`` with its default beta 1 for the offsets' gradient), on the x10
  targets: the quadratic part covers errors up to a tenth of the proposal's size. ``beta`` stays
  an option (:func:`kl_loss`); the former default 1/9 (Faster R-CNN's box loss here) made the loss
  linear almost everywhere. Summed over the coordinates of positive proposals and divided by the
  number of sampled proposals (the code's ``ReduceMean`` over RoIs and Caffe2's ``SmoothL1Loss``
  normalisation). It *replaces* the smooth-L1 box loss. The code splits it into a term that trains
  alpha and an ``exp(-alpha)``-weighted smooth-L1 that trains the offsets; both halves have exactly
  the gradients of the formula above, so one expression is written here.
- **Inference**: the variances, converted to pixels^2 (``exp(alpha) * (w_p / weight)^2`` for x,
  ``(h_p / weight)^2`` for y, with ``w_p, h_p`` the proposal's size), reach the candidates as
  ``variances`` (N, 4) for variance voting (Sec. 3.3; ``postprocess(..., "var-voting+soft")``).
  (The code's ``bbox_std_transform_xyxy`` omits the ``1 / weight``: a common factor of every
  variance, which variance voting's normalised weights do not see.)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .common import HeadContext, RoIBatch

__all__ = ["KLHead", "kl_loss"]


def kl_loss(deltas: Tensor, log_variance: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Elementwise KL loss between a Gaussian ``N(deltas, exp(log_variance))`` and a Dirac at ``target``.

    Up to constants, ``exp(-alpha) * smoothL1(deltas - target; beta) + alpha / 2`` with
    ``smoothL1(d; beta) = d^2 / (2 beta)`` for ``|d| < beta``, ``|d| - beta / 2`` otherwise.

    Args:
        deltas, log_variance, target: tensors of the same shape.
        beta: where the loss turns from quadratic to linear: 1 as in the paper (Eq. 9-10) and its
            code; other values are our option (1/9 was the former default).

    Returns:
        the elementwise loss, same shape.
    """
    if not (deltas.shape == log_variance.shape == target.shape):
        raise ValueError(f"deltas, log_variance and target must have one shape, got {tuple(deltas.shape)}, "
                         f"{tuple(log_variance.shape)}, {tuple(target.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    err = nn.functional.smooth_l1_loss(deltas, target, beta=beta, reduction="none")
    return torch.exp(-log_variance) * err + 0.5 * log_variance


class KLHead(nn.Module):
    """Log-variance predictor of the box regressor.

    Args:
        representation_size: width R of the box head's representation.
        num_box_groups: column groups of the box regressor (1 class-agnostic, else classes + 1).
        weight: the corner-offset scale of :func:`locconf.boxes.encode_corners` (10, the
            detector's coding and the released code's).
        beta: quadratic-to-linear transition of :func:`kl_loss` (1, the paper's).
    """

    name, default_method, signal = "kl", "var-voting+soft", "variances"
    box_coding = "corner"
    replaces_box_loss = True

    @classmethod
    def from_options(cls, context: HeadContext, options: Mapping[str, Any]) -> "KLHead":
        """Built on the box head's representation and regressor groups (no option of its own)."""
        return cls(context.box_representation_size, context.box_groups)

    def __init__(self, representation_size: int, num_box_groups: int = 1, weight: float = 10.0,
                 beta: float = 1.0) -> None:
        super().__init__()
        if representation_size < 1 or num_box_groups < 1 or not weight > 0:
            raise ValueError(f"need representation_size >= 1, num_box_groups >= 1, weight > 0; got "
                             f"{representation_size}, {num_box_groups}, {weight}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.log_variance = nn.Linear(representation_size, 4 * num_box_groups)
        nn.init.normal_(self.log_variance.weight, std=1e-4)
        nn.init.zeros_(self.log_variance.bias)
        self.weight = float(weight)
        self.beta = float(beta)

    def _alpha(self, batch: RoIBatch) -> Tensor:
        """(N, 4) log-variance of each row's regressed box."""
        alpha = self.log_variance(batch.box_features[batch.index])
        alpha = alpha.view(alpha.shape[0], -1, 4)
        return alpha[torch.arange(alpha.shape[0], device=alpha.device), batch.box_class]

    def loss(self, batch: RoIBatch) -> dict[str, Tensor]:
        """KL loss over the positive rows, normalised by the number of sampled rows."""
        pos = torch.cat(batch.positive)
        alpha = self._alpha(batch)
        loss = kl_loss(batch.deltas[pos], alpha[pos], batch.target_deltas[pos], self.beta)
        return {"loss_box_kl": loss.sum() / max(pos.numel(), 1) + 0.0 * alpha.sum()}

    def predict(self, batch: RoIBatch) -> Tensor:
        """(N, 4) variances of ``(x1, y1, x2, y2)`` in pixels^2."""
        if batch.index.numel() == 0:
            return batch.box_features.new_zeros((0, 4))
        proposals = torch.cat(batch.proposals)[batch.index]
        scale = ((proposals[:, 2:] - proposals[:, :2]) / self.weight).repeat(1, 2)
        return torch.exp(self._alpha(batch)) * scale.square()
