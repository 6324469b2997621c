"""IoU-Net's class-aware IoU predictor (``iou_net_class_aware``) and Precise RoI Pooling for the box
head (``box_pool="prroi"``): which output is read, the training labels, inference and refinement
with the candidates' classes, and the errors. Issue 29: ``iou_net_loss_weight`` reaches the loss
from ``build_rcnn`` and the configuration, and ``iou_net_score`` (cluster-max class score or
class x refined IoU) scores the refined detections."""

from __future__ import annotations

import pytest
import torch

from locconf.experiment import build_model, check_config
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
    head = IoUNetHead(8, ["0", "1"], 7, 16, boxes_per_gt=10, num_classes=3, loss_weight=1.0)
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
    (dict(quality="iou_net", iou_net_loss_weight=-1.0), "iou_net_loss_weight must be a finite number >= 0"),
    (dict(quality="iou_net", iou_net_loss_weight=float("nan")), "iou_net_loss_weight"),
    (dict(quality="iou_net", iou_net_loss_weight="5"), "iou_net_loss_weight"),
    (dict(quality="iou_net", iou_net_loss="l2"), "iou_loss must be one of"),
    (dict(quality="iou_net", refine_steps=2, iou_net_score="cls"), "iou_net_score must be one of"),
    (dict(quality="iou_net", iou_net_score="cls_x_iou"), "needs quality='iou_net', refine_steps > 0"),
    (dict(quality="iou_net", refine_steps=2, refine_order="before_nms", iou_net_score="cls_x_iou"),
     "refine_order='after_nms'"),
    (dict(quality="dir", iou_net_score="cls_x_iou"), "iou_net_score='cls_x_iou'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_rcnn(3, **TINY, **kwargs)


def test_head_rejects_a_bad_class_count():
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            IoUNetHead(8, ["0"], num_classes=bad)


# -- issue 29: the loss weight and the score of refined boxes ---------------------------------------


def _iou_loss(weight, **kw):
    torch.manual_seed(0)
    model = build_rcnn(3, quality="iou_net", iou_net_loss_weight=weight, **TINY, **kw)
    images, targets = _data()
    torch.manual_seed(1)  # the same RPN / RoI sampling and jittered boxes for every weight
    return model(images, targets)


@pytest.mark.parametrize("iou_loss", ["bce", "smooth_l1"])
def test_loss_weight_reaches_the_loss(iou_loss):
    """``iou_net_loss_weight`` scales IoU-Net's loss and nothing else; the default is 5.0."""
    one, five = _iou_loss(1.0, iou_net_loss=iou_loss), _iou_loss(5.0, iou_net_loss=iou_loss)
    assert one["loss_iou_net"].item() > 0
    assert five["loss_iou_net"].item() == pytest.approx(5 * one["loss_iou_net"].item(), rel=1e-5)
    for key in one:
        if key != "loss_iou_net":
            assert torch.equal(one[key], five[key]), key
    assert build_rcnn(3, quality="iou_net", **TINY).roi_heads.quality_head.loss_weight == 5.0


def test_loss_weight_from_the_configuration():
    cfg = check_config({"model": {"arch": "rcnn", "quality": "iou_net", "iou_net_loss_weight": 2.5,
                                  "iou_net_loss": "smooth_l1"}, "data": {}, "train": {}})
    model = build_model(num_classes=3, **cfg["model"], **TINY)
    head = model.roi_heads.quality_head
    assert (head.loss_weight, head.iou_loss, head.score) == (2.5, "smooth_l1", "cluster_max")


def test_score_option_multiplies_the_refined_detections_by_their_iou():
    """Same weights, refinement after IoU-guided NMS: ``cls_x_iou`` returns the same boxes and IoU,
    each scored by its cluster-max class score (``cluster_max``'s score) times its predicted IoU,
    sorted by that score again."""
    torch.manual_seed(0)
    kw = dict(quality="iou_net", refine_steps=2, refine_top_k=5, **{**TINY, "score_thresh": 0.0})
    paper = build_rcnn(3, **kw).eval()
    ref = build_rcnn(3, iou_net_score="cls_x_iou", **kw).eval()
    ref.load_state_dict(paper.state_dict())
    assert (paper.roi_heads.quality_head.score, ref.roi_heads.quality_head.score) == ("cluster_max", "cls_x_iou")
    images, _ = _data()
    with torch.no_grad():
        a, b = paper(images), ref(images)
    for x, y in zip(a, b):
        assert len(x["boxes"]) > 5  # refined and unrefined rows
        key = lambda d, i: (tuple(d["boxes"][i].tolist()), int(d["labels"][i]))  # noqa: E731
        rows = {key(x, i): i for i in range(len(x["boxes"]))}
        order = torch.tensor([rows[key(y, j)] for j in range(len(y["boxes"]))])
        assert sorted(order.tolist()) == list(range(len(x["boxes"])))  # the same detections
        torch.testing.assert_close(y["quality"], x["quality"][order])
        torch.testing.assert_close(y["scores"], x["scores"][order] * x["quality"][order])
        assert bool((y["scores"][:-1] >= y["scores"][1:]).all())
        assert not torch.equal(y["scores"], x["scores"])


def test_harness_variants_pin_their_options_and_reuse_their_training():
    """The accuracy harness's issue-29 variants: the trained ones pin the loss and its weight; the
    refinement and score variants evaluate those weights with their option set on the built model."""
    from locconf.bench import settings

    setting = settings.synthetic_setting(iterations=1)
    for tag, loss, weight in (("w1", "bce", 1.0), ("w5", "bce", 5.0), ("sl1_w5", "smooth_l1", 5.0)):
        trained = settings.ALL_VARIANTS[f"iou_net_{tag}"]
        assert trained.reuse is None and trained.model["iou_net_loss_weight"] == weight
        torch.manual_seed(0)
        reference = build_model(**settings.make_config(setting, trained, 0, "unused", 3)["model"])
        for name, score in ((f"iou_net_refine_{tag}", "cluster_max"), (f"iou_net_refine_{tag}_cls_x_iou", "cls_x_iou")):
            v = settings.ALL_VARIANTS[name]
            assert v.reuse == trained.name and v.family == trained.family
            torch.manual_seed(0)
            model = build_model(**settings.make_config(setting, v, 0, "unused", 3)["model"])
            assert model.state_dict().keys() == reference.state_dict().keys()
            head = model.roi_heads.quality_head
            assert (head.iou_loss, head.loss_weight, head.score) == (loss, weight, score)
            assert model.roi_heads.refine_steps == 5 and model.roi_heads.refine_order == "after_nms"
