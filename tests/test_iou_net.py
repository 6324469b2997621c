"""IoU-Net's head: the jittered training boxes (count, cap, balance, targets), its two losses
against hand-written values, and the refinement rule it passes on."""

from __future__ import annotations

import pytest
import torch

from locconf.heads import IoUNetHead, RoIBatch
from locconf.refine import refine_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (128, 128)


def plain_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def small_head(**kw) -> IoUNetHead:
    return IoUNetHead(4, ["0"], pool_size=2, representation_size=8, **kw)


def gts(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 80
    return torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], dim=1)


def test_defaults_are_in_the_papers_regime():
    head = small_head()
    assert head.boxes_per_gt == 128 and head.max_boxes_per_image == 1000
    assert head.iou_loss == "bce" and head.refine_keep_best is True
    assert head.loss_weight == 5.0 and head.score == "cluster_max"  # the reimplementation's weight


def test_training_boxes_count_cap_balance_and_targets():
    torch.manual_seed(0)
    gt = gts(3)
    boxes, iou = small_head(boxes_per_gt=64).training_boxes(gt)
    assert 3 * 60 <= len(boxes) <= 3 * 65  # ceil(64 / 5) = 13 per IoU bin and ground truth
    # the target of each box is its best IoU with a ground truth (plain Python), at least 0.5
    for b, t in zip(boxes.tolist()[::7], iou.tolist()[::7]):
        assert t == pytest.approx(max(plain_iou(b, g) for g in gt.tolist()), abs=1e-5)
    assert bool((iou >= 0.5 - 1e-6).all())
    # capped: a uniform subset of max_boxes_per_image, still spread over the IoU bins
    torch.manual_seed(0)
    boxes, iou = small_head(boxes_per_gt=64, max_boxes_per_image=100).training_boxes(gts(20))
    assert len(boxes) == 100
    counts = torch.histc(iou, bins=5, min=0.5, max=1.0)
    assert bool((counts >= 8).all()), counts
    # no ground truth: no box
    boxes, iou = small_head().training_boxes(torch.zeros(0, 4))
    assert boxes.shape == (0, 4) and iou.shape == (0,)


@pytest.mark.parametrize("iou_loss", ["bce", "smooth_l1"])
def test_losses_hand_computed(iou_loss):
    torch.manual_seed(0)
    head = small_head(boxes_per_gt=16, iou_loss=iou_loss, loss_weight=2.0)
    feats = {"0": torch.rand(1, 4, 32, 32)}
    gt = gts(2)
    batch = RoIBatch(feats, [SIZE], [gt], torch.zeros(0), torch.zeros(0), [gt], torch.arange(2),
                     targets=[{"boxes": gt, "labels": torch.ones(2, dtype=torch.int64)}])
    torch.manual_seed(1)
    loss = head.loss(batch)["loss_iou_net"]
    torch.manual_seed(1)  # the same draw of training boxes
    boxes, t = head.training_boxes(gt)
    x = head.raw_output(feats, [boxes], [SIZE]).double()
    t = t.double()
    if iou_loss == "bce":  # on the logit
        p = 1 / (1 + torch.exp(-x))
        expected = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    else:  # smooth L1 (beta 1) of the linear output against (IoU - 0.5) / 0.5
        d = (x - (t - 0.5) / 0.5).abs()
        expected = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()
    assert loss.item() == pytest.approx(2.0 * expected.item(), rel=1e-5)


def test_loss_forms_on_hand_computed_values():
    out, iou = torch.tensor([0.2, 0.2, 3.0]), torch.tensor([0.9, 0.5, 1.0])
    # smooth L1 against (IoU - 0.5) / 0.5 = 0.8, 0, 1: differences -0.6, 0.2, 2 -> 0.18, 0.02, 1.5
    sl1 = small_head(iou_loss="smooth_l1").loss_value(out, iou)
    assert sl1.item() == pytest.approx((0.18 + 0.02 + 1.5) / 3, rel=1e-6)
    # BCE at logit 0 (p = 1/2) is ln 2 whatever the target
    assert small_head().loss_value(torch.zeros(2), torch.tensor([0.6, 0.9])).item() == pytest.approx(0.693147, rel=1e-5)


def test_smooth_l1_output_is_linear_and_mapped_back():
    """A constant output unit x (zero weights, bias x): the predicted IoU is 0.5 x + 0.5, clamped to
    [0, 1] for the candidates, unclamped for the refinement; with BCE it is sigmoid(x)."""
    feats, boxes = {"0": torch.rand(1, 4, 32, 32)}, [torch.tensor([[2.0, 3, 20, 25], [10, 10, 30, 30]])]
    for bias, mapped in ((0.2, 0.6), (1.4, 1.2), (-1.6, -0.3)):
        head = small_head(iou_loss="smooth_l1")
        with torch.no_grad():
            head.iou[-1].weight.zero_()
            head.iou[-1].bias.fill_(bias)
        assert torch.allclose(head.raw_output(feats, boxes, [SIZE]), torch.full((2,), bias))
        assert torch.allclose(head.predicted_iou(feats, boxes, [SIZE]), torch.full((2,), mapped))
        assert torch.allclose(head.score_boxes(feats, boxes, [SIZE]), torch.full((2,), min(max(mapped, 0.0), 1.0)))
        bce_head = small_head()
        bce_head.load_state_dict(head.state_dict())
        assert torch.allclose(bce_head.score_boxes(feats, boxes, [SIZE]), torch.sigmoid(torch.full((2,), bias)))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="iou_loss"):
        small_head(iou_loss="l2")
    with pytest.raises(ValueError, match="max_boxes_per_image"):
        small_head(max_boxes_per_image=0)
    with pytest.raises(ValueError, match="refine_keep_best"):
        small_head(refine_keep_best="yes")
    for weight in (-1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="loss_weight"):
            small_head(loss_weight=weight)
    with pytest.raises(ValueError, match="score"):
        small_head(score="max")


@pytest.mark.parametrize("keep_best, expected_x2", [(None, 55.0), (True, 55.0), (False, 60.5)])
def test_refine_passes_the_rule_on(keep_best, expected_x2):
    """A predicted IoU that climbs with x2 and falls off a cliff at x2 = 60 (as in test_refine):
    x2 goes 50 -> 55 -> 60.5; Algorithm 2 stops there, keep_best undoes the step. The head's
    default (refine_keep_best=True) applies when the caller passes nothing."""
    head = small_head(refine_keep_best=True)
    head.predicted_iou = lambda feats, boxes, sizes: 0.002 * boxes[0][:, 2] - 0.3 * (boxes[0][:, 2] > 60).float()
    kw = {} if keep_best is None else {"keep_best": keep_best}
    out_boxes, out_scores = head.refine({}, [torch.tensor([[0.0, 0.0, 50.0, 10.0]])], [SIZE], steps=5,
                                        step_size=50.0, min_gain=0.0, **kw)
    assert out_boxes[0][0, 2].item() == pytest.approx(expected_x2)
    assert out_scores[0].item() == pytest.approx(0.002 * expected_x2 - 0.3 * (expected_x2 > 60), abs=1e-6)
