"""IoU-Net's class-aware IoU predictor (``iou_net_class_aware``) and Precise RoI Pooling for the box
head (``box_pool="prroi"``): which output is read, the training labels, inference and refinement
with the candidates' classes, and the errors."""

from __future__ import annotations

import pytest
import torch

from locconf.heads import IoUNetHead, RoIBatch
from locconf.models import build_rcnn
from locconf.prroi_pool import MultiScalePrRoIPool

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=96, rpn_post_nms_top_n_test=100,
            candidates_per_image=80, box_batch_size_per_image=32, iou_net_boxes_per_gt=8,
            iou_net_max_boxes_per_image=64)


def _data():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[5.0, 5, 35, 40], [55, 50, 90, 92]]), labels=torch.tensor([1, 3])),
               dict(boxes=torch.tensor([[20.0, 10, 70, 60]]), labels=torch.tensor([2]))]
    return images, targets


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"0": torch.randn(1, 8, 24, 24, generator=g), "1": torch.randn(1, 8, 12, 12, generator=g)}


def test_class_aware_head_reads_the_output_of_each_box_class():
    torch.manual_seed(0)
    head = IoUNetHead(8, ["0", "1"], 7, 16, num_classes=3)
    assert head.iou[-1].out_features == 3
    feats, boxes = _features(), [torch.tensor([[4.0, 4, 40, 40], [30, 20, 90, 80], [10, 50, 60, 95]])]
    labels = torch.tensor([3, 1, 2])
    all_classes = torch.sigmoid(head.iou(head.pool(feats, boxes, [(96, 96)])))
    expected = torch.stack([all_classes[i, c - 1] for i, c in enumerate(labels.tolist())])
    torch.testing.assert_close(head.score_boxes(feats, boxes, [(96, 96)], labels), expected)
    with pytest.raises(ValueError, match="labels"):
        head.score_boxes(feats, boxes, [(96, 96)])


def test_class_aware_training_boxes_take_the_class_of_the_best_matching_ground_truth():
    head = IoUNetHead(8, ["0"], 7, 16, boxes_per_gt=20, num_classes=3)
    gt = torch.tensor([[0.0, 0, 30, 30], [60, 60, 95, 95]])  # far apart: a jittered box (IoU >= 0.5) matches its own
    torch.manual_seed(0)
    boxes, iou, matched = head._training_boxes(gt)
    labels = torch.tensor([2, 3])[matched]
    near_first = ((boxes[:, :2] + boxes[:, 2:]) / 2).sum(1) < 90
    assert near_first.any() and (~near_first).any() and (iou >= 0.5 - 1e-6).all()
    assert (labels[near_first] == 2).all() and (labels[~near_first] == 3).all()
    # class-agnostic: the same boxes and targets (the public training_boxes), so its training is unchanged
    agnostic = IoUNetHead(8, ["0"], 7, 16, boxes_per_gt=20)
    torch.manual_seed(0)
    b2, iou2 = agnostic.training_boxes(gt)
    assert torch.equal(b2, boxes) and torch.equal(iou2, iou)


def test_class_aware_loss_reads_the_class_of_the_matched_ground_truth():
    torch.manual_seed(0)
    head = IoUNetHead(8, ["0", "1"], 7, 16, boxes_per_gt=10, num_classes=3)
    feats, gt = _features(), torch.tensor([[0.0, 0, 30, 30], [50, 40, 95, 90]])
    batch = RoIBatch(feats, [(96, 96)], [gt], torch.zeros(0), torch.zeros(0), [gt], torch.zeros(0),
                     targets=[{"boxes": gt, "labels": torch.tensor([3, 1])}])
    torch.manual_seed(1)
    loss = head.loss(batch)["loss_iou_net"]
    torch.manual_seed(1)
    boxes, iou, matched = head._training_boxes(gt)
    prob = head.score_boxes(feats, [boxes], [(96, 96)], torch.tensor([3, 1])[matched])
    expected = -(iou * prob.log() + (1 - iou) * (1 - prob).log()).mean()
    torch.testing.assert_close(loss, expected)
    wrong = head.score_boxes(feats, [boxes], [(96, 96)], torch.tensor([1, 3])[matched])
    assert not torch.allclose(wrong, prob)  # the class matters


def test_class_aware_detector_trains_and_predicts_the_quality_of_each_candidate_class():
    torch.manual_seed(0)
    model = build_rcnn(3, quality="iou_net", iou_net_class_aware=True, **{**TINY, "candidates_per_image": 300})
    head = model.roi_heads.quality_head
    assert head.num_classes == 3
    images, targets = _data()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert head.iou[-1].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        cand = model.candidates(images)
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        for i, c in enumerate(cand):  # images are 96 px and min_size is 96: no resizing
            feats = {k: v[i:i + 1] for k, v in features.items()}
            expected = head.score_boxes(feats, [c["boxes"]], [batch.image_sizes[i]], c["labels"])
            torch.testing.assert_close(c["quality"], expected, rtol=1e-4, atol=1e-5)
            assert len(set(c["labels"].tolist())) > 1  # several classes were read


@pytest.mark.parametrize("order", ["after_nms", "before_nms"])
def test_class_aware_refinement_climbs_the_candidate_class(order):
    torch.manual_seed(0)
    model = build_rcnn(3, quality="iou_net", iou_net_class_aware=True, refine_steps=2, refine_order=order,
                       **TINY).eval()
    images, _ = _data()
    seen = []
    original = model.roi_heads.quality_head.refine

    def record(features, boxes, image_sizes, steps, step_size, labels=None, **kw):
        seen.append(labels)
        return original(features, boxes, image_sizes, steps, step_size, labels=labels, **kw)

    model.roi_heads.quality_head.refine = record
    with torch.no_grad():
        out = model.candidates(images)
    assert len(seen) == 1 and seen[0] is not None
    for o, lab in zip(out, seen[0]):
        assert torch.equal(o["labels"][:len(lab)], lab) and torch.isfinite(o["quality"]).all()


def test_prroi_box_pool_trains_and_detects():
    torch.manual_seed(0)
    model = build_rcnn(3, box_pool="prroi", **TINY)
    assert isinstance(model.roi_heads.box_pool, MultiScalePrRoIPool)
    images, targets = _data()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0
    dets = model.detect(images)
    assert all(d["boxes"].shape[1] == 4 for d in dets)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quality="dir", iou_net_class_aware=True), "iou_net_class_aware needs quality='iou_net'"),
    (dict(box_pool="roi_pool"), "box_pool must be one of"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_rcnn(3, **TINY, **kwargs)


def test_head_rejects_a_bad_class_count():
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            IoUNetHead(8, ["0"], num_classes=bad)
