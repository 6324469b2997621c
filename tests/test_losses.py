"""Dense-detector losses: hand-computed values, reference implementations, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from locconf.losses import (
    centerness_loss,
    clq_loss,
    distribution_focal_loss,
    giou_loss,
    joint_quality_focal_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
)


def test_focal_loss_matches_torchvision_and_reduces_to_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    targets = (torch.rand(50, 4, generator=g) > 0.8).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(ours, ref)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0), bce)
    # hand-computed: p = 0.5, positive: 0.25 * 0.5^2 * log 2
    assert sigmoid_focal_loss(torch.zeros(1), torch.ones(1)).item() == pytest.approx(0.25 * 0.25 * math.log(2))


def test_quality_focal_loss_hand_computed_and_on_probabilities():
    # sigma = 0.5, y = 0.8: BCE = log 2, modulating factor |0.8 - 0.5|^2 = 0.09
    expected = 0.09 * math.log(2)
    assert quality_focal_loss(torch.zeros(1, 1), torch.full((1, 1), 0.8)).item() == pytest.approx(expected)
    assert quality_focal_loss(torch.full((1, 1), 0.5), torch.full((1, 1), 0.8), from_logits=False).item() == \
        pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, 3, generator=g)
    y = torch.rand(30, 3, generator=g)
    torch.testing.assert_close(
        quality_focal_loss(logits, y, reduction="none"),
        quality_focal_loss(torch.sigmoid(logits), y, from_logits=False, reduction="none"),
        rtol=1e-4, atol=1e-6,
    )


def test_quality_focal_loss_with_hard_targets_is_focal_loss_without_alpha():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 5, generator=g) * 2
    targets = (torch.rand(40, 5, generator=g) > 0.7).float()
    torch.testing.assert_close(quality_focal_loss(logits, targets, beta=2.0),
                               sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0))


def test_quality_focal_loss_is_minimal_at_the_soft_target():
    y = torch.tensor([0.1, 0.4, 0.75, 0.95])
    at_target = torch.logit(y).requires_grad_(True)
    quality_focal_loss(at_target, y).backward()
    assert at_target.grad.abs().max() < 1e-6
    for shift in (-0.3, 0.3):
        assert (quality_focal_loss(torch.logit(y) + shift, y, reduction="none")
                > quality_focal_loss(torch.logit(y), y, reduction="none")).all()


def test_giou_loss_hand_computed_and_against_torchvision():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    # identical: 0; half overlap: IoU 1/3, enclosure = union -> 2/3; disjoint: IoU 0, enclosure 300,
    # union 200 -> GIoU -1/3 -> loss 4/3
    assert giou_loss(a, b).tolist() == pytest.approx([0.0, 2 / 3, 4 / 3], abs=1e-6)
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(20, 2, generator=g) * 50
    p = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 30 + 1], 1)
    xy = torch.rand(20, 2, generator=g) * 50
    t = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 30 + 1], 1)
    torch.testing.assert_close(giou_loss(p, t), torchvision.ops.generalized_box_iou_loss(p, t), rtol=1e-5, atol=1e-5)
    assert giou_loss(p, t, reduction="sum").item() == pytest.approx(giou_loss(p, t).sum().item(), rel=1e-6)


def test_giou_loss_is_finite_for_degenerate_boxes_and_has_gradients():
    p = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 4.0, 4.0]], requires_grad=True)
    t = torch.tensor([[5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 3.0, 3.0]])
    loss = giou_loss(p, t)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad[1].abs().sum() > 0
    assert giou_loss(torch.zeros(0, 4), torch.zeros(0, 4), reduction="sum").item() == 0.0


def test_centerness_loss_is_bce():
    logits, targets = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.5, 0.9, 0.1])
    torch.testing.assert_close(centerness_loss(logits, targets),
                               F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))


def test_quality_focal_loss_on_probabilities_keeps_gradients_below_eps():
    """A positive whose probability fell below eps still gets a (finite) gradient that raises it."""
    p = torch.tensor([1e-9, 0.3], requires_grad=True)
    y = torch.tensor([0.6, 0.0])
    loss = quality_focal_loss(p, y, from_logits=False, reduction="none")
    # the value is evaluated at the clamped probability, the modulating factor at the true one
    expected0 = -0.6 * math.log(1e-6) - 0.4 * math.log1p(-1e-6)
    assert loss[0].item() == pytest.approx(expected0 * (0.6 - 1e-9) ** 2, rel=1e-5)
    assert loss[1].item() == pytest.approx(-math.log(0.7) * 0.09, rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad[0] < 0  # descending raises the collapsed positive


def _joint_qfl_reference(c, q, y, beta=2.0):
    """The QFL written out in float64 on J = sigmoid(c) sigmoid(q) (accurate where 1 - J >> 1e-16)."""
    j = torch.sigmoid(c.double()) * torch.sigmoid(q.double())
    return -(y * torch.log(j) + (1 - y) * torch.log1p(-j)) * (y - j).abs() ** beta


def test_joint_quality_focal_loss_hand_computed():
    # c = q = 0: J = 1/4; y = 1/2: BCE = -(log(1/4) + log(3/4)) / 2, factor (1/4)^2
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) * 0.0625
    value = joint_quality_focal_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 0.5))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_joint_quality_focal_loss_matches_the_written_out_loss_and_its_gradients():
    """Values and gradients against a float64 reference, including J down to 1e-35 (far below the
    1e-6 clamp that stopped the old loss's gradient) and J close to 1."""
    c = torch.tensor([[-40.0, -8.0, 0.0, 3.0, 15.0], [-20.0, -1.0, 2.0, 9.0, 12.0]])
    q = torch.tensor([[-40.0], [1.5]])
    y = torch.tensor([[0.7, 0.0, 0.3, 0.9, 0.0], [0.0, 0.5, 0.0, 1.0, 0.95]])
    c32, q32 = c.clone().requires_grad_(True), q.clone().requires_grad_(True)
    ours = joint_quality_focal_loss(c32, q32, y, reduction="none")
    c64, q64 = c.double().requires_grad_(True), q.double().requires_grad_(True)
    ref = _joint_qfl_reference(c64, q64, y.double())
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(c32.grad.double(), c64.grad, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(q32.grad.double(), q64.grad, rtol=1e-3, atol=1e-7)
    # the positive at J = sigmoid(-40)^2 ~ 2e-35 is pushed up through both logits
    assert c32.grad[0, 0] < 0 and q32.grad[0, 0] < 0
    # saturated J (1 - J below float precision): finite loss and gradients
    sat_c = torch.full((1, 2), 60.0, requires_grad=True)
    sat = joint_quality_focal_loss(sat_c, torch.full((1, 1), 60.0), torch.tensor([[0.0, 1.0]]), reduction="none")
    sat.sum().backward()
    assert torch.isfinite(sat).all() and torch.isfinite(sat_c.grad).all()


def test_joint_quality_focal_loss_equals_qfl_on_the_product_where_both_are_accurate():
    g = torch.Generator().manual_seed(5)
    c, q = torch.randn(20, 4, generator=g) * 2, torch.randn(20, 1, generator=g)
    y = torch.rand(20, 4, generator=g) * (torch.rand(20, 4, generator=g) > 0.5)
    joint = torch.sigmoid(c) * torch.sigmoid(q)
    torch.testing.assert_close(joint_quality_focal_loss(c, q, y, beta=1.5),
                               quality_focal_loss(joint, y, beta=1.5, from_logits=False), rtol=1e-4, atol=1e-6)


def test_distribution_focal_loss_hand_computed():
    # softmax([0, log 2, log 3]) = (1/6, 1/3, 1/2) over the values 0, 1, 2
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(4, 3)
    y = torch.tensor([0.25, 1.0, 1.5, 2.0])
    expected = [-(0.75 * math.log(1 / 6) + 0.25 * math.log(1 / 3)),  # between 0 and 1
                -math.log(1 / 3),                                     # exactly on a value
                -(0.5 * math.log(1 / 3) + 0.5 * math.log(1 / 2)),     # between 1 and 2
                -math.log(1 / 2)]                                     # the last value n
    assert distribution_focal_loss(logits, y, reduction="none").tolist() == pytest.approx(expected, rel=1e-6)
    assert distribution_focal_loss(logits, y).item() == pytest.approx(sum(expected), rel=1e-6)


def test_distribution_focal_loss_is_cross_entropy_against_the_interpolated_target():
    """Eq. 6 is the cross-entropy against the two-point distribution (y_{i+1} - y, y - y_i) at
    (y_i, y_{i+1}), whose expectation is y: the loss is minimal where the expectation is y."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(30, 4, 17, generator=g)
    y = torch.rand(30, 4, generator=g) * 15.99
    soft = torch.zeros(30, 4, 17)
    left = y.floor().long()
    soft.scatter_(-1, left[..., None], (left + 1 - y)[..., None])
    soft.scatter_(-1, (left + 1)[..., None], (y - left)[..., None])
    ref = F.cross_entropy(logits.reshape(-1, 17), soft.reshape(-1, 17), reduction="none").reshape(30, 4)
    torch.testing.assert_close(distribution_focal_loss(logits, y, reduction="none"), ref)
    torch.testing.assert_close((soft * torch.arange(17.0)).sum(-1), y)


def test_clq_loss_terms_and_gradients():
    g = torch.Generator().manual_seed(4)
    cls_logits = torch.randn(6, 3, generator=g, requires_grad=True)
    lqe_logits = torch.randn(6, 1, generator=g, requires_grad=True)
    targets = torch.zeros(6, 3)
    targets[1, 2], targets[4, 0] = 0.7, 0.55
    iou_logits = torch.randn(2, generator=g, requires_grad=True)
    iou_targets = torch.tensor([0.7, 0.55])
    joint_loss, iou_loss = clq_loss(cls_logits, lqe_logits, targets, iou_logits, iou_targets)
    joint = torch.sigmoid(cls_logits) * torch.sigmoid(lqe_logits)
    torch.testing.assert_close(joint_loss, quality_focal_loss(joint, targets, from_logits=False))
    torch.testing.assert_close(iou_loss, F.binary_cross_entropy_with_logits(iou_logits, iou_targets, reduction="sum"))
    (joint_loss + iou_loss).backward()
    assert cls_logits.grad.abs().sum() > 0 and lqe_logits.grad.abs().sum() > 0 and iou_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("fn, args, name", [
    (sigmoid_focal_loss, (torch.zeros(3, 2), torch.zeros(3, 3)), "targets"),
    (quality_focal_loss, (torch.zeros(3, 2), torch.zeros(2, 2)), "targets"),
    (quality_focal_loss, (torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long)), "targets"),
    (giou_loss, (torch.zeros(3, 4), torch.zeros(3, 3)), "target_boxes"),
    (giou_loss, (torch.zeros(3, 3), torch.zeros(3, 3)), "boxes"),
    (centerness_loss, (torch.zeros(3), torch.zeros(4)), "targets"),
    (joint_quality_focal_loss, (torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3, 2)), "quality_logits"),
    (joint_quality_focal_loss, (torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 3)), "targets"),
    (distribution_focal_loss, (torch.zeros(3, 4, 17), torch.zeros(3, 5)), "targets"),
    (distribution_focal_loss, (torch.zeros(3, 1), torch.zeros(3)), "logits"),
    (distribution_focal_loss, (torch.zeros(3, 4, 17), torch.zeros(3, 4, dtype=torch.long)), "targets"),
])
def test_bad_shapes_name_the_argument(fn, args, name):
    with pytest.raises(ValueError, match=name):
        fn(*args)


def test_bad_options():
    with pytest.raises(ValueError, match="reduction"):
        giou_loss(torch.zeros(1, 4), torch.zeros(1, 4), reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        quality_focal_loss(torch.zeros(1, 1), torch.zeros(1, 1), beta=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(torch.zeros(1, 1), torch.zeros(1, 1), gamma=-1.0)
    with pytest.raises(ValueError, match="iou_targets"):
        clq_loss(torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2, 2), torch.zeros(1), torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        joint_quality_focal_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), beta=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        distribution_focal_loss(torch.zeros(1, 3), torch.zeros(1), reduction="avg")
