"""Calibration of localization confidence: reliability bins, ECE, isotonic regression, the map's files.

References: hand-computed bins and ECE, the min-max formula of isotonic regression evaluated by
brute force, and boxes built to have a known IoU with their ground truth.
"""

import json
import math

import numpy as np
import pytest
import torch

from locconf.evaluation import plot_reliability
from locconf.evaluation.calibration import (
    Calibration,
    calibrate_out_of_fold,
    calibration_bins,
    evaluate_calibration,
    fit_calibration,
    isotonic_regression,
    reliability_diagram,
)

# --------------------------------------------------------------------------------------------
# Reliability bins and ECE
# --------------------------------------------------------------------------------------------


def test_calibration_bins_hand_computed():
    # bins of 0.5: [0, 0.5) holds 0.2, 0.4 (true 0.5, 0.7); [0.5, 1] holds 0.9, 1.0 (true 0.6, 1.0)
    d = calibration_bins([0.2, 0.4, 0.9, 1.0], [0.5, 0.7, 0.6, 1.0], bins=2)
    assert d["edges"] == [0.0, 0.5, 1.0] and d["count"] == [2, 2] and d["n"] == 4
    assert d["mean_pred"] == pytest.approx([0.3, 0.95]) and d["mean_true"] == pytest.approx([0.6, 0.8])
    # ECE = 2/4 * |0.3 - 0.6| + 2/4 * |0.95 - 0.8| = 0.15 + 0.075
    assert d["ece"] == pytest.approx(0.225)


def test_calibration_bins_empty_bins_and_no_data():
    d = calibration_bins([0.05, 1.5, -0.2], [0.1, 0.9, 0.3], bins=4)  # out of [0, 1]: the end bins
    assert d["count"] == [2, 0, 0, 1] and d["mean_pred"][1] is None and d["mean_true"][2] is None
    e = calibration_bins([], [], bins=3)
    assert e["count"] == [0, 0, 0] and math.isnan(e["ece"]) and e["n"] == 0
    assert json.dumps(d)  # JSON-ready
    with pytest.raises(ValueError, match="bins"):
        calibration_bins([0.5], [0.5], bins=0)
    with pytest.raises(ValueError, match="same length"):
        calibration_bins([0.5, 0.2], [0.5])


def _scene(ious, quality, scores=None):
    """One image: ground truth (0, 0, 100, 100) and boxes (0, 0, 100, 100 * iou), IoU exactly ``iou``."""
    n = len(ious)
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0 * v] for v in ious])
    cand = {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64),
            "scores": torch.tensor(scores if scores is not None else [0.9] * n), "quality": torch.tensor(quality)}
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([1])}
    return cand, target


def test_reliability_diagram_reads_each_signal_as_a_predicted_iou():
    cand, target = _scene([0.6, 0.8, 0.3], quality=[0.65, 0.75, 0.9], scores=[0.9, 0.7, 0.8])
    d = reliability_diagram([cand], [target], bins=10)  # the 0.3 box is not matched (IoU <= 0.5)
    assert d["quality"]["n"] == 2 and d["quality"]["count"][6] == 1 and d["quality"]["count"][7] == 1
    assert d["quality"]["ece"] == pytest.approx(0.05)  # |0.65 - 0.6| and |0.75 - 0.8|
    assert d["score"]["ece"] == pytest.approx((0.3 + 0.1) / 2)
    assert set(d) == {"score", "quality", "combined"}
    no_quality = {k: v for k, v in cand.items() if k != "quality"}
    assert set(reliability_diagram([no_quality], [target])) == {"score"}


def test_plot_reliability_writes_a_png(tmp_path):
    cand, target = _scene([0.6, 0.8, 0.9], quality=[0.65, 0.75, 0.9])
    d = reliability_diagram([cand], [target])
    out = plot_reliability({"raw": d, "other": d}, tmp_path / "r.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="diagrams"):
        plot_reliability({}, tmp_path / "s.png")


# --------------------------------------------------------------------------------------------
# Isotonic regression
# --------------------------------------------------------------------------------------------


def _isotonic_min_max(x, y, w):
    """f at the distinct level k = max over j <= k of min over l >= k of the weighted mean of levels j..l."""
    levels = sorted(set(x))
    sw = [sum(wi for xi, wi in zip(x, w) if xi == v) for v in levels]
    sy = [sum(wi * yi for xi, yi, wi in zip(x, y, w) if xi == v) for v in levels]
    m = len(levels)
    f = [max(min(sum(sy[j:l + 1]) / sum(sw[j:l + 1]) for l in range(k, m)) for j in range(k + 1)) for k in range(m)]
    return [f[levels.index(xi)] for xi in x]


def test_isotonic_hand_computed():
    assert isotonic_regression([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    # weights: (3 * 3 + 1 * 2) / 4 = 2.75
    assert isotonic_regression([1, 2, 3], [1.0, 3.0, 2.0], [1.0, 3.0, 1.0]).tolist() == pytest.approx([1.0, 2.75, 2.75])
    # equal x get one value; input order is kept
    assert isotonic_regression([2, 1, 2], [1.0, 0.0, 3.0]).tolist() == [2.0, 0.0, 2.0]
    assert isotonic_regression([], []).shape == (0,)


@pytest.mark.parametrize("seed", range(6))
def test_isotonic_matches_the_min_max_formula(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    x = rng.integers(0, 12, n).astype(float)
    y = rng.random(n)
    w = rng.random(n) + 0.05
    assert isotonic_regression(x, y, w) == pytest.approx(_isotonic_min_max(x.tolist(), y.tolist(), w.tolist()))


def test_isotonic_bad_input_is_named():
    with pytest.raises(ValueError, match="same length"):
        isotonic_regression([1, 2], [1.0])
    with pytest.raises(ValueError, match="weights"):
        isotonic_regression([1, 2], [1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        isotonic_regression([1, float("nan")], [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Fitting, applying and saving a calibration
# --------------------------------------------------------------------------------------------


def _overconfident(n_images=8, per_image=40, seed=0):
    """Boxes of true IoU in (0.5, 1) whose predicted quality is sqrt(iou) + noise (over-confident)."""
    rng = np.random.default_rng(seed)
    cands, targets = [], []
    for i in range(n_images):
        iou = rng.uniform(0.52, 0.99, per_image)
        q = np.clip(np.sqrt(iou) + rng.normal(0, 0.02, per_image), 0, 1)
        c, t = _scene(iou.tolist(), q.tolist(), rng.uniform(0.3, 1.0, per_image).tolist())
        c["image_id"], t["image_id"] = i, i
        cands.append(c)
        targets.append(t)
    return cands, targets


def test_fitted_calibration_lowers_the_ece_out_of_fold():
    cands, targets = _overconfident()
    raw = reliability_diagram(cands, targets)["quality"]["ece"]
    calibrated = calibrate_out_of_fold(cands, targets)
    after = reliability_diagram(calibrated, targets)["quality"]["ece"]
    assert raw > 0.1 and after < 0.03
    assert all(torch.equal(c["scores"], k["scores"]) for c, k in zip(cands, calibrated))  # quality only
    report = evaluate_calibration(cands, targets)
    assert report["ece"]["quality"]["raw"] == pytest.approx(raw) and report["ece"]["quality"]["calibrated"] < 0.03
    assert isinstance(report["calibration"], Calibration) and report["quality_calibrated"] is not None


def test_calibration_is_monotone_and_keeps_iou_guided_rankings():
    from locconf.postprocess import postprocess

    cands, targets = _overconfident()
    cal = fit_calibration(cands, targets)
    kx, ky = cal.knots["quality"]
    assert (np.diff(kx) > 0).all() and (np.diff(ky) > 0).all()
    values = torch.linspace(float(kx[0]), float(kx[-1]), 200, dtype=torch.float64)
    out = cal.calibrate("quality", values)
    assert out.dtype == torch.float64 and (out.diff() >= 0).all()
    assert cal.calibrate("quality", torch.tensor([-1.0, 2.0])).tolist() == pytest.approx([ky[0], ky[-1]])
    # iou-guided NMS ranks by quality alone: the same boxes survive, in the same order
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    c = {"boxes": torch.cat([xy, xy + 20 + torch.rand(300, 2, generator=g) * 20], 1), "scores": torch.rand(300, generator=g),
         "labels": torch.randint(1, 3, (300,), generator=g),
         "quality": float(kx[0]) + torch.rand(300, generator=g) * float(kx[-1] - kx[0])}
    before = postprocess(c, "iou-guided", max_detections=300)
    after = postprocess(cal.apply(c), "iou-guided", max_detections=300)
    assert torch.equal(before["boxes"], after["boxes"]) and torch.equal(before["scores"], after["scores"])


def test_calibration_file_round_trip_and_errors(tmp_path):
    cands, targets = _overconfident()
    cal = fit_calibration(cands, targets)
    path = cal.save(tmp_path / "cal.json")
    again = Calibration.load(path)
    q = torch.rand(50, dtype=torch.float64)
    assert torch.equal(again.calibrate("quality", q), cal.calibrate("quality", q))
    assert again.info["n"] == 320 and again.info["min_iou"] == 0.5
    with pytest.raises(ValueError, match="no 'quality'"):
        again.apply({"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64)})
    bad = json.loads(path.read_text())
    for edit, message in [(lambda d: d.pop("format"), "not a locconf calibration"),
                          (lambda d: d.update(version=9), "version"),
                          (lambda d: d["signals"]["quality"].update(x=[0.3, 0.2], y=[0.5, 0.6]), "strictly increasing"),
                          (lambda d: d["signals"]["quality"].update(x=[0.3, 0.4]), "as many x as y"),
                          (lambda d: d["signals"].update(width={"x": [0], "y": [0]}), "width"),
                          (lambda d: d["signals"]["quality"].update(y="up"), "lists")]:
        data = json.loads(path.read_text())
        edit(data)
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            Calibration.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "missing.json")


def test_nothing_to_fit_gives_none():
    cand, target = _scene([0.3, 0.4], quality=[0.5, 0.6])  # nothing matched above IoU 0.5
    assert fit_calibration([cand], [target]) is None
    no_quality = {k: v for k, v in _scene([0.7], quality=[0.5])[0].items() if k != "quality"}
    assert fit_calibration([no_quality], [target]) is None
    assert fit_calibration([no_quality], [target], signals=("score",), min_boxes=1) is not None
    with pytest.raises(ValueError, match="signals"):
        fit_calibration([cand], [target], signals=("combined",))


def test_postprocess_file_applies_a_calibration(tmp_path):
    from locconf.postprocess_files import postprocess_file

    cands, targets = _overconfident(n_images=4)
    cal = fit_calibration(cands, targets)
    cal.save(tmp_path / "cal.json")
    records = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10 + i, 10], "score": 0.5 + i / 100,
                "quality": 0.6 + i / 20} for i in range(5)]
    (tmp_path / "in.json").write_text(json.dumps(records))
    postprocess_file(tmp_path / "in.json", tmp_path / "out.json", method="none", calibration=tmp_path / "cal.json",
                     progress=False)
    out = sorted(json.loads((tmp_path / "out.json").read_text()), key=lambda r: r["bbox"][2])
    expected = cal.calibrate("quality", torch.tensor([r["quality"] for r in records], dtype=torch.float64))
    assert [r["quality"] for r in out] == pytest.approx(expected.tolist())
    (tmp_path / "plain.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "quality"} for r in records]))
    with pytest.raises(ValueError, match="no"):
        postprocess_file(tmp_path / "plain.json", tmp_path / "o2.json", calibration=tmp_path / "cal.json",
                         progress=False)
    assert not (tmp_path / "o2.json").exists()
