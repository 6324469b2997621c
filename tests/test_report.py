"""The HTML report: self-contained, escaped, every section present; rendered by Chromium where installed."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from locconf.evaluation.report import detections_png, render_report, write_report

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
