"""The HTML report: self-contained, escaped, every section present; rendered by Chromium where installed."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from locconf.evaluation.report import (
    detections_figure,
    detections_png,
    gallery_indices,
    gallery_item,
    render_report,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
RESULTS = {
    "nms": {"AP": 0.41, "AP50": 0.8, "AP75": 0.35, "AP90": -1, "sites": {"YELL": {"AP": 0.4}, "OSBS": {"AP": 0.5}}},
    "quality <b>": {"AP": 0.45, "AP50": 0.8, "AP75": 0.42, "AP90": 0.05,
                    "sites": {"YELL": {"AP": 0.44}, "OSBS": {"AP": 0.52}}},
}


def _png(color=(200, 30, 30)) -> bytes:
    image = torch.zeros(3, 60, 80)
    image[:, 10:40, 20:60] = torch.tensor(color)[:, None, None] / 255
    dets = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0], [0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9, 0.1]),
            "quality": torch.tensor([0.8, 0.2])}
    return detections_png(image, dets, gt={"boxes": torch.tensor([[21.0, 11.0, 59.0, 41.0]])}, max_side=200)


def test_report_is_self_contained_and_escaped(tmp_path):
    figure = tmp_path / "fig.png"
    figure.write_bytes(_png())
    path = write_report(
        tmp_path / "r" / "report.html", "eval <run>", RESULTS,
        correlation={"score": {"pearson": 0.2, "spearman": 0.3, "n": 10}},
        correlation_sites={"YELL": {"score": {"pearson": float("nan"), "spearman": 0.1, "n": 1}}},
        calibration={"ece": {"quality": {"raw": 0.12, "calibrated": 0.02, "n": 10}},
                     "methods": {"quality": RESULTS["nms"]}, "note": "a & b"},
        figures={"scatter": figure}, gallery=[{"png": _png(), "caption": "image 1 <YELL>"}], meta="m")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)=\"(?!data:)", text)  # nothing to fetch: every image is inline
    assert "http" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert "quality &lt;b&gt;" in text and "eval &lt;run&gt;" in text and "image 1 &lt;YELL&gt;" in text
    assert "<b>" not in text and "a &amp; b" in text
    for heading in ("COCO box AP", "Per site", "Calibration", "Correlation", "Detections"):
        assert heading in text
    # AP x 100, undefined as "-", best of a column in bold
    assert "<td>41.0</td>" in text and '<td class="best">45.0</td>' in text and "<td>-</td>" in text
    assert "<h3>YELL</h3>" in text and "<h3>OSBS</h3>" in text
    assert not list(path.parent.glob(".*tmp*"))


def test_report_bad_input():
    with pytest.raises(ValueError, match="results"):
        render_report("t", [1, 2])
    with pytest.raises(ValueError, match="not a PNG"):
        render_report("t", RESULTS, figures={"x": b"GIF89a"})
    assert "no results" in render_report("t", {})


def test_detections_png_colours_boxes_by_quality():
    png = _png()
    assert png.startswith(PNG)
    import io

    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    # viridis(0.8) is a yellow-green: some pixels are green-dominant, which the red square is not
    assert ((im[..., 1] > 150) & (im[..., 0] < im[..., 1]) & (im[..., 2] < 150)).sum() > 20


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_chromium_renders_the_report(tmp_path):
    path = write_report(tmp_path / "report.html", "render check", RESULTS,
                        gallery=[{"png": _png(), "caption": "g"}])
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "render_report.sh"
    shot = tmp_path / "shot.png"
    subprocess.run(["bash", str(script), str(path), str(shot), "1000x700"], check=True, timeout=180,
                   capture_output=True)
    im = np.asarray(Image.open(shot).convert("L")).astype(float)
    assert im.shape[1] == 1000 and im.std() > 5  # not a blank page


# --------------------------------------------------------------------------------------------
# The gallery: sampled across sites, at most max_boxes per image, a legend and a labelled colour bar
# --------------------------------------------------------------------------------------------


def test_gallery_indices_hand_computed():
    # NEON val: 9 YELL images, then one OSBS and one SOAP: each small site gets its image, YELL the rest
    assert gallery_indices(["YELL"] * 9 + ["OSBS", "SOAP"], 8) == [0, 2, 3, 5, 6, 8, 9, 10]
    assert gallery_indices([None] * 10, 3) == [0, 4, 9]  # evenly through the images, first and last
    assert gallery_indices(["a", "b", "a", "b"], 1) == [0]
    assert gallery_indices(["a", "b"], 8) == [0, 1]
    assert gallery_indices([], 5) == [] and gallery_indices(["a"], 0) == []
    with pytest.raises(ValueError, match="count"):
        gallery_indices(["a"], -1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), max_size=30), st.integers(0, 35))
def test_gallery_indices_share_fairly(sites, count):
    picked = gallery_indices(sites, count)
    assert len(picked) == len(set(picked)) == min(count, len(sites))
    share = {s: sum(sites[i] == s for i in picked) for s in set(sites)}
    available = {s: sites.count(s) for s in set(sites)}
    for s in share:  # a site gets fewer than another's share minus one only when it has no more images
        for t in share:
            assert share[s] >= share[t] - 1 or share[s] == available[s], (s, t, share)


def _scene(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 340
    boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 30], 1)
    return {"boxes": boxes, "scores": torch.rand(n, generator=g), "labels": torch.ones(n, dtype=torch.long),
            "quality": torch.rand(n, generator=g)}


def test_detections_figure_legend_and_colour_bar():
    dets = _scene()
    above = int((dets["scores"] >= 0.3).sum())
    fig = detections_figure(torch.zeros(3, 400, 400), dets, gt={"boxes": dets["boxes"][:5]})
    image_ax, legend_ax, bar = fig.axes
    assert [t.get_text() for t in bar.get_xticklabels()] == ["0", "0.25", "0.5", "0.75", "1"]
    assert bar.get_xlabel() == "predicted IoU (quality)"
    assert [t.get_text() for t in legend_ax.get_legend().get_texts()] == ["detection", "ground truth"]
    assert [t.get_text() for t in legend_ax.texts] == [f"25 shown, {above - 25} more hidden"]
    # without quality the colour is the score, and says so; without ground truth no such legend entry
    bare = {k: dets[k] for k in ("boxes", "scores")}
    fig = detections_figure(torch.zeros(3, 400, 400), bare, max_boxes=500)
    assert fig.axes[2].get_xlabel() == "score (no quality predicted)"
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["detection"]
    assert [t.get_text() for t in fig.axes[1].texts] == [f"{above} shown"]
    with pytest.raises(ValueError, match="max_boxes"):
        detections_figure(torch.zeros(3, 40, 40), dets, max_boxes=0)


def test_gallery_item_draws_only_the_best_boxes():
    """Two isolated boxes on a black image, 30 decoys between them: the best box's outline is drawn
    (yellow: quality 1), the 27th-best box's is not, and the caption counts them."""
    boxes = [[20.0, 20.0, 120.0, 120.0], [250.0, 250.0, 350.0, 350.0]] + [[200.0, 40.0 + i, 210.0, 50.0 + i]
                                                                            for i in range(30)]
    scores = [0.99, 0.31] + [0.5 + i / 100 for i in range(30)]
    dets = {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "quality": torch.ones(32)}
    item = gallery_item(torch.zeros(3, 400, 400), dets, title="image 7 (SOAP)", max_boxes=25)
    assert item["caption"] == "image 7 (SOAP): 32 detections with score >= 0.3 (25 best shown, 7 more hidden)"
    import io

    im = np.asarray(Image.open(io.BytesIO(item["png"])).convert("RGB")).astype(int)
    assert im.shape[:2] == (462, 400)  # 400 px of image (scale 1, at the top) and the footer

    def yellow(x1, y1, x2, y2):  # pixels of a box's left edge that are viridis(1)-like
        col = im[int(y1) + 5:int(y2) - 5, int(x1) - 1:int(x1) + 2]
        return int(((col[..., 0] > 180) & (col[..., 1] > 180) & (col[..., 2] < 100)).sum())

    assert yellow(*boxes[0]) > 50
    assert yellow(*boxes[1]) == 0
    few = gallery_item(torch.zeros(3, 400, 400), dets, gt={"boxes": torch.zeros(3, 4)}, max_boxes=40)
    assert few["caption"] == "32 detections with score >= 0.3, 3 objects"


def test_report_gallery_has_a_legend():
    text = render_report("t", RESULTS, gallery=[{"png": _png(), "caption": "c"}])
    assert "Dashed white boxes: ground truth" in text and "at most 25 per image" in text
