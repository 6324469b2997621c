"""Localization-aware box fusion (locconf.fusion.fuse) against independent references.

* Weighted by score, it is weighted boxes fusion: compared with ensemble-boxes'
  ``weighted_boxes_fusion``. The installed wheel ships neither tests nor its README, so the vectors
  are the two-model example of the project's README as we remember it (two models, weights 2 and 1,
  IoU 0.5, skip 0.0001; whether every digit matches the original does not matter, ensemble-boxes
  itself is run on it), and random scenes in [0, 1], where its input rules hold.
* Every weighting is compared with a plain one-box-at-a-time reference written here (every
  cluster scanned for every box, the documented formulas), on pixel scenes with boxes from 1 to
  600 px, degenerate boxes, several classes and IoU thresholds on both sides of 0.5 (the fast
  path lists clusters by their centre region above 0.5, by their hull below).
* Quality and variance weighting on hand-computed cases.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from locconf.fusion import CONF_TYPES, fuse

# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _coordinate_weights(member, weight):
    if weight == "score":
        return [member["s"] * member["w"]] * 4
    if weight == "quality":
        return [min(max(member["q"], 0.0), 1.0) * member["w"]] * 4
    return [member["w"] / v for v in member["v"]]


def _normalised(members, weight):
    """a[i][k]: member i's share of coordinate k of the fused box."""
    cw = [_coordinate_weights(m, weight) for m in members]
    out = []
    for k in range(4):
        total = sum(c[k] for c in cw)
        out.append([c[k] / total if total > 0 else 1.0 / len(members) for c in cw])
    return [[out[k][i] for k in range(4)] for i in range(len(members))]


def _fused_box(members, weight):
    a = _normalised(members, weight)
    return [sum(a[i][k] * m["box"][k] for i, m in enumerate(members)) for k in range(4)]


def reference_fuse(lists, weight="score", iou_threshold=0.55, skip_box_threshold=0.0, model_weights=None,
                   conf_type="avg", allows_overflow=False):
    """One box at a time, every cluster of its class scanned; plain Python floats."""
    m_count = len(lists)
    W = list(model_weights) if model_weights is not None else [1.0] * m_count
    items = []
    for m, c in enumerate(lists):
        for i in range(c["boxes"].shape[0]):
            s = float(c["scores"][i])
            if s < skip_box_threshold:
                continue
            items.append({"m": m, "i": i, "label": int(c["labels"][i]), "box": c["boxes"][i].tolist(), "s": s,
                          "w": W[m], "q": float(c["quality"][i]) if "quality" in c else None,
                          "v": c["variances"][i].tolist() if "variances" in c else None})
    items.sort(key=lambda t: (t["label"], -t["s"] * t["w"], t["m"], t["i"]))
    clusters = []
    for it in items:
        best, best_iou = None, -1.0
        for ci, members in enumerate(clusters):
            if members[0]["label"] != it["label"]:
                continue
            iou = _iou(_fused_box(members, weight), it["box"])
            if iou > best_iou:
                best, best_iou = ci, iou
        if best is not None and best_iou > iou_threshold:
            clusters[best].append(it)
        else:
            clusters.append([it])
    rows = []
    for members in clusters:
        n = len(members)
        sw = [t["s"] * t["w"] for t in members]
        present = {t["m"] for t in members}
        w_present = sum(W[m] for m in present)
        sum_w = sum(t["w"] for t in members)
        if conf_type == "avg":
            score = sum(sw) / n * (n if allows_overflow else min(n, m_count)) / sum(W)
        elif conf_type == "max":
            score = max(sw) / max(W)
        elif conf_type == "box_and_model_avg":
            score = sum(sw) / sum_w * w_present / sum(W)
        else:
            score = sum(sw) / (sum_w + sum(W) - w_present)
        row = {"box": _fused_box(members, weight), "score": score, "label": members[0]["label"]}
        if members[0]["q"] is not None:
            row["quality"] = sum(t["w"] * t["q"] for t in members) / sum_w
        if members[0]["v"] is not None:
            a = _normalised(members, weight)
            row["variances"] = [sum(a[i][k] ** 2 * t["v"][k] for i, t in enumerate(members)) for k in range(4)]
        rows.append(row)
    rows.sort(key=lambda r: -r["score"])  # stable: ties stay in creation order
    return rows


def _assert_matches_reference(out, rows, tol=1e-9):
    assert out["boxes"].shape[0] == len(rows)
    if not rows:
        return
    torch.testing.assert_close(out["boxes"].double(), torch.tensor([r["box"] for r in rows], dtype=torch.float64),
                               atol=tol, rtol=tol)
    torch.testing.assert_close(out["scores"].double(), torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                               atol=tol, rtol=tol)
    assert out["labels"].tolist() == [r["label"] for r in rows]
    if "quality" in rows[0]:
        torch.testing.assert_close(out["quality"].double(), torch.tensor([r["quality"] for r in rows], dtype=torch.float64),
                                   atol=tol, rtol=tol)
    if "variances" in rows[0]:
        torch.testing.assert_close(out["variances"].double(), torch.tensor([r["variances"] for r in rows], dtype=torch.float64),
                                   atol=tol, rtol=tol)


def _scene(seed, models=3, per_model=60, num_labels=3, size=1000.0, offset=0.0, degenerate=True):
    """Candidates of ``models`` detectors around shared objects, boxes from ~1 to ~600 px."""
    g = torch.Generator().manual_seed(seed)
    n_obj = max(1, per_model // 6)
    ctr = torch.rand(n_obj, 2, generator=g) * size
    wh = torch.exp(torch.rand(n_obj, 2, generator=g) * math.log(600.0))  # 1 .. 600 px
    lists = []
    for _ in range(models):
        obj = torch.randint(0, n_obj, (per_model,), generator=g)
        c = ctr[obj] + torch.randn(per_model, 2, generator=g, dtype=torch.float32) * wh[obj] * 0.12
        s = wh[obj] * torch.exp(torch.randn(per_model, 2, generator=g) * 0.12)
        boxes = torch.cat([c - s / 2, c + s / 2], 1).double() + offset
        if degenerate:
            boxes[: per_model // 20, 2] = boxes[: per_model // 20, 0]  # zero width
        labels = torch.tensor([-1, 5, 7, 1000])[torch.randint(0, num_labels, (per_model,), generator=g)]
        lists.append({"boxes": boxes, "scores": torch.rand(per_model, generator=g, dtype=torch.float64),
                      "labels": labels, "quality": torch.rand(per_model, generator=g, dtype=torch.float64) * 1.2 - 0.1,
                      "variances": 0.1 + torch.rand(per_model, 4, generator=g, dtype=torch.float64) * 50})
    return lists


# --------------------------------------------------------------------------------------------
# Against ensemble-boxes (weight="score")
# --------------------------------------------------------------------------------------------

# The two-model example of ensemble-boxes' README (as remembered): coordinates in [0, 1].
README_BOXES = [
    [[0.00, 0.51, 0.81, 0.91], [0.10, 0.31, 0.71, 0.61], [0.01, 0.32, 0.83, 0.93], [0.02, 0.53, 0.11, 0.94],
     [0.03, 0.24, 0.12, 0.35]],
    [[0.04, 0.56, 0.84, 0.92], [0.12, 0.33, 0.72, 0.64], [0.38, 0.66, 0.79, 0.95], [0.08, 0.49, 0.21, 0.89]],
]
README_SCORES = [[0.9, 0.8, 0.2, 0.4, 0.7], [0.5, 0.8, 0.7, 0.3]]
README_LABELS = [[0, 1, 0, 1, 1], [1, 1, 1, 0]]


def _lists(boxes, scores, labels, dtype=torch.float64):
    return [{"boxes": torch.tensor(b, dtype=dtype), "scores": torch.tensor(s, dtype=dtype), "labels": torch.tensor(l)}
            for b, s, l in zip(boxes, scores, labels)]


def _assert_same_set(out, eb_boxes, eb_scores, eb_labels, tol=1e-6):
    """Each ensemble-boxes row matches one of ours (same label, boxes and score within tol)."""
    assert out["boxes"].shape[0] == len(eb_boxes)
    ours = torch.cat([out["boxes"].double(), out["scores"].double()[:, None]], 1).numpy()
    used = np.zeros(len(ours), dtype=bool)
    for b, s, l in zip(eb_boxes, eb_scores, eb_labels):
        diff = np.abs(ours - np.r_[b, s]).max(1)
        diff[(out["labels"].numpy() != int(l)) | used] = np.inf
        j = int(diff.argmin())
        assert diff[j] < tol, (b, s, l, diff[j])
        used[j] = True


@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.parametrize("allows_overflow", [False, True])
def test_readme_example_matches_ensemble_boxes(conf_type, allows_overflow):
    eb = pytest.importorskip("ensemble_boxes")
    kwargs = dict(iou_thr=0.5, skip_box_thr=0.0001, conf_type=conf_type, allows_overflow=allows_overflow)
    eb_out = eb.weighted_boxes_fusion(README_BOXES, README_SCORES, README_LABELS, weights=[2, 1], **kwargs)
    out = fuse(_lists(README_BOXES, README_SCORES, README_LABELS), model_weights=[2, 1], iou_threshold=0.5,
               skip_box_threshold=0.0001, conf_type=conf_type, allows_overflow=allows_overflow)
    _assert_same_set(out, *eb_out)
    # and the output order is the same: by decreasing score
    torch.testing.assert_close(out["scores"].double(), torch.tensor(eb_out[1], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(12))
def test_random_scenes_match_ensemble_boxes(seed):
    eb = pytest.importorskip("ensemble_boxes")
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 5))
    lists = _scene(seed, models=m, per_model=int(rng.integers(1, 150)), num_labels=int(rng.integers(1, 4)),
                   size=1.0, degenerate=False)
    for c in lists:  # ensemble-boxes' input rules: inside [0, 1] (it clips otherwise), positive area
        b = c["boxes"] / 1.7 + 0.2
        c["boxes"] = torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1e-3)], 1).clamp(0, 1)
    model_weights = (rng.random(m) + 0.5).tolist() if seed % 2 else None
    thr = float(rng.choice([0.3, 0.5, 0.55, 0.7]))
    skip = float(rng.choice([0.0, 0.3]))
    conf_type = CONF_TYPES[seed % 4]
    overflow = seed % 3 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eb_out = eb.weighted_boxes_fusion([c["boxes"].numpy() for c in lists], [c["scores"].numpy() for c in lists],
                                          [c["labels"].numpy() for c in lists], weights=model_weights, iou_thr=thr,
                                          skip_box_thr=skip, conf_type=conf_type, allows_overflow=overflow)
    out = fuse(lists, model_weights=model_weights, iou_threshold=thr, skip_box_threshold=skip, conf_type=conf_type,
               allows_overflow=overflow)
    _assert_same_set(out, *eb_out)


# --------------------------------------------------------------------------------------------
# Against the one-box-at-a-time reference, every weighting, in pixels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["score", "quality", "variance"])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.5, 0.55, 0.8])
def test_matches_reference(weight, iou_threshold):
    for seed in range(3):
        lists = _scene(100 + seed, models=3, per_model=80, num_labels=1 + seed)
        kwargs = dict(weight=weight, iou_threshold=iou_threshold, model_weights=[1.0, 2.5, 0.5])
        _assert_matches_reference(fuse(lists, **kwargs), reference_fuse(lists, **kwargs))


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_conf_types_match_reference(conf_type):
    lists = _scene(7, models=4, per_model=50, num_labels=2)
    for overflow in (False, True):
        kwargs = dict(weight="quality", conf_type=conf_type, allows_overflow=overflow, skip_box_threshold=0.2,
                      model_weights=[1, 3, 2, 0.5])
        _assert_matches_reference(fuse(lists, **kwargs), reference_fuse(lists, **kwargs))


def test_far_from_origin_and_tiny_units():
    """The grid follows the boxes: coordinates near 1e5, and boxes of a thousandth of a unit."""
    for lists in (_scene(3, offset=1e5), [dict(c, boxes=c["boxes"] * 1e-6) for c in _scene(4)]):
        for thr in (0.3, 0.6):
            _assert_matches_reference(fuse(lists, weight="variance", iou_threshold=thr),
                                      reference_fuse(lists, weight="variance", iou_threshold=thr), tol=1e-7)


def test_identical_and_nested_boxes():
    """Many copies of one box fuse into one; a huge box among small ones, and points, too."""
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    lists = [{"boxes": box.repeat(5, 1), "scores": torch.linspace(0.1, 0.9, 5, dtype=torch.float32),
              "labels": torch.zeros(5, dtype=torch.int64)} for _ in range(3)]
    out = fuse(lists)
    assert out["boxes"].shape == (1, 4) and out["boxes"].dtype == torch.float32
    torch.testing.assert_close(out["boxes"], box)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 900
    small = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 10], 1)
    points = torch.cat([xy[:20], xy[:20]], 1)
    big = torch.tensor([[0.0, 0.0, 1000.0, 1000.0], [1.0, 1.0, 999.0, 999.0]])
    boxes = torch.cat([small, points, big]).double()
    lists = [{"boxes": boxes, "scores": torch.rand(len(boxes), generator=g, dtype=torch.float64),
              "labels": torch.zeros(len(boxes), dtype=torch.int64)}]
    for thr in (0.2, 0.55):
        _assert_matches_reference(fuse(lists, iou_threshold=thr), reference_fuse(lists, iou_threshold=thr))


# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------


def _two_boxes():
    # A and B overlap with IoU 80 / 120 = 2/3.
    a = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]),
         "labels": torch.tensor([1]), "quality": torch.tensor([0.5]), "variances": torch.tensor([[1.0, 1, 1, 1]])}
    b = {"boxes": torch.tensor([[2.0, 0.0, 12.0, 10.0]]), "scores": torch.tensor([0.6]),
         "labels": torch.tensor([1]), "quality": torch.tensor([1.0]), "variances": torch.tensor([[4.0, 1, 1, 1]])}
    return [a, b]


def test_hand_computed_score_weighting():
    out = fuse(_two_boxes(), weight="score")
    # weights 0.9 and 0.6: x1 = (0 * 0.9 + 2 * 0.6) / 1.5 = 0.8, x2 = (10 * 0.9 + 12 * 0.6) / 1.5 = 10.8
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.8, 0.0, 10.8, 10.0]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.75]))  # (0.9 + 0.6) / 2 * min(2, 2) / 2
    torch.testing.assert_close(out["quality"], torch.tensor([0.75]))  # (0.5 + 1.0) / 2
    # variance of a mean with shares 0.6 / 0.4: 0.36 * 1 + 0.16 * 4 = 1.0 for x1, 0.36 + 0.16 = 0.52 elsewhere
    torch.testing.assert_close(out["variances"], torch.tensor([[1.0, 0.52, 0.52, 0.52]]))


def test_hand_computed_quality_weighting():
    out = fuse(_two_boxes(), weight="quality")
    # weights 0.5 and 1.0: x1 = 2 / 1.5 = 4/3, x2 = (5 + 12) / 1.5 = 34/3; the score does not change
    torch.testing.assert_close(out["boxes"], torch.tensor([[4 / 3, 0.0, 34 / 3, 10.0]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.75]))
    torch.testing.assert_close(out["quality"], torch.tensor([0.75]))
    # shares 1/3 and 2/3: 1/9 * 1 + 4/9 * 4 = 17/9 for x1, 1/9 + 4/9 = 5/9 elsewhere
    torch.testing.assert_close(out["variances"], torch.tensor([[17 / 9, 5 / 9, 5 / 9, 5 / 9]]))


def test_hand_computed_variance_weighting():
    out = fuse(_two_boxes(), weight="variance")
    # x1: weights 1/1 and 1/4: (0 + 2/4) / 1.25 = 0.4; x2: equal variances: (10 + 12) / 2 = 11
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.4, 0.0, 11.0, 10.0]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.75]))
    # product of Gaussians: 1 / (1 + 1/4) = 0.8 for x1, 1 / (1 + 1) = 0.5 elsewhere
    torch.testing.assert_close(out["variances"], torch.tensor([[0.8, 0.5, 0.5, 0.5]]))
    # a model weight of 2 counts as two observations: x1 = (2 * 0 + 2/4) / (2 + 1/4) = 2/9
    out = fuse(_two_boxes(), weight="variance", model_weights=[2, 1])
    assert out["boxes"][0, 0].item() == pytest.approx(2 / 9)


def test_weighting_changes_the_clusters():
    """The fused box moves with the weights, and so does what joins it.

    A (score 0.9, quality 0.1) = [0, 10], B (0.8, 0.9) = [4, 14], C (0.7, 0.5) = [7, 17] in x, all
    10 high; threshold 0.4. B joins A (IoU 60/140 = 0.43). By score the fused box is
    [1.88, 11.88]: C overlaps it by 48.8 / 151.2 = 0.32 and starts a cluster. By quality it is
    [3.6, 13.6]: C overlaps it by 66 / 134 = 0.49 and joins.
    """
    lists = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10], [7.0, 0, 17, 10]], dtype=torch.float64),
              "scores": torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64), "labels": torch.zeros(3, dtype=torch.int64),
              "quality": torch.tensor([0.1, 0.9, 0.5], dtype=torch.float64)}]
    by_score = fuse(lists, weight="score", iou_threshold=0.4)
    torch.testing.assert_close(by_score["boxes"][:, 0], torch.tensor([3.2 / 1.7, 7.0], dtype=torch.float64))
    by_quality = fuse(lists, weight="quality", iou_threshold=0.4)
    assert by_quality["boxes"].shape[0] == 1
    x1 = (0 * 0.1 + 4 * 0.9 + 7 * 0.5) / 1.5
    torch.testing.assert_close(by_quality["boxes"][0, [0, 2]], torch.tensor([x1, x1 + 10], dtype=torch.float64))
    # one model, three boxes: avg score (0.9 + 0.8 + 0.7) / 3 * min(3, 1) / 1
    assert by_quality["scores"].item() == pytest.approx(0.8)


def test_zero_weights_fall_back_to_the_mean():
    lists = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10]]), "scores": torch.tensor([0.5, 0.4]),
              "labels": torch.zeros(2, dtype=torch.int64), "quality": torch.zeros(2)}]
    out = fuse(lists, weight="quality")
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.5, 0.0, 10.5, 10.0]]))


def test_classes_are_fused_separately():
    box = torch.tensor([[0.0, 0, 10, 10]])
    lists = [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([3])},
             {"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.tensor([4])}]
    out = fuse(lists)
    assert out["labels"].tolist() == [3, 4]
    torch.testing.assert_close(out["scores"], torch.tensor([0.45, 0.4]))  # one member of two models


# --------------------------------------------------------------------------------------------
# Empty and bad input
# --------------------------------------------------------------------------------------------


def test_empty_input_gives_empty_output():
    out = fuse([])
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
             "quality": torch.zeros(0), "variances": torch.zeros(0, 4)}
    out = fuse([empty, empty], weight="variance")
    assert out["boxes"].shape == (0, 4) and out["quality"].shape == (0,) and out["variances"].shape == (0, 4)
    out = fuse(_two_boxes(), skip_box_threshold=0.95)  # everything skipped
    assert out["boxes"].shape == (0, 4) and out["variances"].shape == (0, 4)
    out = fuse([empty] + _two_boxes())  # an empty list among others
    assert out["boxes"].shape == (1, 4)


def _good():
    return _two_boxes()


@pytest.mark.parametrize("mutate, match", [
    (lambda c: {"candidate_lists": c[0]}, "candidate_lists must be a list"),
    (lambda c: {"candidate_lists": [c[0], "x"]}, r"candidate_lists\[1\] must be a dict"),
    (lambda c: {"candidate_lists": [c[0], {k: v for k, v in c[1].items() if k != "labels"}]},
     r"candidate_lists\[1\] has no 'labels'"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], boxes=torch.tensor([[5.0, 0, 1, 1]]))]},
     r"candidate_lists\[1\]\['boxes'\] must satisfy x2 >= x1"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], boxes=torch.tensor([[math.nan, 0, 1, 1]]))]},
     r"candidate_lists\[1\]\['boxes'\] contains NaN"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], scores=torch.tensor([math.inf]))]},
     r"candidate_lists\[1\]\['scores'\] must be finite"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], scores=torch.tensor([0.1, 0.2]))]},
     r"candidate_lists\[1\]\['scores'\] must have shape \(1,\)"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], labels=torch.tensor([1.0]))]},
     r"candidate_lists\[1\]\['labels'\] must be an integer tensor"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], variances=torch.tensor([[1.0, 0, 1, 1]]))]},
     r"candidate_lists\[1\]\['variances'\] must be finite and positive"),
    (lambda c: {"candidate_lists": [c[0], dict(c[1], quality=torch.tensor([math.nan]))]},
     r"candidate_lists\[1\]\['quality'\] must be finite"),
    (lambda c: {"candidate_lists": [c[0], {k: v for k, v in c[1].items() if k != "quality"}], "weight": "quality"},
     r"weight='quality' needs candidate_lists\[1\]\['quality'\]"),
    (lambda c: {"candidate_lists": c, "weight": "iou"}, "weight must be one of"),
    (lambda c: {"candidate_lists": c, "iou_threshold": 1.5}, "iou_threshold must be a number in"),
    (lambda c: {"candidate_lists": c, "skip_box_threshold": -0.1}, "skip_box_threshold must be"),
    (lambda c: {"candidate_lists": c, "conf_type": "mean"}, "conf_type must be one of"),
    (lambda c: {"candidate_lists": c, "model_weights": [1.0]}, "model_weights must have one weight per"),
    (lambda c: {"candidate_lists": c, "model_weights": [1.0, -2.0]}, r"model_weights\[1\] must be a positive"),
    (lambda c: {"candidate_lists": c, "allows_overflow": 1}, "allows_overflow must be a bool"),
])
def test_bad_input_names_the_argument(mutate, match):
    with pytest.raises(ValueError, match=match):
        fuse(**mutate(_good()))


# --------------------------------------------------------------------------------------------
# benchmarks/fusion_neon.py: a smoke run on tiny trained models (its flipped passes are locconf.tta's,
# tested in tests/test_tta.py)
# --------------------------------------------------------------------------------------------


def _fusion_neon():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))  # for `from common import cpu_name`
    spec = importlib.util.spec_from_file_location("locconf_bench_fusion_neon", bench / "fusion_neon.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fusion_neon_runs_end_to_end_on_tiny_models(tmp_path, one_thread):
    """Two-iteration detectors on synthetic scenes: DIR seeds with flips (score and quality
    weighting), a KL model with flips (score and variance weighting); the tables are written."""
    from locconf.experiment import check_config, run_train

    fn = _fusion_neon()
    ckpts = {}
    for name, quality, seed in (("dir0", "dir", 0), ("dir1", "dir", 1), ("kl", "kl", 0)):
        cfg = check_config({
            "model": dict(arch="rcnn", quality=quality, representation_size=64, backbone="resnet18", fpn_channels=16,
                          min_size=96, max_size=96, candidates_per_image=200),
            "data": dict(source="synthetic", root=str(tmp_path / "data"),
                         synthetic=dict(num_train=4, num_val=3, image_size=96, num_classes=2)),
            "train": dict(iterations=2, batch_size=2, lr=0.01, warmup_iters=1, out_dir=str(tmp_path / name),
                          checkpoint_every=2, log_every=1, progress=False, seed=seed),
        })
        ckpts[name] = run_train(cfg)["checkpoint"]
    out = tmp_path / "dir.md"
    result = fn.main(["--checkpoint", str(ckpts["dir0"]), str(ckpts["dir1"]), "--tta", "--out", str(out),
                      "--no-progress"])
    assert result["passes"] == ["model 0", "model 0 hflip", "model 0 vflip", "model 1", "model 1 hflip",
                                "model 1 vflip"]
    assert result["best_single"] in ("model 0", "model 1") and result["images"] == 3
    assert set(result["metrics"]) == set(result["passes"]) | {"fused (score)", "fused (quality)"}
    assert all(0 <= m["AP"] <= 1 for m in result["metrics"].values())
    text = out.read_text()
    assert "| fused (quality) |" in text and "(best single)" in text
    assert json.loads(out.with_suffix(".json").read_text())["metrics"] == result["metrics"]
    result = fn.main(["--checkpoint", str(ckpts["kl"]), "--tta", "--method", "var-voting", "--out",
                      str(tmp_path / "kl.md"), "--no-progress"])
    assert set(result["metrics"]) == {"model 0", "model 0 hflip", "model 0 vflip", "fused (score)", "fused (variance)"}
    with pytest.raises(ValueError, match="needs 'quality', which this model does not predict"):
        fn.main(["--checkpoint", str(ckpts["kl"]), "--method", "quality", "--out", str(tmp_path / "x.md"),
                 "--no-progress"])
