"""ATSS assignment: hand-computed cases, a brute-force reference, centerness targets, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from locconf.models.dense.assign import atss_assign
from locconf.models.dense.atss import centerness_targets


def row_of_anchors(centres, size=10.0, y=5.0):
    """Square anchors of side ``size`` centred at (x, y) for x in ``centres``."""
    c = torch.tensor(centres, dtype=torch.float32)
    h = size / 2
    return torch.stack([c - h, torch.full_like(c, y - h), c + h, torch.full_like(c, y + h)], dim=1)


def test_hand_computed_single_positive():
    # anchors [x-5, 0, x+5, 10] at x = 0..40; the ground truth [12, 0, 28, 10] is centred at x = 20.
    # topk=3 closest: x = 10, 20, 30 with IoUs 30/230, 100/160, 30/230; mean + (unbiased) std is
    # 0.2953 + 0.2855 = 0.581, so only the anchor at x = 20 (IoU 0.625) is positive.
    anchors = row_of_anchors([0, 10, 20, 30, 40])
    gt = torch.tensor([[12.0, 0.0, 28.0, 10.0]])
    assert atss_assign(anchors, [5], gt, topk=3).tolist() == [-1, -1, 0, -1, -1]
    ious = torch.tensor([30 / 230, 100 / 160, 30 / 230])
    assert ious.mean() + ious.std() == pytest.approx(0.5808, abs=1e-4)


def test_centre_must_lie_inside_the_ground_truth():
    # ground truth [12, 0, 18, 10]: the two closest anchors (x = 10 and 20) both have IoU 30/130 =
    # the threshold (std 0), but neither centre lies inside the box, so nothing is positive.
    anchors = row_of_anchors([0, 10, 20, 30])
    gt = torch.tensor([[12.0, 0.0, 18.0, 10.0]])
    assert atss_assign(anchors, [4], gt, topk=2).tolist() == [-1, -1, -1, -1]
    # a wider box [12, 0, 21, 10] contains the centre x = 20; with topk=3 the candidates x = 20, 10,
    # 30 have IoUs 60/130, 30/160, 0 -> threshold 0.2163 + 0.2321 = 0.448 < 0.4615: positive
    gt = torch.tensor([[12.0, 0.0, 21.0, 10.0]])
    assert atss_assign(anchors, [4], gt, topk=3).tolist() == [-1, -1, 0, -1]


def test_anchor_positive_for_two_boxes_goes_to_the_higher_iou():
    # anchor x = 20 is positive for gt0 (IoU 0.625) and for gt1 [14, 0, 24, 10] (IoU 90/110 = 0.818,
    # threshold 0.748): it goes to gt1; gt0 is left without positives.
    anchors = row_of_anchors([0, 10, 20, 30, 40])
    gt = torch.tensor([[12.0, 0.0, 28.0, 10.0], [14.0, 0.0, 24.0, 10.0]])
    assert atss_assign(anchors, [5], gt, topk=3).tolist() == [-1, -1, 1, -1, -1]
    # the order of the ground truths does not matter
    assert atss_assign(anchors, [5], gt.flip(0), topk=3).tolist() == [-1, -1, 0, -1, -1]


def test_topk_is_per_level_and_a_small_level_gives_all_its_anchors():
    # level 0: five anchors of side 10 at x = 0..40 (y in [0, 10]); level 1: two of side 40,
    # [0, 0, 40, 40] and [40, 0, 80, 40]. Ground truth [2, 2, 38, 38], centred at (20, 20).
    # topk=3: level 0 gives x = 10, 20, 30 (IoU 80/1316 each), level 1 has fewer than 3 anchors and
    # gives both (IoU 1296/1600 = 0.81 and 0). Threshold 0.1985 + 0.3429 = 0.541: only the big
    # anchor that covers the box is positive, although level 0 holds the closest anchors.
    small = row_of_anchors([0, 10, 20, 30, 40], size=10.0)
    big = torch.tensor([[0.0, 0.0, 40.0, 40.0], [40.0, 0.0, 80.0, 40.0]])
    anchors = torch.cat([small, big])
    gt = torch.tensor([[2.0, 2.0, 38.0, 38.0]])
    assert atss_assign(anchors, [5, 2], gt, topk=3).tolist() == [-1, -1, -1, -1, -1, 0, -1]
    vals = torch.tensor([80 / 1316] * 3 + [0.81, 0.0])
    assert float(vals.mean() + vals.std()) == pytest.approx(0.5413, abs=1e-3)


def reference_atss(anchors, counts, gt, topk, eps=0.01):
    """Brute-force ATSS (Algorithm 1 of the paper), one ground truth and one anchor at a time."""
    from locconf.boxes import box_iou

    iou = box_iou(anchors, gt).tolist()
    ac = ((anchors[:, :2] + anchors[:, 2:]) / 2).tolist()
    pos = [[False] * len(gt) for _ in range(len(anchors))]
    for g in range(len(gt)):
        gx, gy = ((gt[g, 0] + gt[g, 2]) / 2).item(), ((gt[g, 1] + gt[g, 3]) / 2).item()
        cands, start = [], 0
        for n in counts:
            level = sorted(range(start, start + n), key=lambda i: (math.hypot(ac[i][0] - gx, ac[i][1] - gy), i))
            cands += level[:topk]
            start += n
        vals = [iou[i][g] for i in cands]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        x1, y1, x2, y2 = gt[g].tolist()
        for i in cands:
            inside = min(ac[i][0] - x1, ac[i][1] - y1, x2 - ac[i][0], y2 - ac[i][1]) > eps
            pos[i][g] = iou[i][g] >= mean + std - 1e-6 and inside
    out = []
    for i in range(len(anchors)):
        best = max((iou[i][g], g) for g in range(len(gt)) if pos[i][g]) if any(pos[i]) else None
        out.append(-1 if best is None else best[1])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    levels, anchors = [], []
    for stride, size in ((8, 32.0), (16, 64.0), (32, 128.0)):
        n = 128 // stride
        centres = torch.arange(n) * stride + stride / 2
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        c = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        anchors.append(torch.cat([c - size / 2, c + size / 2], 1))
        levels.append(n * n)
    anchors = torch.cat(anchors)
    xy = torch.rand(6, 2, generator=g) * 100
    wh = torch.rand(6, 2, generator=g) * 60 + 4
    gt = torch.cat([xy, xy + wh], 1)
    got = atss_assign(anchors, levels, gt, topk=9).tolist()
    assert got == reference_atss(anchors, levels, gt, 9)
    assert any(m >= 0 for m in got)


def test_no_ground_truth_gives_all_negatives():
    anchors = row_of_anchors([0, 10, 20])
    out = atss_assign(anchors, [3], torch.zeros(0, 4))
    assert out.dtype == torch.long and out.tolist() == [-1, -1, -1]
    assert atss_assign(torch.zeros(0, 4), [0], torch.tensor([[0.0, 0.0, 5.0, 5.0]])).shape == (0,)


def test_bad_input_names_the_argument():
    anchors = row_of_anchors([0, 10, 20])
    gt = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        atss_assign(anchors, [2], gt)
    with pytest.raises(ValueError, match="gt_boxes"):
        atss_assign(anchors, [3], torch.tensor([[5.0, 0.0, 0.0, 5.0]]))
    with pytest.raises(ValueError, match="gt_boxes"):
        atss_assign(anchors, [3], torch.tensor([[0.0, 0.0, float("nan"), 5.0]]))
    with pytest.raises(ValueError, match="anchors"):
        atss_assign(anchors[:, :3], [3], gt)
    with pytest.raises(ValueError, match="topk"):
        atss_assign(anchors, [3], gt, topk=0)


def test_centerness_targets_hand_computed():
    points = torch.tensor([[15.0, 5.0], [20.0, 5.0], [10.0, 5.0], [50.0, 5.0]])
    boxes = torch.tensor([[10.0, 0.0, 30.0, 10.0]]).expand(4, 4)
    # (15, 5): l=5, r=15, t=b=5 -> sqrt(1/3); the centre -> 1; on the left side or outside -> 0
    assert centerness_targets(points, boxes).tolist() == pytest.approx([math.sqrt(1 / 3), 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="boxes"):
        centerness_targets(points, boxes[:2])
