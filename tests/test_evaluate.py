"""Evaluation: COCO metrics on hand-built detections whose AP is known by hand.

COCO AP interpolates precision at 101 recall points 0, 0.01, ..., 1 (the precision at recall r is
the best precision at any recall >= r, 0 beyond the highest recall reached); the expected values
below are worked out from that definition, not from the code under test.
"""

import json
import logging

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from locconf.data import CocoDetection, SyntheticScenes, collate_fn, write_synthetic_coco
from locconf.evaluation import METRICS, coco_metrics, collect_candidates, evaluate_methods, format_table, load_coco
from locconf.evaluation.coco import _ap_at_iou
from locconf.models import from_torchvision

# Recall reached at 0.5 with precision 1 (or p) up to it: 51 of the 101 recall points.
HALF = 51 / 101

# COCO category ids are deliberately not the labels: label 1 -> category 7, label 2 -> category 3.
LABEL_TO_CAT = {1: 7, 2: 3}


def _gt_json(tmp_path, images, annotations):
    """Write a COCO ground truth; ``annotations`` are (image_id, category_id, [x, y, w, h])."""
    anns = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (im, c, b) in enumerate(annotations)
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 300, **extra} for i, extra in images],
        "annotations": anns,
        "categories": [{"id": 7, "name": "tree"}, {"id": 3, "name": "bush"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def _cand(image_id, boxes_xywh=(), scores=(), labels=(), quality=None):
    """Candidates of one image from COCO-style (x, y, w, h) boxes."""
    b = torch.tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    out = {"image_id": image_id, "boxes": b, "scores": torch.tensor(scores, dtype=torch.float32),
           "labels": torch.tensor(labels, dtype=torch.int64)}
    if quality is not None:
        out["quality"] = torch.tensor(quality, dtype=torch.float32)
    return out


# Two images, three large (100 x 100 > 96^2) objects in two categories.
GT_BOXES = [(1, 7, [10, 10, 100, 100]), (1, 3, [150, 150, 100, 100]), (2, 7, [50, 20, 100, 100])]


@pytest.fixture()
def gt_path(tmp_path):
    return _gt_json(tmp_path, [(1, {}), (2, {})], GT_BOXES)


def _perfect():
    return [
        _cand(1, [[10, 10, 100, 100], [150, 150, 100, 100]], [0.9, 0.8], [1, 2]),
        _cand(2, [[50, 20, 100, 100]], [0.7], [1]),
    ]


def test_perfect_detections(gt_path):
    r = evaluate_methods(_perfect(), gt_path, ["nms"], LABEL_TO_CAT, progress=False)
    m = r["nms"]
    assert set(m) == set(METRICS) | {"box_precision", "box_recall"}
    for k in ("AP", "AP50", "AP75", "AP90", "APl", "AR100", "box_precision", "box_recall"):
        assert m[k] == pytest.approx(1.0), k
    # no small or medium ground truth: undefined, -1 as COCO says
    assert m["APs"] == -1.0 and m["APm"] == -1.0
    json.dumps(r)  # plain floats
    assert all(type(v) is float for v in m.values())


def test_shifted_boxes_pass_ap75_fail_ap90(gt_path):
    # shifted right by 11 px: IoU = 89 * 100 / (111 * 100) = 0.8018
    c = [
        _cand(1, [[21, 10, 100, 100], [161, 150, 100, 100]], [0.9, 0.8], [1, 2]),
        _cand(2, [[61, 20, 100, 100]], [0.7], [1]),
    ]
    m = evaluate_methods(c, gt_path, ["nms"], LABEL_TO_CAT, progress=False)["nms"]
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["AP90"] == pytest.approx(0.0)
    # true positive at the 7 thresholds 0.50 .. 0.80, missed at 0.85 .. 0.95
    assert m["AP"] == pytest.approx(0.7)
    assert m["AR100"] == pytest.approx(0.7)


def test_half_correct_hand_computed(tmp_path):
    # one category, two objects; a false positive outranks the one true positive, the other object
    # is missed: precision 1/2 at recall 1/2, so AP = 0.5 * 51/101 at every IoU threshold.
    path = _gt_json(tmp_path, [(1, {})], [(1, 7, [10, 10, 100, 100]), (1, 7, [150, 150, 100, 100])])
    c = [_cand(1, [[10, 150, 100, 100], [10, 10, 100, 100]], [0.9, 0.6], [1, 1])]
    m = evaluate_methods(c, path, ["nms"], LABEL_TO_CAT, progress=False)["nms"]
    for k in ("AP", "AP50", "AP75", "AP90"):
        assert m[k] == pytest.approx(0.5 * HALF), k
    assert m["AR100"] == pytest.approx(0.5)


def test_ap90_agrees_with_coco_summary(gt_path):
    """_ap_at_iou reads the same precision array as COCO's own summary (checked at 0.50 and 0.75)."""
    from faster_coco_eval import COCOeval_faster

    c = [
        _cand(1, [[10, 150, 100, 100], [14, 10, 100, 100], [150, 150, 90, 100]], [0.9, 0.6, 0.5], [1, 1, 2]),
        _cand(2, [[50, 20, 100, 80]], [0.7], [1]),
    ]
    gt = load_coco(gt_path)
    dt = gt.loadRes([
        {"image_id": im["image_id"], "category_id": LABEL_TO_CAT[int(lab)],
         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
        for im in c for b, s, lab in zip(im["boxes"].tolist(), im["scores"], im["labels"])
    ])
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert _ap_at_iou(ev, 0.5) == pytest.approx(ev.stats[1])
    assert _ap_at_iou(ev, 0.75) == pytest.approx(ev.stats[2])
    assert 0.0 < _ap_at_iou(ev, 0.5)
    with pytest.raises(ValueError, match="iou"):
        _ap_at_iou(ev, 0.92)
    assert coco_metrics(gt, dt, [1, 2])["AP50"] == pytest.approx(ev.stats[1])


def test_per_site_and_images_without_gt_or_detections(tmp_path):
    images = [(1, {"site": "A"}), (2, {"site": "B"}), (3, {"site": "C"}), (4, {"site": "C"}), (5, {})]
    path = _gt_json(tmp_path, images, [(1, 7, [10, 10, 100, 100]), (2, 7, [10, 10, 100, 100])])
    c = [
        _cand(1, [[10, 10, 100, 100]], [0.9], [1]),  # A: found
        _cand(2),  # B: missed (no candidates at all)
        _cand(3, [[10, 10, 100, 100]], [0.5], [1]),  # C: no ground truth, a false positive
        _cand(4),  # C: no ground truth, no candidates
        _cand(5),  # no site
    ]
    r = evaluate_methods(c, path, ["nms"], LABEL_TO_CAT, progress=False)["nms"]
    # overall: TP (0.9), FP (0.5), one object missed -> precision 1 up to recall 1/2
    assert r["AP50"] == pytest.approx(HALF)
    assert set(r["sites"]) == {"A", "B", "C"}
    assert r["sites"]["A"]["AP"] == pytest.approx(1.0)
    assert r["sites"]["B"]["AP"] == pytest.approx(0.0)
    assert r["sites"]["C"]["AP"] == -1.0  # no ground truth: undefined
    assert "sites" not in evaluate_methods(c, path, ["nms"], LABEL_TO_CAT, per_site=False, progress=False)["nms"]
    table = format_table({"nms": r}, per_site=True)
    assert "| nms [A] | 100.0 |" in table and "| nms [C] | - |" in table
    json.dumps(r)


def test_all_images_empty(gt_path):
    c = [_cand(1), _cand(2)]
    m = evaluate_methods(c, gt_path, ["nms", "soft-gaussian"], LABEL_TO_CAT, progress=False)
    assert m["nms"]["AP"] == 0.0 and m["soft-gaussian"]["AR100"] == 0.0


def test_methods_differ_on_duplicates(tmp_path):
    # Two objects. A duplicate of the first (IoU 0.55 with it) outranks the second object's box.
    # nms (IoU > 0.5) removes it: AP50 = 1. Linear Soft-NMS decays it to 0.85 * 0.45 = 0.38 > 0.3,
    # a false positive ranked before the second true positive: precision 1 up to recall 1/2, then
    # 2/3 up to recall 1: AP50 = (51 * 1 + 50 * 2/3) / 101.
    path = _gt_json(tmp_path, [(1, {})], [(1, 7, [0, 0, 100, 100]), (1, 7, [200, 200, 80, 80])])
    s = 100 * 0.45 / 1.55  # x-shift with IoU (100 - s) / (100 + s) = 0.55
    c = [_cand(1, [[0, 0, 100, 100], [s, 0, 100, 100], [200, 200, 80, 80]], [0.9, 0.85, 0.3], [1, 1, 1])]
    r = evaluate_methods(c, path, ["nms", "soft-linear"], LABEL_TO_CAT, progress=False)
    assert r["nms"]["AP50"] == pytest.approx(1.0)
    assert r["soft-linear"]["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # method parameters reach postprocess: with a threshold above 0.55, nms keeps the duplicate too
    r2 = evaluate_methods(c, path, ["nms"], LABEL_TO_CAT, method_params={"nms": {"iou_threshold": 0.6}},
                          progress=False)
    assert r2["nms"]["AP50"] == pytest.approx(r["soft-linear"]["AP50"])


def test_quality_ranking_changes_result(tmp_path):
    # Two boxes on one object: the better-scored one is poorly localized (IoU 0.8), the other exact.
    # nms keeps the first (AP90 = 0); quality ranking keeps the exact one (AP90 = 1).
    path = _gt_json(tmp_path, [(1, {})], [(1, 7, [0, 0, 100, 100])])
    c = [_cand(1, [[11, 0, 100, 100], [0, 0, 100, 100]], [0.9, 0.8], [1, 1], quality=[0.5, 0.99])]
    r = evaluate_methods(c, path, ["nms", "quality", "iou-guided"], LABEL_TO_CAT, progress=False)
    assert r["nms"]["AP90"] == 0.0
    assert r["quality"]["AP90"] == pytest.approx(1.0)
    assert r["iou-guided"]["AP90"] == pytest.approx(1.0)


def test_missing_signal_is_skipped(gt_path, caplog):
    with caplog.at_level(logging.WARNING, logger="locconf.evaluation.coco"):
        r = evaluate_methods(_perfect(), gt_path, ["nms", "quality", "var-voting"], LABEL_TO_CAT, progress=False)
    assert list(r) == ["nms"]
    assert "quality" in caplog.text and "var-voting" in caplog.text and "variances" in caplog.text


def test_bad_input(gt_path):
    c = _perfect()
    with pytest.raises(ValueError, match="methods"):
        evaluate_methods(c, gt_path, ["nmss"], LABEL_TO_CAT, progress=False)
    with pytest.raises(ValueError, match="candidates"):
        evaluate_methods([], gt_path, ["nms"], LABEL_TO_CAT, progress=False)
    with pytest.raises(ValueError, match="image_id 99"):
        evaluate_methods([_cand(99)], gt_path, ["nms"], LABEL_TO_CAT, progress=False)
    with pytest.raises(ValueError, match="label_to_cat_id"):
        evaluate_methods(c, gt_path, ["nms"], {1: 7}, progress=False)  # label 2 unmapped
    with pytest.raises(ValueError, match="label_to_cat_id"):
        evaluate_methods(c, gt_path, ["nms"], {1: 7, 2: 42}, progress=False)
    with pytest.raises(ValueError, match="method_params"):
        evaluate_methods(c, gt_path, ["nms"], LABEL_TO_CAT, method_params={"soft-linear": {}}, progress=False)
    with pytest.raises(ValueError, match="coco_gt"):
        evaluate_methods(c, 3, ["nms"], LABEL_TO_CAT, progress=False)


def test_quiet(gt_path, capsys):
    evaluate_methods(_perfect(), gt_path, ["nms"], LABEL_TO_CAT, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_format_table():
    results = {"nms": {"AP": 0.5, "AP90": -1.0}, "quality": {"AP": 0.523456, "AP90": 0.25}}
    table = format_table(results, columns=["AP", "AP90"]).splitlines()
    assert table[0] == "| method | AP | AP90 |"
    assert table[2] == "| nms | 50.0 | - |"
    assert table[3] == "| quality | 52.3 | 25.0 |"
    assert format_table(results, columns=["AP"], percent=False, digits=3).splitlines()[3] == "| quality | 0.523 |"
    with pytest.raises(ValueError, match="columns"):
        format_table(results, columns=["AP42"])


# --------------------------------------------------------------------------------------------
# collect_candidates
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    ds = SyntheticScenes(num_images=3, image_size=64, num_classes=2, max_objects=3, min_size=12, max_size=40)
    path = write_synthetic_coco(ds, out, split="val", progress=False)
    return CocoDetection(out, path), path


class _RawDetector(nn.Module):
    """A stand-in locconf detector: returns raw candidates with quality, checks eval mode and no_grad."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = []

    def candidates(self, images):
        self.calls.append((self.training, torch.is_grad_enabled()))
        outs = []
        for img in images:
            h, w = img.shape[-2:]
            boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2], [1.0, 1.0, w / 2, h / 2], [w / 2, h / 2, w, h]])
            outs.append({"boxes": boxes * self.w, "scores": torch.tensor([0.9, 0.8, 0.3]),
                         "labels": torch.tensor([1, 1, 2]), "quality": torch.tensor([0.5, 0.6, 0.7])})
        return outs


def test_collect_candidates_raw_detector(synthetic):
    ds, path = synthetic
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    model = _RawDetector().train()
    cands = collect_candidates(model, loader, "cpu", progress=False)
    assert model.training  # restored
    assert model.calls == [(False, False), (False, False)]
    assert [c["image_id"] for c in cands] == ds.image_ids
    c = cands[0]
    assert set(c) == {"boxes", "scores", "labels", "quality", "image_id"}
    assert not c["boxes"].requires_grad and c["boxes"].device.type == "cpu"
    r = evaluate_methods(cands, path, ["nms", "quality", "iou-guided"], ds.label_to_cat_id, progress=False)
    assert set(r) == {"nms", "quality", "iou-guided"}


def test_collect_candidates_torchvision_fasterrcnn(synthetic):
    ds, path = synthetic
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    model = FasterRCNN(
        backbone, num_classes=ds.num_classes + 1, min_size=64, max_size=64,
        rpn_anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_score_thresh=0.0, representation_size=32,
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    with pytest.raises(ValueError, match="from_torchvision"):  # torchvision's own output is post-NMS
        collect_candidates(model, loader, torch.device("cpu"), progress=False)
    cands = collect_candidates(from_torchvision(model), loader, torch.device("cpu"), progress=False)
    assert len(cands) == len(ds)
    assert {"boxes", "scores", "labels", "image_id"} <= set(cands[0])
    r = evaluate_methods(cands, path, ["nms", "soft-gaussian", "quality"], ds.label_to_cat_id, progress=False)
    assert set(r) == {"nms", "soft-gaussian"}  # no quality from torchvision: skipped
    assert 0.0 <= r["nms"]["AP50"] <= 1.0


def test_collect_candidates_bad_loader():
    with pytest.raises(ValueError, match="image_id"):
        collect_candidates(_RawDetector(), [([torch.zeros(3, 8, 8)], [{}])], "cpu", progress=False)
    with pytest.raises(ValueError, match="batches"):
        collect_candidates(_RawDetector(), [torch.zeros(3, 8, 8)], "cpu", progress=False)
