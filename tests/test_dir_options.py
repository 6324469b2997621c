"""DIR's ablations as options of one head (seed 002, Sec. 4.3): the localization confidence of
Table 5 and the features of Table 4, against hand-computed values and the head's own parts."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from locconf.boxes import elementwise_integrity, elementwise_purity, iou_from_purity_integrity
from locconf.heads import DIRHead, ForesightDIRHead, RoIBatch
from locconf.heads.dir import CONFIDENCES
from locconf.models import build_rcnn
from locconf.prroi_pool import MultiScalePrRoIPool

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=128, rpn_post_nms_top_n_test=200,
            candidates_per_image=150)


def _batch(seed: int = 0) -> RoIBatch:
    g = torch.Generator().manual_seed(seed)
    feats = {"0": torch.rand(1, 4, 16, 16, generator=g)}
    boxes = [torch.tensor([[2.0, 2, 10, 10], [4, 4, 12, 14], [1, 1, 5, 5]])]
    gts = [torch.tensor([[3.0, 3, 11, 11], [4, 4, 12, 12], [0, 0, 1, 1]])]
    pooled = torch.rand(3, 4, 2, 2, generator=g)  # the box head's features of the proposals
    return RoIBatch(feats, [(64, 64)], boxes, pooled, torch.zeros(3, 8), boxes, torch.tensor([0, 1, 2]), gts,
                    [torch.tensor([True, True, False])])


def _head(cls=DIRHead, **kw) -> DIRHead:
    torch.manual_seed(0)
    return cls(4, ["0"], pool_size=2, representation_size=8, **kw)


def test_table5_confidences_by_hand():
    s, t = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.8, 0.25, 0.9])
    c = iou_from_purity_integrity(s, t)
    # Eq. 5 by hand: 1 / (1/s + 1/t - 1); 0 where s or t is 0
    assert torch.allclose(c, torch.tensor([1 / (2 + 1.25 - 1), 1 / (1 + 4 - 1), 0.0]))
    want = {"iou": c, "purity": s, "integrity": t,
            "geometric": torch.tensor([math.sqrt(0.4), 0.5, 0.0]),
            "arithmetic": torch.tensor([0.65, 0.625, 0.45])}
    assert set(want) == set(CONFIDENCES)
    for name, value in want.items():
        assert torch.allclose(DIRHead.combine(s, t, c, name), value), name


@pytest.mark.parametrize("confidence", CONFIDENCES)
def test_confidence_changes_inference_only(confidence):
    batch = _batch()
    ref, head = _head(), _head(confidence=confidence)
    assert head.confidence == confidence and ref.confidence == "iou"
    # training: Eq. 9-10 whatever the confidence
    for k, v in ref.loss(batch).items():
        assert torch.equal(v, head.loss(batch)[k]), k
    head.eval()
    s, t, c = head(head.pool(batch.features, batch.boxes, batch.image_sizes))
    assert torch.equal(head.predict(batch), DIRHead.combine(s, t, c, confidence))


def test_table4_features_in_training_and_at_inference():
    batch = _batch()
    repooled = DIRHead(4, ["0"], pool_size=2).pool(batch.features, batch.boxes, batch.image_sizes)
    for train in ("boxes", "proposals"):
        for infer in ("boxes", "proposals"):
            head = _head(train_features=train, inference_features=infer)
            x = {"boxes": repooled, "proposals": batch.pooled[batch.index]}
            # loss: the positive rows (0, 1) of the training features
            s, t, c = head(x[train][:2])
            p = elementwise_purity(batch.boxes[0][:2], batch.gt_boxes[0][:2])
            i = elementwise_integrity(batch.boxes[0][:2], batch.gt_boxes[0][:2])

            def bce(x, y):
                return float(-(y * torch.log(x) + (1 - y) * torch.log(1 - x)).mean().detach())

            losses = head.loss(batch)
            assert math.isclose(losses["loss_purity"].item(), bce(s, p), rel_tol=1e-5)
            assert math.isclose(losses["loss_integrity"].item(), bce(t, i), rel_tol=1e-5)
            assert math.isclose(losses["loss_quality_iou"].item(), bce(c, iou_from_purity_integrity(p, i)),
                                rel_tol=1e-5)
            # inference: the inference features, in either module mode
            assert torch.allclose(head.predict(batch), head(x[infer])[2])
            # features() without a source follows the module's mode
            assert torch.equal(head.features(batch), x[train])
            head.eval()
            assert torch.equal(head.features(batch), x[infer])


def test_foresight_head_is_dir_with_proposal_features():
    batch = _batch()
    fore = _head(ForesightDIRHead)
    same = _head(train_features="proposals", inference_features="proposals")
    assert (fore.train_features, fore.inference_features) == ("proposals", "proposals")
    assert fore.state_dict().keys() == same.state_dict().keys()
    assert torch.equal(fore.predict(batch), same.predict(batch))
    assert torch.equal(fore.loss(batch)["loss_purity"], same.loss(batch)["loss_purity"])
    mixed = _head(ForesightDIRHead, inference_features="boxes", confidence="purity")
    assert (mixed.train_features, mixed.inference_features, mixed.confidence) == ("proposals", "boxes", "purity")


def test_bad_options():
    for kw in (dict(confidence="harmonic"), dict(train_features="rois"), dict(inference_features=None)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            _head(**kw)


def test_build_rcnn_reaches_the_options():
    torch.manual_seed(0)
    model = build_rcnn(2, quality="dir", dir_confidence="geometric", dir_inference_features="proposals", **TINY)
    head = model.roi_heads.quality_head
    assert (head.confidence, head.train_features, head.inference_features) == ("geometric", "boxes", "proposals")
    head = build_rcnn(2, quality="dir_foresight", dir_inference_features="boxes", **TINY).roi_heads.quality_head
    assert isinstance(head, ForesightDIRHead)
    assert (head.confidence, head.train_features, head.inference_features) == ("iou", "proposals", "boxes")
    with pytest.raises(ValueError, match="dir_confidence"):
        build_rcnn(2, quality="iou_net", dir_confidence="purity", **TINY)
    with pytest.raises(ValueError, match="dir_confidence"):
        build_rcnn(2, quality="kl", dir_train_features="proposals", **TINY)
    with pytest.raises(ValueError, match="confidence"):
        build_rcnn(2, quality="dir", dir_confidence="harmonic", **TINY)
    # one model, every Table 5 row: the confidence is read at inference
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g)]
    model.eval()
    out = {}
    with torch.no_grad():
        for confidence in ("iou", "purity"):
            model.roi_heads.quality_head.confidence = confidence
            out[confidence] = model.candidates(images)[0]
    assert torch.equal(out["iou"]["boxes"], out["purity"]["boxes"])
    assert not torch.equal(out["iou"]["quality"], out["purity"]["quality"])


@pytest.mark.parametrize("box_pool", ["roi_align", "prroi"])
@pytest.mark.parametrize("quality", ["dir", "dir_foresight"])
def test_table4_features_come_from_one_operator(box_pool, quality):
    """Issue 29: with ``box_pool="prroi"`` the proposals' features are PrRoIPool ones, so DIR's own
    pooling of the boxes is PrRoIPool too: a box that is its own proposal gets the same features
    either way (Table 4's rows then differ only in which box is pooled, not in the operator)."""
    torch.manual_seed(0)
    model = build_rcnn(3, quality=quality, box_pool=box_pool, dir_train_features="boxes",
                       dir_inference_features="proposals", **TINY)
    head = model.roi_heads.quality_head
    assert isinstance(head.pool, MultiScalePrRoIPool if box_pool == "prroi" else MultiScaleRoIAlign)
    g = torch.Generator().manual_seed(1)
    feats = {str(i): torch.rand(1, 16, 32 // 2**i, 32 // 2**i, generator=g) for i in range(3)}
    boxes = [torch.tensor([[3.0, 5, 40, 44], [20, 10, 90, 70], [50, 60, 70, 75]])]
    torch.testing.assert_close(head.pool(feats, boxes, [(128, 128)]),
                               model.roi_heads.box_pool(feats, boxes, [(128, 128)]))
    with pytest.raises(ValueError, match="pool must be one of"):
        DIRHead(4, ["0"], pool="roi_pool")
