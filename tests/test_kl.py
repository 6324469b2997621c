"""KL-Loss: the loss against Eq. 9-10 written out per element, and the head's class-specific groups."""

from __future__ import annotations

import math

import pytest
import torch

from locconf.heads import KLHead, RoIBatch, kl_loss
from locconf.models import build_rcnn

pytestmark = pytest.mark.usefixtures("one_thread")


def eq9_10(x_e: float, alpha: float, x_g: float) -> float:
    """He et al. 2019, Eq. 9-10, one coordinate: linear beyond |x_g - x_e| = 1, quadratic inside."""
    d = abs(x_g - x_e)
    if d > 1:
        return math.exp(-alpha) * (d - 0.5) + alpha / 2
    return math.exp(-alpha) * d * d / 2 + alpha / 2


def test_default_switches_at_one_hand_computed():
    d = torch.tensor([0.5, 3.0, 1.0, -2.0])
    alpha = torch.tensor([0.0, math.log(4.0), 1.0, -1.0])
    expected = [0.125, (3 - 0.5) / 4 + 0.5 * math.log(4.0), math.exp(-1) * 0.5 + 0.5, math.e * 1.5 - 0.5]
    assert kl_loss(d, alpha, torch.zeros(4)).tolist() == pytest.approx(expected, rel=1e-6)


def test_matches_eq9_10_elementwise_and_beta_stays_an_option():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(200, generator=g, dtype=torch.float64) * 2
    target = torch.randn(200, generator=g, dtype=torch.float64)
    alpha = torch.randn(200, generator=g, dtype=torch.float64)
    ours = kl_loss(deltas, alpha, target)
    ref = [eq9_10(e, a, t) for e, a, t in zip(deltas.tolist(), alpha.tolist(), target.tolist())]
    assert ours.tolist() == pytest.approx(ref, rel=1e-12)
    assert ((deltas - target).abs() < 1).any() and ((deltas - target).abs() > 1).any()  # both regimes
    # beta = 1/9 (the former default): the quadratic part ends at 1/9
    d = torch.tensor([0.05, 2.0])
    expected = [0.5 * 0.05**2 * 9, 2 - 1 / 18]
    assert kl_loss(d, torch.zeros(2), torch.zeros(2), beta=1 / 9).tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        kl_loss(d, torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        KLHead(8, beta=-1.0)


def test_head_uses_the_class_group_of_each_row():
    """num_box_groups = K + 1 (class-specific regression): each row's alpha is the group of its class."""
    torch.manual_seed(0)
    head = KLHead(representation_size=5, num_box_groups=3)
    feats = torch.randn(4, 5)
    box_class = torch.tensor([1, 2, 0, 2])
    positive = torch.tensor([True, True, False, True])
    deltas, target = torch.randn(4, 4) * 2, torch.randn(4, 4)
    proposals = torch.tensor([[0.0, 0, 10, 20], [5, 5, 25, 15], [0, 0, 4, 4], [2, 2, 42, 12]])
    batch = RoIBatch({}, [(64, 64)], [proposals], torch.zeros(4, 1, 1, 1), feats, [proposals], torch.arange(4),
                     [proposals], [positive], None, box_class, deltas, target)
    all_alpha = head.log_variance(feats).view(4, 3, 4)
    total = 0.0
    for i in range(4):
        if positive[i]:
            for c in range(4):
                total += eq9_10(deltas[i, c].item(), all_alpha[i, box_class[i], c].item(), target[i, c].item())
    # summed over the positives, divided by all 4 sampled rows (Faster R-CNN's and the code's normalisation)
    assert head.loss(batch)["loss_box_kl"].item() == pytest.approx(total / 4, rel=1e-5)
    wh = (proposals[:, 2:] - proposals[:, :2]).repeat(1, 2) / 10
    expected = torch.exp(all_alpha[torch.arange(4), box_class]) * wh**2
    torch.testing.assert_close(head.predict(batch), expected)


def test_class_specific_kl_detector_trains_only_the_groups_of_positive_classes():
    torch.manual_seed(0)
    tiny = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=128, rpn_post_nms_top_n_test=200,
                candidates_per_image=150)
    model = build_rcnn(3, quality="kl", class_agnostic_box=False, **tiny)
    head = model.roi_heads.quality_head
    assert head.log_variance.out_features == 4 * 4
    images = [torch.rand(3, 96, 96)]
    targets = [dict(boxes=torch.tensor([[10.0, 10, 40, 50], [50, 20, 90, 70]]), labels=torch.tensor([1, 3]))]
    model(images, targets)["loss_box_kl"].backward()
    grad = head.log_variance.weight.grad.view(4, 4, -1).abs().sum(dim=(1, 2))  # per group
    assert grad[1] > 0 and grad[3] > 0  # the classes with positives
    assert grad[0] == 0 and grad[2] == 0  # background and the class without an object
    model.eval()
    with torch.no_grad():
        cand = model.candidates(images)[0]
    assert cand["variances"].shape == (len(cand["boxes"]), 4) and bool((cand["variances"] > 0).all())
