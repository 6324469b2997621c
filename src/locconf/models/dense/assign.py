"""Adaptive Training Sample Selection (ATSS): which anchors train on which ground truth.

Shared by every one-stage head (:mod:`locconf.models.dense`).

ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection", CVPR 2020, Sec. 4.1 and Algorithm 1) decides, for every ground-truth
box ``g``, which anchors are its positive samples:

1. on every pyramid level, take the ``topk`` anchors whose centres are closest (L2) to the centre
   of ``g`` (all of the level's anchors when it has fewer);
2. compute the IoU of these candidates with ``g``; the threshold is ``t_g = mean + std`` of those
   IoUs (over all levels together);
3. a candidate is positive when its IoU is ``>= t_g`` **and** its centre lies inside ``g``
   (at least ``eps`` from every side, 0.01 px as in the authors' code);
4. an anchor that is positive for several ground truths goes to the one with the highest IoU.

``std`` is the unbiased standard deviation (``torch.std``, as in the authors' code); with a single
candidate it is 0. Every other anchor is a negative (ATSS has no "ignore" band).

Everything is vectorised over anchors and ground truths; the only Python loop is over the pyramid
levels (a handful).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...boxes import _pairwise_intersection, _safe_div, box_area, check_boxes

__all__ = ["atss_assign", "assign_batch"]


def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    eps: float = 0.01,
) -> Tensor:
    """Assign every anchor to a ground-truth box or to the background with ATSS.

    Args:
        anchors: (A, 4) anchors ``(x1, y1, x2, y2)`` of one image, all pyramid levels
            concatenated level after level.
        num_anchors_per_level: the number of anchors of each level; they must add up to ``A``.
        gt_boxes: (M, 4) ground-truth boxes of the image (``M`` may be 0).
        topk: candidates per level and ground truth (9 in the paper; Sec. 4.3 shows it is robust to k).
        eps: how far (in pixels) inside a ground truth a candidate's centre must be.

    Returns:
        (A,) int64: index in ``0..M-1`` of the ground truth each anchor is a positive for, or -1
        for a negative.
    """
    check_boxes(anchors, "anchors")
    check_boxes(gt_boxes, "gt_boxes")
    if gt_boxes.device != anchors.device:
        raise ValueError(f"gt_boxes is on {gt_boxes.device} but anchors are on {anchors.device}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    counts = [int(n) for n in num_anchors_per_level]
    if any(n < 0 for n in counts) or sum(counts) != anchors.shape[0]:
        raise ValueError(
            f"num_anchors_per_level must be non-negative and add up to the {anchors.shape[0]} anchors, got {counts}"
        )
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return _atss_assign(anchors, counts, gt_boxes.to(anchors.dtype), topk, eps)


def _atss_assign(anchors: Tensor, counts: Sequence[int], gt_boxes: Tensor, topk: int, eps: float = 0.01) -> Tensor:
    """:func:`atss_assign` without input validation (no host synchronisation), for the detectors."""
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    inter = _pairwise_intersection(anchors, gt_boxes)
    iou = _safe_div(inter, box_area(anchors)[:, None] + box_area(gt_boxes)[None, :] - inter)  # (A, M)
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(anchor_ctr, gt_ctr)  # (A, M)

    # 1. the topk closest anchors of every level: (K, M) indices into the anchors
    candidates, start = [], 0
    for n in counts:
        if n > 0:
            k = min(topk, n)
            candidates.append(dist[start:start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    cand = torch.cat(candidates, dim=0)  # (K, M)

    # 2. per-ground-truth threshold mean + std of the candidates' IoUs
    cand_iou = iou.gather(0, cand)  # (K, M)
    std = cand_iou.std(dim=0) if cand.shape[0] > 1 else torch.zeros_like(cand_iou[0])
    threshold = cand_iou.mean(dim=0) + std  # (M,)

    # 3. IoU above the threshold and centre inside the ground truth
    ctr = anchor_ctr[cand]  # (K, M, 2)
    ltrb = torch.cat([ctr - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - ctr], dim=2)  # (K, M, 4)
    positive = (cand_iou >= threshold[None]) & (ltrb.amin(dim=2) > eps)

    # 4. an anchor positive for several ground truths takes the one it overlaps most
    is_pos = torch.zeros_like(iou, dtype=torch.bool).scatter_(0, cand, positive)  # (A, M)
    best_iou, best_gt = iou.masked_fill(~is_pos, -1.0).max(dim=1)
    return torch.where(best_iou >= 0, best_gt, matched)


def assign_batch(anchors: Tensor, counts: Sequence[int], targets: Sequence[dict], topk: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ATSS on every image of a batch whose images share ``anchors`` (N, 4), without validation.

    Returns the image and anchor index of every positive (P,), (P,), its ground-truth box (P, 4)
    and its 0-based class (P,) (the targets' labels are ``1..K``).
    """
    matched, offset = [], 0
    for t in targets:  # ground truths indexed globally over the batch
        m = _atss_assign(anchors, counts, t["boxes"].to(anchors), topk)
        matched.append(torch.where(m >= 0, m + offset, m))
        offset += t["boxes"].shape[0]
    matched = torch.stack(matched)  # (B, N)
    gt_boxes = torch.cat([t["boxes"] for t in targets]).to(anchors)
    gt_labels = torch.cat([t["labels"] for t in targets]).to(anchors.device)
    b_idx, a_idx = (matched >= 0).nonzero(as_tuple=True)
    gt_idx = matched[b_idx, a_idx]
    return b_idx, a_idx, gt_boxes[gt_idx], gt_labels[gt_idx] - 1
