"""Tests of IoU-Net box refinement with analytic, differentiable scores, and against a plain
per-box reference of Algorithm 2 written here."""

from __future__ import annotations

import pytest
import torch

from locconf.prroi_pool import prroi_pool
from locconf.refine import RefineResult, refine_boxes


def true_iou(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of (K, 4) boxes with a (4,) or (K, 4) ground truth, written for the test."""
    gt = gt.expand_as(boxes)
    iw = (torch.minimum(boxes[:, 2], gt[:, 2]) - torch.maximum(boxes[:, 0], gt[:, 0])).clamp(min=0)
    ih = (torch.minimum(boxes[:, 3], gt[:, 3]) - torch.maximum(boxes[:, 1], gt[:, 1])).clamp(min=0)
    inter = iw * ih
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return inter / (area(boxes) + area(gt) - inter)


def jittered(gt: torch.Tensor, n: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = (gt[2:] - gt[:2]).repeat(2)
    return gt + (torch.rand(n, 4, generator=g) * 2 - 1) * scale * wh


GT = torch.tensor([40.0, 30.0, 120.0, 90.0])


def algorithm2(score_fn, boxes, steps, step_size, omega_1, omega_2):
    """IoU-Net's Algorithm 2 as printed, one box at a time in plain Python: a box leaves the loop
    (joins A) after the step for which |PrevScore - NewScore| < Omega_1 or NewScore - PrevScore <
    Omega_2, and keeps that step. Returns the final boxes, their scores and the steps each took."""
    out_boxes, out_scores, out_steps = [], [], []
    for b in boxes.unbind(0):
        b = b.clone()
        score, taken = score_fn(b[None])[0].item(), 0
        for _ in range(steps):
            x = b.clone().requires_grad_(True)
            prev = score_fn(x[None])[0]
            (grad,) = torch.autograd.grad(prev, x)
            w, h = (b[2] - b[0]).item(), (b[3] - b[1]).item()
            b = b + step_size * grad * torch.tensor([w, h, w, h], dtype=b.dtype)
            assert (b[2:] - b[:2] >= 1).all()  # refine_boxes' own min-size guard (ours) stays idle
            score, taken = score_fn(b[None])[0].item(), taken + 1
            if abs(prev.item() - score) < omega_1 or score - prev.item() < omega_2:
                break
        out_boxes.append(b)
        out_scores.append(score)
        out_steps.append(taken)
    return torch.stack(out_boxes), torch.tensor(out_scores, dtype=boxes.dtype), out_steps


def bumpy_iou(b: torch.Tensor) -> torch.Tensor:
    """A score with local maxima and cliffs: the IoU with GT plus a ripple in the box's corners."""
    gt = GT.to(b.dtype)
    return true_iou(b, gt) + 0.03 * torch.sin(b.sum(dim=1) / 4) - 0.2 * torch.sigmoid((b[:, 2] - 118.0) * 4)


def test_default_is_algorithm2_as_printed():
    g = torch.Generator().manual_seed(3)
    gt = GT.double()
    boxes = gt + (torch.rand(40, 4, generator=g, dtype=torch.float64) * 2 - 1) * 0.2 * (gt[2:] - gt[:2]).repeat(2)
    for steps, step_size in ((5, 0.5), (8, 2.0), (8, 4.0)):
        res = refine_boxes(bumpy_iou, boxes, steps=steps, step_size=step_size, min_gain=1e-3, max_drop=1e-2)
        ref_boxes, ref_scores, ref_steps = algorithm2(bumpy_iou, boxes, steps, step_size, 1e-3, -1e-2)
        torch.testing.assert_close(res.boxes, ref_boxes)
        torch.testing.assert_close(res.scores, ref_scores)
        assert res.steps.tolist() == ref_steps
    # every stopping reason occurs in the last setting: converged, degenerated (score fell) and T reached
    gains = res.scores - bumpy_iou(boxes)
    assert (gains < -1e-2).any()  # a box may end below where it started: the step is not undone
    assert set(ref_steps) >= {8} and min(ref_steps) < 8


def test_keep_best_returns_the_best_box_visited():
    g = torch.Generator().manual_seed(3)
    gt = GT.double()
    boxes = gt + (torch.rand(40, 4, generator=g, dtype=torch.float64) * 2 - 1) * 0.2 * (gt[2:] - gt[:2]).repeat(2)
    res = refine_boxes(bumpy_iou, boxes, steps=8, step_size=6.0, keep_best=True)
    assert torch.all(res.scores >= bumpy_iou(boxes))
    torch.testing.assert_close(res.scores, bumpy_iou(res.boxes))
    with pytest.raises(ValueError, match="keep_best"):
        refine_boxes(bumpy_iou, boxes, keep_best=1)


def test_scores_never_decrease_and_boxes_approach_gt():
    boxes = jittered(GT, 64, 0.25)
    boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:] - 2), boxes[:, 2:]], 1)
    before = boxes.clone()
    # step_size 2.0: the value a reimplementation of IoU-Net found better than the paper's 0.5
    res = refine_boxes(lambda b: true_iou(b, GT), boxes, steps=10, step_size=2.0, min_gain=1e-4, keep_best=True)
    assert isinstance(res, RefineResult)
    assert torch.equal(boxes, before)  # input untouched
    iou0 = true_iou(boxes, GT)
    iou1 = true_iou(res.boxes, GT)
    torch.testing.assert_close(res.scores, iou1)
    assert torch.all(iou1 >= iou0 - 1e-7)
    assert iou1.mean() > iou0.mean() + 0.1
    assert iou1.mean() > 0.9
    err0 = (boxes - GT).abs().mean()
    err1 = (res.boxes - GT).abs().mean()
    assert err1 < 0.4 * err0
    assert res.steps.dtype == torch.int64 and torch.all(res.steps >= 1) and torch.all(res.steps <= 10)
    assert torch.all(res.boxes[:, 2:] > res.boxes[:, :2])
    # paper defaults (T=5, lambda=0.5, Algorithm 2's rule): small but strict improvement of every box
    res = refine_boxes(lambda b: true_iou(b, GT), boxes)
    assert torch.all(res.scores > iou0) and res.steps.tolist() == [5] * 64
    # the paper's rule on the larger steps: a box may stop after a drop, but on average they improve
    res = refine_boxes(lambda b: true_iou(b, GT), boxes, steps=10, step_size=2.0, min_gain=1e-4)
    torch.testing.assert_close(res.scores, true_iou(res.boxes, GT))
    assert res.scores.mean() > iou0.mean() + 0.1


def test_step_is_gradient_times_size_times_step_size():
    """One step of a linear score s = a . box moves the box by step_size * a * (w, h, w, h)."""
    a = torch.tensor([0.01, -0.02, 0.03, 0.005])
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 10.0, 100.0]])
    res = refine_boxes(lambda b: b @ a, boxes, steps=1, step_size=0.5, min_gain=0.0, max_drop=1.0)
    wh = torch.tensor([[40.0, 20.0, 40.0, 20.0], [10.0, 100.0, 10.0, 100.0]])
    torch.testing.assert_close(res.boxes, boxes + 0.5 * a * wh)
    assert res.steps.tolist() == [1, 1]


def test_min_gain_stops():
    """Score c * width: each step gains c^2 * w (x1 and x2 each move 0.5 * c * w)."""
    c = 0.01
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 50.0, 5.0]])  # gains 5e-4 and 5e-3
    score = lambda b: c * (b[:, 2] - b[:, 0])  # noqa: E731
    res = refine_boxes(score, boxes, steps=5, step_size=0.5, min_gain=1e-3, max_drop=1.0)
    assert res.steps.tolist() == [1, 5]
    torch.testing.assert_close(res.boxes[0], torch.tensor([-0.025, 0.0, 5.025, 5.0]))
    res0 = refine_boxes(score, boxes, steps=5, step_size=0.5, min_gain=0.0, max_drop=1.0)
    assert res0.steps.tolist() == [5, 5]


def test_max_drop_stops_after_the_cliff_or_rolls_back_with_keep_best():
    """The score climbs with x2 (gradient 0.002) until a cliff at x2 = 60 where it falls by 0.3.
    With step_size 50, x2 moves by 50 * 0.002 * w: 50 -> 55 -> 60.5 (over the cliff)."""
    score = lambda b: 0.002 * b[:, 2] - 0.3 * (b[:, 2] > 60).to(b.dtype)  # noqa: E731
    boxes = torch.tensor([[0.0, 0.0, 50.0, 10.0]])
    # Algorithm 2: the step over the cliff is kept and the box stops there
    res = refine_boxes(score, boxes, steps=5, step_size=50.0, min_gain=0.0, max_drop=0.01)
    torch.testing.assert_close(res.boxes, torch.tensor([[0.0, 0.0, 60.5, 10.0]]))
    assert res.steps.item() == 2
    assert res.scores.item() == pytest.approx(0.002 * 60.5 - 0.3, abs=1e-6)
    # keep_best: the second step falls off the cliff and is undone; the box stops
    res = refine_boxes(score, boxes, steps=5, step_size=50.0, min_gain=0.0, max_drop=0.01, keep_best=True)
    torch.testing.assert_close(res.boxes, torch.tensor([[0.0, 0.0, 55.0, 10.0]]))
    assert res.steps.item() == 1
    assert res.scores.item() == pytest.approx(0.11, abs=1e-6)
    # with a tolerant max_drop the box goes over the cliff, yet keep_best returns its best box
    res2 = refine_boxes(score, boxes, steps=2, step_size=50.0, min_gain=0.0, max_drop=1.0, keep_best=True)
    assert res2.steps.item() == 2
    torch.testing.assert_close(res2.boxes, res.boxes)


@pytest.mark.parametrize("keep_best", [False, True])
def test_moderate_drop_continues(keep_best):
    """A drop smaller than max_drop (and larger than min_gain) does not stop the box (as in the
    paper); here the last box is also the best one visited, so both rules return it."""
    calls = []

    def score(b):
        calls.append(1)
        base = [0.5, 0.6, 0.595, 0.7][min(len(calls) - 1, 3)]
        return b[:, 0] * 0 + base + 1e-3 * b[:, 0]

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    res = refine_boxes(score, boxes, steps=3, step_size=1.0, min_gain=1e-3, max_drop=1e-2, keep_best=keep_best)
    assert res.steps.item() == 3
    assert res.scores.item() == pytest.approx(0.7 + 1e-3 * res.boxes[0, 0].item())


@pytest.mark.parametrize("keep_best", [False, True])
def test_image_clipping_and_min_size(keep_best):
    gt = torch.tensor([-30.0, -20.0, 60.0, 70.0])  # partly outside a 50 x 40 (h x w) image
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [10.0, 10.0, 39.0, 49.0]])
    res = refine_boxes(lambda b: true_iou(b, gt), boxes, steps=8, step_size=1.0, image_size=(50, 40),
                       keep_best=keep_best)
    b = res.boxes
    assert torch.all(b[:, 0] >= 0) and torch.all(b[:, 1] >= 0)
    assert torch.all(b[:, 2] <= 40) and torch.all(b[:, 3] <= 50)
    assert torch.all(res.scores >= true_iou(boxes, gt) - 1e-7)  # the IoU rises monotonically here
    # a score that shrinks boxes: they keep the minimum size
    shrink = lambda b: -(b[:, 2] - b[:, 0]) - (b[:, 3] - b[:, 1])  # noqa: E731
    res = refine_boxes(shrink, torch.tensor([[10.0, 10.0, 14.0, 13.0]]), steps=5, step_size=2.0,
                       max_drop=10.0, min_size=2.0, image_size=(50, 40), keep_best=keep_best)
    wh = res.boxes[0, 2:] - res.boxes[0, :2]
    assert torch.all(wh >= 2.0 - 1e-6)


def test_no_grad_context_and_prroi_score():
    """Works inside torch.no_grad() with a PrRoIPool-based score (template matching)."""
    torch.manual_seed(0)
    fmap = torch.zeros(1, 1, 40, 40)
    fmap[0, 0, 12:25, 15:30] = 1.0
    gt = torch.tensor([15.0, 12.0, 29.0, 24.0])

    def score(b):
        pooled = prroi_pool(fmap, torch.cat([torch.zeros(len(b), 1), b], 1), 4)
        # mean inside minus a penalty for missing area: maximal near the bright rectangle
        inside = pooled.flatten(1).mean(1)
        return inside * (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 180.0 - 0.002 * (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 10

    boxes = torch.tensor([[12.0, 10.0, 25.0, 20.0], [18.0, 14.0, 33.0, 28.0]])
    with torch.no_grad():
        res = refine_boxes(score, boxes, steps=10, step_size=0.5, keep_best=True)
    assert not res.boxes.requires_grad
    assert torch.all(res.scores >= score(boxes) - 1e-6)
    assert true_iou(res.boxes, gt).mean() > true_iou(boxes, gt).mean()


def test_empty_and_zero_steps_and_validation():
    res = refine_boxes(lambda b: true_iou(b, GT), torch.zeros(0, 4))
    assert res.boxes.shape == (0, 4) and res.scores.shape == (0,) and res.steps.shape == (0,)
    boxes = jittered(GT, 3, 0.2)
    res = refine_boxes(lambda b: true_iou(b, GT), boxes, steps=0)
    torch.testing.assert_close(res.boxes, boxes)
    torch.testing.assert_close(res.scores, true_iou(boxes, GT))
    with pytest.raises(ValueError, match="boxes"):
        refine_boxes(lambda b: b.sum(1), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="score_fn"):
        refine_boxes(lambda b: b, boxes)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_refine():
    boxes = jittered(GT, 16, 0.2).cuda()
    res = refine_boxes(lambda b: true_iou(b, GT.cuda()), boxes, steps=5, keep_best=True)
    assert res.boxes.is_cuda
    assert torch.all(res.scores >= true_iou(boxes, GT.cuda()) - 1e-6)
