"""Cascade R-CNN (``build_rcnn(cascade=...)``): each stage samples at its own IoU threshold from the
previous stage's regressed boxes, the loss weights, inference against a plain reference written
here with torchvision's box coder, the quality head on the last stage, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from locconf.models import build_rcnn
from locconf.models.cascade import CascadeRoIHeads

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=128, rpn_post_nms_top_n_train=200,
            rpn_post_nms_top_n_test=100, candidates_per_image=150, box_batch_size_per_image=64)
STAGES = (0.5, 0.6, 0.7)


def _data():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 112, generator=g)]
    targets = [dict(boxes=torch.tensor([[10.0, 10, 40, 50], [50, 20, 90, 70]]), labels=torch.tensor([1, 2])),
               dict(boxes=torch.tensor([[5.0, 5, 60, 40]]), labels=torch.tensor([1]))]
    return images, targets


def _model(quality=None, **kw):
    torch.manual_seed(0)
    return build_rcnn(2, quality=quality, cascade=STAGES, **TINY, **kw)


def test_structure_and_loss_names():
    model = _model("dir")
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert len({id(heads.stage_head(t)) for t in range(3)}) == 3
    images, targets = _data()
    losses = model(images, targets)
    expected = {f"loss_{k}_s{t}" for k in ("classifier", "box_reg") for t in (1, 2, 3)}
    expected |= {"loss_objectness", "loss_rpn_box_reg", "loss_purity", "loss_integrity", "loss_quality_iou"}
    assert set(losses) == expected
    sum(losses.values()).backward()
    for t in range(3):  # every stage's head learns
        head = heads.stage_head(t)
        assert head.fc6.weight.grad is not None and head.fc6.weight.grad.abs().sum() > 0


def test_stage_loss_weights_scale_each_stage():
    images, targets = _data()
    default = _model()(images, targets)
    ones = _model(cascade_loss_weights=(1.0, 1.0, 1.0))(images, targets)
    for t, w in zip((1, 2, 3), (1.0, 0.5, 0.25)):
        for k in ("classifier", "box_reg"):
            key = f"loss_{k}_s{t}"
            torch.testing.assert_close(default[key], w * ones[key])


def _clip(boxes, size):
    h, w = size
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def _coder(scale):
    return BoxCoder((10.0 * scale, 10.0 * scale, 5.0 * scale, 5.0 * scale))


def test_each_stage_samples_at_its_threshold_from_the_previous_stage_boxes():
    model = _model()
    heads = model.roi_heads
    seen = []
    original = heads._train_stage

    def record(features, proposals, image_sizes, targets, matcher, box_head, scale=1.0):
        stage = original(features, proposals, image_sizes, targets, matcher, box_head, scale)
        seen.append((proposals, image_sizes, matcher, scale, stage))
        return stage

    heads._train_stage = record
    images, targets = _data()
    model(images, targets)
    assert [m.high_threshold for _, _, m, _, _ in seen] == list(STAGES)
    assert [s for _, _, _, s, _ in seen] == [1.0, 2.0, 3.0]
    for t, (_, sizes, _, scale, stage) in enumerate(seen):
        for props, labels, matched in zip(stage.proposals, stage.labels, stage.matched):
            iou = box_iou(props, matched).diagonal()
            assert (iou[labels > 0] >= STAGES[t] - 1e-6).all() and (labels > 0).any()
            assert (iou[labels == 0] < STAGES[t] + 1e-6).all()
        if t + 1 < len(seen):  # the next stage's inputs: this stage's regressed RoIs, ground-truth copies dropped
            deltas = stage.pred.detach().split([len(p) for p in stage.proposals])
            for d, props, is_gt, size, nxt in zip(deltas, stage.proposals, stage.is_gt, sizes, seen[t + 1][0]):
                expected = _clip(_coder(scale).decode_single(d, props), size)[~is_gt]
                torch.testing.assert_close(nxt, expected, rtol=1e-5, atol=1e-4)


def test_inference_matches_a_plain_reference():
    model = _model().eval()
    heads = model.roi_heads
    images, _ = _data()
    with torch.no_grad():
        cands = model.candidates(images)
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        sizes = batch.image_sizes
        probs = 0
        for t, scale in enumerate((1.0, 2.0, 3.0)):
            _, logits, deltas = heads.stage_head(t)(heads.box_pool(features, proposals, sizes))
            probs = probs + F.softmax(logits, dim=-1)[:, 1:] / 3
            boxes = _coder(scale).decode_single(deltas, torch.cat(proposals))
            out = [_clip(b, size) for b, size in zip(boxes.split([len(p) for p in proposals]), sizes)]
            if t < 2:
                proposals = out
    for i, (c, b, p) in enumerate(zip(cands, out, probs.split([len(p) for p in proposals]))):
        original, resized = images[i].shape[-2:], sizes[i]
        ratio = torch.tensor([original[1] / resized[1], original[0] / resized[0]] * 2)
        top = p.reshape(-1).topk(5)
        rows, cls = top.indices // 2, top.indices % 2 + 1
        torch.testing.assert_close(c["scores"][:5], top.values, rtol=1e-5, atol=1e-6)
        assert torch.equal(c["labels"][:5], cls)
        torch.testing.assert_close(c["boxes"][:5], b[rows] * ratio, rtol=1e-5, atol=1e-4)


def _iou(a, b) -> float:
    """IoU of two xyxy boxes, by hand."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _record_quality_batch(model):
    heads = model.roi_heads
    stages, batches = [], []
    original_stage, original_loss = heads._train_stage, heads.quality_head.loss

    def record_stage(*args, **kw):
        stages.append(original_stage(*args, **kw))
        return stages[-1]

    def record_loss(batch):
        batches.append(batch)
        return original_loss(batch)

    heads._train_stage, heads.quality_head.loss = record_stage, record_loss
    images, targets = _data()
    model(images, targets)
    assert len(stages) == heads.num_stages == 3 and len(batches) == 1  # one quality loss, on the last stage
    return stages[-1], batches[0], batches[0].targets  # the targets in the resized images' coordinates


def test_quality_head_trains_on_the_last_stage():
    model = _model("dir")
    last, batch, _ = _record_quality_batch(model)
    assert all(torch.equal(a, b) for a, b in zip(batch.proposals, last.proposals))
    deltas = last.pred.detach().split([len(p) for p in last.proposals])
    for d, props, size, boxes in zip(deltas, last.proposals, batch.image_sizes, batch.boxes):
        torch.testing.assert_close(boxes, _clip(_coder(3.0).decode_single(d, props), size), rtol=1e-5, atol=1e-4)


def test_quality_positives_default_to_the_last_stage_positives():
    last, batch, _ = _record_quality_batch(_model("dir"))
    for pos, labels in zip(batch.positive, last.labels):
        assert torch.equal(pos, labels > 0)


@pytest.mark.parametrize("quality", ["dir", "iou_direct"])
def test_cascade_quality_iou_trains_on_every_roi_above_it(quality):
    default_last, default_batch, _ = _record_quality_batch(_model(quality))
    last, batch, targets = _record_quality_batch(_model(quality, cascade_quality_iou=0.5))
    assert batch.positive is not None
    for rois, pos, matched, t in zip(last.proposals, batch.positive, batch.gt_boxes, targets):
        gt = t["boxes"].tolist()
        for k, roi in enumerate(rois.tolist()):  # brute force, one RoI at a time
            ious = [_iou(roi, g) for g in gt]
            best = max(range(len(gt)), key=lambda j: ious[j])
            assert bool(pos[k]) == (ious[best] >= 0.5), (k, ious)
            if pos[k]:
                torch.testing.assert_close(matched[k], t["boxes"][best])
    # the same seed samples the same RoIs: the option only adds positives (0.5 <= IoU < 0.7)
    for p_new, p_old in zip(batch.positive, default_batch.positive):
        assert bool((p_new | ~p_old).all())
    assert sum(int(p.sum()) for p in batch.positive) > sum(int(p.sum()) for p in default_batch.positive)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quality="dir", cascade_quality_iou=1.5), r"quality_fg_iou must be None or in \(0, 1\)"),
    (dict(quality="iou_net", cascade_quality_iou=0.5), "cascade_quality_iou needs"),
    (dict(quality=None, cascade_quality_iou=0.5), "cascade_quality_iou needs"),
    (dict(quality="kl"), "quality head"),
    (dict(mask=True), "mask"),
    (dict(class_agnostic_box=False), "class_agnostic_box"),
    (dict(cascade="0.5"), "sequence"),
    (dict(cascade=(0.5, 1.2)), r"\(0, 1\)"),
    (dict(cascade=(0.5, 0.6), cascade_loss_weights=(1.0,)), "one value per stage"),
])
def test_bad_cascade_arguments(kwargs, match):
    kwargs = {"cascade": STAGES, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_rcnn(2, **TINY, **kwargs)


def test_loss_weights_need_a_cascade():
    with pytest.raises(ValueError, match="cascade_loss_weights needs cascade"):
        build_rcnn(2, cascade_loss_weights=(1.0,), **TINY)


def test_cascade_quality_iou_needs_a_cascade():
    with pytest.raises(ValueError, match="cascade_quality_iou needs cascade"):
        build_rcnn(2, quality="dir", cascade_quality_iou=0.5, **TINY)
