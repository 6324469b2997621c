"""Localization-confidence analysis: correlations against hand-computed values, numpy and scipy."""

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from locconf.evaluation import (
    confidence_correlation,
    draw_detections,
    match_to_ground_truth,
    pearson,
    plot_confidence,
    rankdata,
    spearman,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------------------------
# Correlation coefficients
# --------------------------------------------------------------------------------------------


def test_pearson_hand_computed():
    # x = 1..4, y = (2, 4, 5, 4): deviations (-1.5, -.5, .5, 1.5) and (-1.75, .25, 1.25, .25),
    # sum of products 3.5, sums of squares 5 and 4.75
    assert pearson([1, 2, 3, 4], [2, 4, 5, 4]) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_rankdata_average_ties():
    assert rankdata([10.0, 20.0, 20.0, 5.0]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata([3.0, 3.0, 3.0]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata(torch.zeros(0)).numel() == 0


def test_spearman_hand_computed_with_ties():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): deviations (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5),
    # sum of products 4.5, sums of squares 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_perfect_correlation():
    x = torch.linspace(0.5, 1.0, 50, dtype=torch.float64)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, x**5) == pytest.approx(1.0)
    assert pearson(x, x**5) < 0.99  # monotone but not linear
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_undefined_is_nan():
    assert math.isnan(pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]))  # constant (0.1 is inexact in binary)
    assert math.isnan(spearman([1.0, 2.0, 3.0], [0.7, 0.7, 0.7]))
    assert math.isnan(pearson([1.0], [2.0]))
    assert math.isnan(spearman([], []))


def test_bad_input():
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="x must be finite"):
        spearman([1, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="one-dimensional"):
        pearson(torch.zeros(2, 2), torch.zeros(2, 2))


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=3, max_size=30))
def test_against_numpy(pairs):
    x = np.array([p[0] for p in pairs], dtype=np.float64)
    y = np.array([p[1] for p in pairs], dtype=np.float64)
    r = pearson(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert math.isnan(r)
        return
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    # Spearman = Pearson of average ranks; reference ranks by brute force
    def ranks(v):
        return np.array([(v < a).sum() + ((v == a).sum() + 1) / 2 for a in v])

    rho = spearman(x, y)
    rx, ry = ranks(x), ranks(y)
    expected = np.corrcoef(rx, ry)[0, 1] if np.ptp(rx) and np.ptp(ry) else math.nan
    assert rho == pytest.approx(expected, abs=1e-9, nan_ok=True)
    assert -1.0 <= r <= 1.0


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


# --------------------------------------------------------------------------------------------
# Matching and correlation of confidence signals
# --------------------------------------------------------------------------------------------


def _target(image_id, boxes, labels, iscrowd=None):
    t = {"image_id": image_id, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(labels, dtype=torch.int64)}
    if iscrowd is not None:
        t["iscrowd"] = torch.tensor(iscrowd)
    return t


def test_match_same_class_only():
    gt = _target(1, [[0, 0, 10, 10], [0, 0, 10, 20]], [1, 2])
    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50, 60, 60]]),
           "labels": torch.tensor([1, 3, 2])}
    # box 0 is exact for the class-2 object but its class is 1: IoU with the class-1 box is 100/200
    iou = match_to_ground_truth(det, gt)
    assert iou.tolist() == pytest.approx([0.5, 0.0, 0.0])
    # crowd ground truth is not matched
    crowd = _target(1, [[0, 0, 10, 10], [0, 0, 10, 20]], [1, 2], iscrowd=[1, 0])
    assert match_to_ground_truth(det, crowd).tolist() == pytest.approx([0.0, 0.0, 0.0])
    # empty detections, empty ground truth
    assert match_to_ground_truth({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
                                 gt).shape == (0,)
    assert match_to_ground_truth(det, _target(1, [], [])).tolist() == [0.0, 0.0, 0.0]


def test_match_lists_pair_by_image_id():
    gts = [_target(1, [[0, 0, 10, 10]], [1]), _target(2, [[0, 0, 20, 10]], [1])]
    dets = [{"image_id": 2, "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])},
            {"image_id": 1, "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    ious = match_to_ground_truth(dets, gts)
    assert [i.tolist() for i in ious] == [pytest.approx([0.5]), pytest.approx([1.0])]
    with pytest.raises(ValueError, match="image_id 7"):
        match_to_ground_truth([{**dets[0], "image_id": 7}], gts)


def _synthetic_candidates(n_images=4, per_gt=40, seed=0, with_quality=True):
    """Jittered copies of ground-truth boxes; quality is the exact IoU, score is noise."""
    g = torch.Generator().manual_seed(seed)
    cands, gts = [], []
    for i in range(n_images):
        gt = torch.tensor([[20.0, 20.0, 80.0, 90.0], [100.0, 30.0, 160.0, 70.0]])
        boxes = gt.repeat_interleave(per_gt, 0) + torch.randn(2 * per_gt, 4, generator=g) * 6
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = torch.tensor([1, 2]).repeat_interleave(per_gt)
        c = {"image_id": i, "boxes": boxes, "labels": labels,
             "scores": torch.rand(2 * per_gt, generator=g) * 0.5 + 0.5}
        gts.append({"image_id": i, "boxes": gt, "labels": torch.tensor([1, 2])})
        if with_quality:
            c["quality"] = match_to_ground_truth(c, gts[-1])
        cands.append(c)
    return cands, gts


def test_confidence_correlation():
    cands, gts = _synthetic_candidates()
    r = confidence_correlation(cands, gts)
    assert set(r) == {"score", "quality", "combined"}
    true_iou = torch.cat(match_to_ground_truth(cands, gts))
    n = int((true_iou > 0.5).sum())
    assert 0 < n < true_iou.numel() and all(v["n"] == n for v in r.values())
    assert r["quality"]["pearson"] == pytest.approx(1.0) and r["quality"]["spearman"] == pytest.approx(1.0)
    assert abs(r["score"]["pearson"]) < 0.3  # independent noise
    assert r["quality"]["pearson"] > r["combined"]["pearson"] > r["score"]["pearson"]
    # the reference: the definition applied to the matched set by hand
    keep = true_iou > 0.5
    score = torch.cat([c["scores"] for c in cands])[keep].double()
    assert r["score"]["pearson"] == pytest.approx(np.corrcoef(score, true_iou[keep].double())[0, 1])
    # min_iou and min_score shrink the set
    assert confidence_correlation(cands, gts, min_iou=0.7)["score"]["n"] == int((true_iou > 0.7).sum())
    all_scores = torch.cat([c["scores"] for c in cands])
    assert confidence_correlation(cands, gts, min_score=0.75)["score"]["n"] == int(
        ((true_iou > 0.5) & (all_scores >= 0.75)).sum())


def test_missing_quality_is_skipped(caplog):
    cands, gts = _synthetic_candidates(with_quality=False)
    with caplog.at_level(logging.WARNING, logger="locconf.evaluation.matching"):
        r = confidence_correlation(cands, gts)
    assert set(r) == {"score"}
    assert "quality" in caplog.text


def test_constant_signal_and_no_matches():
    cands, gts = _synthetic_candidates(n_images=1)
    cands[0]["scores"] = torch.full_like(cands[0]["scores"], 0.7)
    r = confidence_correlation(cands, gts)
    assert math.isnan(r["score"]["pearson"]) and math.isnan(r["score"]["spearman"]) and r["score"]["n"] > 0
    far = [{**cands[0], "boxes": cands[0]["boxes"] + 500}]
    r = confidence_correlation(far, gts)
    assert r["quality"]["n"] == 0 and math.isnan(r["quality"]["pearson"])
    with pytest.raises(ValueError, match="signals"):
        confidence_correlation(cands, gts, signals=("iou",))
    with pytest.raises(ValueError, match="min_iou"):
        confidence_correlation(cands, gts, min_iou=1.5)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_confidence(tmp_path):
    cands, gts = _synthetic_candidates()
    out = tmp_path / "figs" / "confidence.png"
    r = plot_confidence(cands, gts, out, title="synthetic")
    assert _is_png(out)
    assert r == confidence_correlation(cands, gts)
    # no quality, nothing matched: still a figure, no crash
    bare, _ = _synthetic_candidates(n_images=1, with_quality=False)
    bare[0]["boxes"] = bare[0]["boxes"] + 500
    plot_confidence(bare, gts, tmp_path / "empty.png")
    assert _is_png(tmp_path / "empty.png")


def test_draw_detections(tmp_path):
    image = torch.rand(3, 120, 200)
    det = {"boxes": torch.tensor([[10.0, 10.0, 90.0, 100.0], [100.0, 20.0, 180.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
           "scores": torch.tensor([0.95, 0.6, 0.1]), "labels": torch.tensor([1, 2, 1]),
           "quality": torch.tensor([0.81, 0.42, 0.3])}
    gt = {"boxes": torch.tensor([[12.0, 8.0, 92.0, 98.0]]), "labels": torch.tensor([1])}
    out = draw_detections(image, det, tmp_path / "det.png", gt=gt, class_names=["bg", "tree", "bush"])
    assert _is_png(out)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
    assert _is_png(draw_detections((image * 255).to(torch.uint8), empty, tmp_path / "none.png"))
    with pytest.raises(ValueError, match="image"):
        draw_detections(torch.rand(120, 200), det, tmp_path / "x.png")
    with pytest.raises(ValueError, match="label_threshold"):
        draw_detections(image, det, tmp_path / "x.png", label_threshold=float("nan"))
    with pytest.raises(ValueError, match="max_labels"):
        draw_detections(image, det, tmp_path / "x.png", max_labels=-1)
    assert not (tmp_path / "x.png").exists()
    # the drawing is the image enlarged to 640 px wide (text stays legible), plus a 30 px legend row
    assert Image.open(out).size == (640, 384 + 30)


def _dense(n=2000, seed=0, extent=1900):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * extent
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 30], 1).double()
    return boxes, torch.rand(n, generator=g).double(), torch.randint(1, 4, (n,), generator=g), torch.rand(n).double()


@pytest.mark.parametrize("label_threshold, max_labels", [(0.5, 50), (0.9, 1000), (0.0, 7), (1.5, 50), (0.5, 0)])
def test_draw_detections_labels_never_overlap(label_threshold, max_labels):
    """Whatever the density: labels only on boxes at or above the threshold, the best first, at most
    max_labels, and no two label rectangles overlap (checked pair by pair)."""
    from locconf.evaluation.plots import _place_labels

    boxes, scores, labels, quality = _dense()
    drawn = torch.argsort(scores, descending=True)
    drawn = drawn[scores[drawn] >= 0.3]
    placed = _place_labels(boxes, scores, labels, quality, drawn, str, label_threshold, max_labels, scale=1.0)
    assert len(placed) <= max_labels
    assert all(scores[i] >= label_threshold for i in placed)
    rects = []
    for i, (x, y, text, inside) in placed.items():
        assert (x, y) == tuple(boxes[i, :2].tolist()) and text == f"{int(labels[i])} {scores[i]:.2f} q={quality[i]:.2f}"
        rects.append((x, y - 12 * (not inside), x + len(text) * 5.9 + 2, y + 12 * inside))
    for a in range(len(rects)):
        for b in range(a):
            ra, rb = rects[a], rects[b]
            assert not (ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]), (a, b)
    # greedy by score: a box above the threshold without a label has its label blocked by a better one
    best_first = [int(i) for i in drawn if scores[i] >= label_threshold]
    if max_labels and len(placed) < max_labels:
        assert set(placed) <= set(best_first)
        skipped = [i for i in best_first if i not in placed]
        assert all(any(rects_overlap_label(boxes, scores, labels, quality, s, j, placed) for j in placed)
                   for s in skipped)
    if label_threshold < 1 and max_labels:
        assert placed and max(scores[i] for i in best_first) == max(scores[i] for i in placed)


def rects_overlap_label(boxes, scores, labels, quality, s, j, placed):
    """Whether box s's label rectangle would overlap the placed label of box j (scale 1)."""
    def rect(i):
        text = f"{int(labels[i])} {scores[i]:.2f} q={quality[i]:.2f}"
        x, y = boxes[i, :2].tolist()
        inside = y < 14.0
        return (x, y if inside else y - 12.0, x + len(text) * 5.9 + 2, y + 12.0 if inside else y)
    a, b = rect(s), rect(j)
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_draw_detections_dense(tmp_path):
    """1000 boxes on a 1000 px image are drawn (as one collection) with a legend row."""
    boxes, scores, labels, quality = _dense(n=1000, extent=950)
    dets = {"boxes": boxes, "scores": scores, "labels": labels, "quality": quality}
    out = draw_detections(torch.zeros(3, 1000, 1000), dets, tmp_path / "dense.png", class_names=["bg", "a", "b", "c"])
    assert Image.open(out).size == (1000, 1030)
