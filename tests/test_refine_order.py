"""IoU-Net's inference order (Jiang et al. 2018; the reimplementation github.com/thisisi3/OpenMMLab-IoUNet):
IoU-guided NMS first, then refinement of the kept boxes ("after_nms", the default), against the
former order, every candidate refined before post-processing ("before_nms")."""

from __future__ import annotations

import pytest
import torch

from locconf.models import build_rcnn
from locconf.postprocess import postprocess

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=128, rpn_post_nms_top_n_test=200,
            candidates_per_image=150)


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 112, generator=g)]


def test_nms_then_refine_against_refine_then_nms():
    images = _images()
    torch.manual_seed(0)
    model = build_rcnn(2, quality="iou_net", refine_steps=3, refine_top_k=5, **TINY).eval()
    heads = model.roi_heads
    assert (heads.refine_order, heads.refine_top_k) == ("after_nms", 5)
    heads.quality_head.refine_keep_best = True  # monotone in the predicted IoU: checkable
    with torch.no_grad():
        heads.refine_steps = 0
        plain = model.candidates(images)
        heads.refine_steps = 3
        after = model.candidates(images)
        heads.refine_order = "before_nms"
        before = model.candidates(images)
    for p, a, b in zip(plain, after, before):
        nms = postprocess(p, "iou-guided", max_detections=len(p["boxes"]))
        assert len(nms["boxes"]) < len(p["boxes"])  # the NMS removed something
        # after_nms: exactly the IoU-guided NMS detections (scores, labels: cluster max, order) ...
        assert torch.equal(a["scores"], nms["scores"]) and torch.equal(a["labels"], nms["labels"])
        # ... the first refine_top_k refined (never below their start with keep_best), the rest untouched
        assert torch.equal(a["boxes"][5:], nms["boxes"][5:]) and torch.equal(a["quality"][5:], nms["quality"][5:])
        assert bool((a["quality"][:5] >= nms["quality"][:5] - 1e-5).all())
        assert not torch.equal(a["boxes"][:5], nms["boxes"][:5])
        # before_nms: every candidate refined, nothing removed yet (post-processing follows)
        assert torch.equal(b["scores"], p["scores"]) and b["boxes"].shape == p["boxes"].shape
        moved = (b["boxes"] - p["boxes"]).abs().sum(1) > 0
        assert int(moved.sum()) > 5
        # post-processing the after_nms detections again with the head's method changes nothing
        # unless refinement made two overlap above the threshold
        again = postprocess(a, "iou-guided", max_detections=len(a["boxes"]))
        assert len(again["boxes"]) <= len(a["boxes"])
    # detect() runs either order through the head's own post-processing
    heads.refine_order = "after_nms"
    dets = model.detect(images)
    assert all(len(d["boxes"]) <= 100 for d in dets)


def test_refine_order_options_are_checked():
    with pytest.raises(ValueError, match="refine_order"):
        build_rcnn(2, quality="iou_net", refine_order="during_nms", **TINY)
    with pytest.raises(ValueError, match="refine_top_k"):
        build_rcnn(2, quality="iou_net", refine_top_k=0, **TINY)
