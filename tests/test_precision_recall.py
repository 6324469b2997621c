"""DeepForest's box precision and recall (`locconf.evaluation.precision_recall`).

References: a brute force written here (every one-to-one assignment of predictions to ground
truths, the one of greatest total intersection area kept, as DeepForest's Hungarian matching
chooses), SciPy's dense `linear_sum_assignment` on the truth x prediction matrix of intersection
areas (what DeepForest calls), and hand-computed cases.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from locconf.evaluation import box_precision_recall, evaluate_methods, format_table, match_one_to_one


def _inter(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    i = _inter(a, b)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i
    return i / union if union > 0 else 0.0


def brute_force_tp(det: np.ndarray, gt: np.ndarray, thr: float) -> tuple[float, int]:
    """(best total intersection, true positives of that assignment) over every one-to-one assignment."""
    n, m = len(det), len(gt)
    best, best_tp = -1.0, 0
    k = min(n, m)
    for dets in itertools.permutations(range(n), k):
        for gts in itertools.combinations(range(m), k):
            total = sum(_inter(det[d], gt[g]) for d, g in zip(dets, gts))
            if total > best + 1e-9:
                tp = sum(_iou(det[d], gt[g]) > thr for d, g in zip(dets, gts))
                best, best_tp = total, tp
    return max(best, 0.0), best_tp


def _boxes(rng, n):
    xy = rng.uniform(0, 40, (n, 2))
    wh = rng.uniform(1, 20, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def _tp(det: np.ndarray, gt: np.ndarray, thr: float) -> tuple[float, int]:
    matched, iou = match_one_to_one(torch.tensor(det).reshape(-1, 4), torch.tensor(gt).reshape(-1, 4))
    total = sum(_inter(det[j], gt[int(matched[j])]) for j in range(len(det)) if matched[j] >= 0)
    assigned = matched[matched >= 0].tolist()
    assert len(set(assigned)) == len(assigned)  # one to one
    for j in range(len(det)):
        if matched[j] >= 0:
            assert float(iou[j]) == pytest.approx(_iou(det[j], gt[int(matched[j])]), abs=1e-12)
        else:
            assert float(iou[j]) == 0.0
    return total, int(((matched >= 0) & (iou > thr)).sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.2, 0.4, 0.6]))
def test_matching_is_the_brute_force_assignment_of_greatest_intersection(n, m, seed, thr):
    rng = np.random.default_rng(seed)
    det, gt = _boxes(rng, n), _boxes(rng, m)
    total, tp = _tp(det, gt, thr)
    best, best_tp = brute_force_tp(det, gt, thr)
    assert total == pytest.approx(best, abs=1e-9)
    assert tp == best_tp


def test_matching_equals_deepforests_dense_hungarian_on_larger_images():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, m = rng.integers(0, 60, 2)
        det, gt = _boxes(rng, n), _boxes(rng, m)
        total, tp = _tp(det, gt, 0.4)
        inter = np.array([[_inter(g, d) for d in det] for g in gt]).reshape(m, n)
        if n and m:
            r, c = linear_sum_assignment(inter, maximize=True)
            ref_total = inter[r, c].sum()
            ref_tp = sum(_iou(det[j], gt[i]) > 0.4 for i, j in zip(r, c))
        else:
            ref_total, ref_tp = 0.0, 0
        assert total == pytest.approx(ref_total, abs=1e-9) and tp == ref_tp


def test_greatest_intersection_not_greedy_by_iou():
    # one truth, two predictions: p0 overlaps more (IoU 0.45), p1 has the larger intersection but a
    # lower IoU (it is much bigger): DeepForest's matching takes p1, so no true positive at 0.4.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    det = torch.tensor([[0.0, 0.0, 10.0, 4.5], [0.0, 0.0, 20.0, 20.0]])
    matched, iou = match_one_to_one(det, gt)
    assert matched.tolist() == [-1, 0]
    assert iou.tolist() == pytest.approx([0.0, 0.25])


def test_hand_computed_precision_recall_per_image_site_and_overall():
    sq = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]]
    t = lambda boxes, site, image_id, crowd=None: {  # noqa: E731
        "boxes": torch.tensor(boxes).reshape(-1, 4), "site": site, "image_id": image_id,
        **({"iscrowd": torch.tensor(crowd)} if crowd is not None else {})}
    d = lambda boxes, scores: {"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.tensor(scores)}  # noqa: E731
    targets = [t(sq, "A", 1), t(sq[:2], "A", 2), t([], "B", 3), t(sq[:1], "B", 4), t(sq, "B", 5, [0, 0, 1])]
    dets = [
        d([sq[0], [20.0, 0.0, 30.0, 5.0], [60.0, 0, 70, 10]], [0.9, 0.8, 0.7]),  # TP, IoU 0.5 > 0.4 TP, FP
        d([sq[1], sq[0]], [0.9, 0.05]),  # TP; the second is below the score threshold
        d([sq[0]], [0.9]),  # no objects: this image counts in neither mean
        d([], []),  # recall 0, precision undefined
        d([sq[2]], [0.9]),  # matches only the crowd box, left out: FP; 2 objects
    ]
    r = box_precision_recall(dets, targets)
    per = {im["image_id"]: im for im in r["images"]}
    assert (per[1]["tp"], per[1]["predictions"], per[1]["objects"]) == (2, 3, 3)
    assert per[2]["precision"] == 1.0 and per[2]["recall"] == 0.5
    assert per[3]["objects"] == 0 and per[3]["recall"] == -1 and per[3]["precision"] == 0.0
    assert per[4]["precision"] == -1 and per[4]["recall"] == 0
    assert (per[5]["tp"], per[5]["predictions"], per[5]["objects"]) == (0, 1, 2)
    # recall: mean over images 1, 2, 4, 5; precision: over 1, 2, 5 (image 4 has no predictions)
    assert r["box_recall"] == pytest.approx((2 / 3 + 0.5 + 0 + 0) / 4)
    assert r["box_precision"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["sites"]["A"]["box_recall"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert r["sites"]["B"]["box_precision"] == pytest.approx(0.0) and r["sites"]["B"]["box_recall"] == 0.0
    assert (r["tp"], r["objects"]) == (3, 8)
    strict = box_precision_recall(dets, targets, iou_threshold=0.5)  # IoU 0.5 is not > 0.5
    assert strict["images"][0]["tp"] == 1
    json.dumps(r)
    assert box_precision_recall([], [])["box_recall"] == -1


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="iou_threshold must be a number in"):
        box_precision_recall([], [], iou_threshold=1.5)
    with pytest.raises(ValueError, match="same length"):
        box_precision_recall([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}], [])
    with pytest.raises(ValueError, match=r"targets\[0\] must be a dict with boxes"):
        box_precision_recall([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}], [{}])


def test_evaluate_methods_reports_them_per_method_site_and_image(tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100, "site": "A"},
                     {"id": 2, "file_name": "b.png", "width": 100, "height": 100, "site": "B"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10]},
                          {"id": 2, "image_id": 2, "category_id": 5, "bbox": [50, 50, 20, 20]}],
          "categories": [{"id": 5, "name": "tree"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    cands = [{"image_id": 1, "boxes": torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [60, 60, 90, 90]]),
              "scores": torch.tensor([0.9, 0.8, 0.05]), "labels": torch.tensor([1, 1, 1])},
             {"image_id": 2, "boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}]
    r = evaluate_methods(cands, path, ["nms", "soft-linear"], {1: 5}, progress=False, per_image=True)
    # nms: image 1 keeps its first box (the second overlaps it at IoU 0.95) and the 0.05 box, which is
    # below the score threshold of the P/R: 1 TP of 1; image 2: 1 FP, its object missed.
    assert r["nms"]["box_recall"] == pytest.approx(0.5) and r["nms"]["box_precision"] == pytest.approx(0.5)
    assert r["nms"]["sites"]["A"]["box_precision"] == 1.0 and r["nms"]["sites"]["B"]["box_recall"] == 0.0
    assert [im["tp"] for im in r["nms"]["images"]] == [1, 0]
    # soft-linear keeps the overlapping box at a decayed score (0.8 * (1 - 0.95) < 0.1): same numbers
    assert r["soft-linear"]["box_precision"] == pytest.approx(0.5)
    loose = evaluate_methods(cands, path, ["nms"], {1: 5}, progress=False, pr_score_threshold=0.0)
    assert loose["nms"]["box_precision"] == pytest.approx((1 / 2 + 0) / 2) and "images" not in loose["nms"]
    table = format_table(r)
    assert "| box_precision | box_recall |" in table and table.splitlines()[2].endswith("| 50.0 | 50.0 |")
    with pytest.raises(ValueError, match="iou_threshold"):
        evaluate_methods(cands, path, ["nms"], {1: 5}, progress=False, pr_iou_threshold=-1)


def test_locconf_eval_writes_them_to_results_and_table(tmp_path):
    from locconf.experiment import build_model, load_config, run_eval

    torch.manual_seed(0)
    cfg_text = f"""
model: {{arch: rcnn, num_classes: 2, backbone: resnet18, fpn_channels: 16, min_size: 64, max_size: 64,
        candidates_per_image: 50}}
data: {{source: synthetic, root: {tmp_path / 'data'}, synthetic: {{num_train: 1, num_val: 2, image_size: 64,
       num_classes: 2}}}}
eval: {{methods: [nms], pr_iou_threshold: 0.3}}
"""
    (tmp_path / "cfg.yaml").write_text(cfg_text)
    cfg = load_config(tmp_path / "cfg.yaml")
    model = build_model(**cfg["model"]).eval()
    report = run_eval(model, cfg, tmp_path / "ev", device="cpu", progress=False)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    nms = saved["methods"]["nms"]
    assert {"box_precision", "box_recall"} <= set(nms) and "images" not in nms
    images = saved["box_precision_recall_images"]["nms"]
    assert [im["image_id"] for im in images] == [1, 2] and all("recall" in im for im in images)
    with_objects = [im["recall"] for im in images if im["objects"]]
    assert nms["box_recall"] == pytest.approx(sum(with_objects) / len(with_objects))
    assert "box_precision | box_recall |" in (tmp_path / "ev" / "table.md").read_text()
    assert "box_recall" in report["table"]
