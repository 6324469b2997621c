"""The quality heads' binary cross-entropy keeps its gradient at any logit (issue 29, item 2).

The former BCE clamped the sigmoid probability at 1e-6, so a logit beyond about 13.8 had exactly zero
gradient. Here the gradient is compared with a float64 reference of the unclamped formula, for the
loss functions themselves and for every head that uses them (IoU-Net, DIR, DIR foresight,
IoU-direct), with their output layer pushed to a saturated logit.
"""

from __future__ import annotations

import pytest
import torch

from locconf.boxes import elementwise_box_iou, elementwise_integrity, elementwise_purity, iou_from_purity_integrity
from locconf.heads import DirectIoUHead, DIRHead, ForesightDIRHead, IoUNetHead, RoIBatch
from locconf.heads.common import bce_from_log_probs, bce_with_logits
from locconf.heads.dir import iou_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE in float64 from the probability, no clamp (fine in float64 for |logit| <= 30)."""
    p = 1 / (1 + torch.exp(-logits.double()))
    t = target.double()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def grad_of(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    fn(*inputs).backward()
    return [x.grad for x in inputs]


def test_bce_gradient_at_logit_20_is_the_float64_reference():
    logits, target = torch.tensor([20.0]), torch.tensor([0.6])
    (got,) = grad_of(lambda x: bce_with_logits(x, target), logits)
    (want,) = grad_of(lambda x: reference_bce(x, target), logits.double())
    assert got.item() != 0.0
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # sigmoid(20) - 0.6 = 0.4
    assert want.item() == pytest.approx(0.4, rel=1e-6)
    # the former clamped form (probability clamped at 1 - 1e-6) had no gradient there
    x = logits.clone().requires_grad_(True)
    p = torch.sigmoid(x).clamp(1e-6, 1 - 1e-6)
    (-(target * torch.log(p) + (1 - target) * torch.log1p(-p))).mean().backward()
    assert x.grad.item() == 0.0


@pytest.mark.parametrize("a, b", [(20.0, 20.0), (20.0, 0.5), (-25.0, 3.0), (-30.0, -30.0), (1.0, -2.0), (0.0, 0.0)])
def test_combined_iou_loss_from_logits_matches_float64(a, b):
    """DIR's L_IoU (Eq. 9) of c = s t / (s + t - s t) in log space, against the float64 formula."""
    target = torch.tensor([0.6])

    def ours(x, y):
        return bce_from_log_probs(*iou_log_probs(x, y), target)

    def reference(x, y):
        s, t = torch.sigmoid(x), torch.sigmoid(y)
        c = s * t / (s + t - s * t)
        return -(target.double() * torch.log(c) + (1 - target.double()) * torch.log(1 - c)).mean()

    x, y = torch.tensor([a]), torch.tensor([b])
    assert ours(x, y).item() == pytest.approx(reference(x.double(), y.double()).item(), rel=1e-5)
    got = grad_of(ours, x, y)
    want = grad_of(reference, x.double(), y.double())
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert g.item() == pytest.approx(w.item(), rel=1e-4, abs=1e-12)
    if a == b == 20.0:  # both saturated: c -> 1, still pulled toward 0.6
        assert got[0].item() > 0 and got[1].item() > 0


def _batch(feats):
    """Two positive proposals (boxes = proposals) on one 64 px image, with their ground truth."""
    boxes = torch.tensor([[4.0, 6, 30, 40], [20, 18, 60, 58]])
    gt = torch.tensor([[6.0, 8, 34, 44], [22, 16, 58, 60]])
    pooled = DIRHead(4, ["0"], pool_size=2).pool(feats, [boxes], [(64, 64)])
    return RoIBatch(feats, [(64, 64)], [boxes], pooled, torch.zeros(2, 1), [boxes], torch.arange(2),
                    gt_boxes=[gt], positive=[torch.tensor([True, True])],
                    targets=[{"boxes": gt, "labels": torch.tensor([1, 1])}]), boxes, gt


def _saturate(layer: torch.nn.Linear, logit: float) -> None:
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(logit)


@pytest.mark.parametrize("head_cls", [DIRHead, ForesightDIRHead])
def test_dir_heads_learn_at_saturated_logits(head_cls):
    """Purity and Integrity branches at logit 20: the bias gradient of each loss is the float64
    reference, mean(sigmoid(20) - target), and not zero."""
    torch.manual_seed(0)
    feats = {"0": torch.rand(1, 4, 16, 16)}
    batch, boxes, gt = _batch(feats)
    head = head_cls(4, ["0"], pool_size=2, representation_size=8)
    _saturate(head.purity[-1], 20.0)
    _saturate(head.integrity[-1], 20.0)
    losses = head.loss(batch)
    purity, integrity = elementwise_purity(boxes, gt), elementwise_integrity(boxes, gt)
    for name, layer, target in (("loss_purity", head.purity[-1], purity),
                                ("loss_integrity", head.integrity[-1], integrity)):
        (grad,) = torch.autograd.grad(losses[name], layer.bias, retain_graph=True)
        (want,) = grad_of(lambda x: reference_bce(x.expand(2), target), torch.tensor([20.0]).double())
        assert grad.item() != 0.0
        assert grad.item() == pytest.approx(want.item(), rel=1e-5)
    # the combined IoU's loss reaches both branches
    grads = torch.autograd.grad(losses["loss_quality_iou"], [head.purity[-1].bias, head.integrity[-1].bias])
    assert all(g.abs().item() > 1e-3 for g in grads)
    assert iou_from_purity_integrity(purity, integrity).max() < 1  # the targets are below the saturated c


def test_iou_direct_head_learns_at_a_saturated_logit():
    torch.manual_seed(0)
    feats = {"0": torch.rand(1, 4, 16, 16)}
    batch, boxes, gt = _batch(feats)
    head = DirectIoUHead(4, ["0"], pool_size=2, representation_size=8)
    _saturate(head.iou[-1], 20.0)
    (grad,) = torch.autograd.grad(head.loss(batch)["loss_quality_iou"], head.iou[-1].bias)
    (want,) = grad_of(lambda x: reference_bce(x.expand(2), elementwise_box_iou(boxes, gt)),
                      torch.tensor([20.0]).double())
    assert grad.item() != 0.0 and grad.item() == pytest.approx(want.item(), rel=1e-5)


def test_iou_net_head_learns_at_a_saturated_logit():
    torch.manual_seed(0)
    feats = {"0": torch.rand(1, 4, 32, 32)}
    gt = torch.tensor([[4.0, 4, 24, 28], [12, 10, 30, 30]])
    head = IoUNetHead(4, ["0"], pool_size=2, representation_size=8, boxes_per_gt=10, loss_weight=1.0)
    _saturate(head.iou[-1], 20.0)
    batch = RoIBatch(feats, [(32, 32)], [gt], torch.zeros(0), torch.zeros(0), [gt], torch.arange(2),
                     targets=[{"boxes": gt, "labels": torch.tensor([1, 1])}])
    torch.manual_seed(1)
    (grad,) = torch.autograd.grad(head.loss(batch)["loss_iou_net"], head.iou[-1].bias)
    torch.manual_seed(1)  # the same training boxes
    _, target = head.training_boxes(gt)
    (want,) = grad_of(lambda x: reference_bce(x.expand(len(target)), target), torch.tensor([20.0]).double())
    assert grad.item() != 0.0 and grad.item() == pytest.approx(want.item(), rel=1e-5)
