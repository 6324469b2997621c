"""Many images per call: inputs, per-image outputs, combined CSV/COCO, resuming, failures, checks.

A "perfect detector" boxes each grey level of a tile, so every expected detection is known from the
image that the test draws.
"""

import csv
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from locconf.experiment.batch import RECORDS_DIR, expand_inputs, output_names, predict_images
from test_tiling import BoxTheGreyLevels  # the perfect detector of the tiling tests (tests/ is on the path)


class GreyLevels(BoxTheGreyLevels):
    """test_tiling's perfect detector (each grey level > 0 of a tile is one object, boxed tightly,
    score 0.9, quality 0.8) that counts its calls and can fail or be interrupted at one of them."""

    def __init__(self, fail_on_call=None, interrupt_on_call=None):
        super().__init__()
        self.calls, self.fail_on_call, self.interrupt_on_call = 0, fail_on_call, interrupt_on_call

    def candidates(self, images):  # the detector protocol: locconf.candidates.candidates_of
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        if self.calls == self.fail_on_call:
            raise RuntimeError("the model broke")
        return super().candidates(images)


def _scene(path: Path, seed: int, height: int = 90, width: int = 120, count: int = 3) -> list[list[float]]:
    """A grey PNG with ``count`` separated rectangles (levels 1..count); returns their boxes sorted."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width), dtype=np.uint8)
    boxes = []
    while len(boxes) < count:
        w, h = rng.integers(8, 25, size=2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        if pixels[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2].any():
            continue
        pixels[y:y + h, x:x + w] = len(boxes) + 1
        boxes.append([float(x), float(y), float(x + w), float(y + h)])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return sorted(boxes)


def _images(folder: Path, n: int = 4) -> dict[str, list]:
    return {f"{i:02d}.png": _scene(folder / f"{i:02d}.png", seed=i) for i in range(n)}


OPTS = dict(tile_size=64, overlap=32, batch_size=2, progress=False, score_threshold=0.5, max_side=64,
            class_names=["__background__", "crown"], label_to_cat_id={1: 7})


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# inputs and names
# --------------------------------------------------------------------------------------------


def test_expand_inputs_files_folders_patterns(tmp_path, monkeypatch):
    for name in ("b.png", "a.PNG", "c.jpg", "d.tif", "notes.txt", "sub/e.png", "sub/deeper/f.tiff"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert [p.as_posix() for p in expand_inputs(["."])] == ["a.PNG", "b.png", "c.jpg", "d.tif"]
    assert [p.as_posix() for p in expand_inputs(["."], recursive=True)] == [
        "a.PNG", "b.png", "c.jpg", "d.tif", "sub/deeper/f.tiff", "sub/e.png"]
    # a quoted pattern, a folder and a file naming images already listed: each image once, sorted
    assert [p.as_posix() for p in expand_inputs(["sub/*.png", "*.png", "./b.png", "sub"])] == ["b.png", "sub/e.png"]
    assert [p.as_posix() for p in expand_inputs(["**/*.tiff"], recursive=True)] == ["sub/deeper/f.tiff"]
    assert [p.as_posix() for p in expand_inputs(["notes.txt"])] == ["notes.txt"]  # a file is taken as given
    with pytest.raises(FileNotFoundError, match="image file not found: missing.png"):
        expand_inputs(["b.png", "missing.png"])
    with pytest.raises(ValueError, match="no image matches"):
        expand_inputs(["*.jpeg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        expand_inputs(["empty"])


def test_output_names_are_unique_and_follow_the_folders():
    base = Path("/data")
    assert output_names([base / "o/a.tif", base / "o/b.tif"]) == ["a", "b"]
    assert output_names([base / "x/a.tif", base / "y/a.tif"]) == ["x/a", "y/a"]
    assert output_names([base / "o/a.png", base / "o/a.tif", base / "o/b.png"]) == ["a_png", "a_tif", "b"]
    assert output_names([]) == []


# --------------------------------------------------------------------------------------------
# a folder predicted: per-image outputs and the combined files
# --------------------------------------------------------------------------------------------


def test_predict_a_folder_writes_each_image_and_the_combined_csv_and_coco(tmp_path):
    truth = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    summary = predict_images(GreyLevels(), [tmp_path / "imgs"], out, **OPTS)
    assert summary["images"] == summary["predicted"] == 4 and summary["skipped"] == 0 and not summary["failed"]
    assert summary["detections"] == summary["shown"] == 12
    names = sorted(truth)
    for i, name in enumerate(names):
        stem = name[:-4]
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        records = json.loads((out / f"{stem}.json").read_text())  # COCO results of the image
        assert {r["image_id"] for r in records} == {i + 1} and {r["category_id"] for r in records} == {7}
        got = sorted([r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                     for r in records)
        assert got == truth[name]
        assert json.loads((out / RECORDS_DIR / f"{stem}.json").read_text())["count"] == 3
    rows = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert list(rows[0]) == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score", "quality"]
    assert {r["label"] for r in rows} == {"crown"}
    for name in names:
        mine = sorted([float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for r in rows
                      if r["image_path"] == (tmp_path / "imgs" / name).as_posix())
        assert mine == truth[name]
    coco = json.loads((out / "predictions.json").read_text())
    assert coco["images"] == [{"id": i + 1, "file_name": (tmp_path / "imgs" / n).as_posix(), "width": 120,
                               "height": 90} for i, n in enumerate(names)]
    assert coco["categories"] == [{"id": 7, "name": "crown"}]
    assert len(coco["annotations"]) == 12 and [a["id"] for a in coco["annotations"]] == list(range(1, 13))
    assert all(a["quality"] == pytest.approx(0.8) for a in coco["annotations"])
    assert not [p for p in out.rglob("*") if ".tmp." in p.name or ".staged." in p.name]
    assert not (out / ".locconf.lock").exists()


def test_tta_through_a_batch_equals_the_plain_run_for_an_equivariant_detector(tmp_path):
    _images(tmp_path / "imgs", n=2)
    plain = predict_images(GreyLevels(), [tmp_path / "imgs"], tmp_path / "plain", **OPTS)
    for tta, merge in (("all", "concat"), ("flips", "fuse-quality")):
        out = tmp_path / f"{tta}_{merge}"
        det = GreyLevels()
        summary = predict_images(det, [tmp_path / "imgs"], out, tta=tta, tta_merge=merge, **OPTS)
        assert summary["detections"] == plain["detections"]
        assert (out / "predictions.csv").read_bytes() == (tmp_path / "plain" / "predictions.csv").read_bytes()
        assert det.calls == 2 * 3 * (8 if tta == "all" else 3)  # 2 images x 3 batches of 2 tiles x passes


# --------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------


def test_a_resumed_batch_redoes_only_what_is_incomplete_and_ends_equal_to_an_uninterrupted_one(tmp_path):
    _images(tmp_path / "imgs", n=5)
    fresh = tmp_path / "fresh"
    predict_images(GreyLevels(), [tmp_path / "imgs"], fresh, **OPTS)

    out = tmp_path / "out"
    det = GreyLevels(interrupt_on_call=10)  # 6 tiles, 3 model calls per image: stops inside the fourth image
    with pytest.raises(KeyboardInterrupt):
        predict_images(det, [tmp_path / "imgs"], out, **OPTS)
    assert sorted(p.name for p in (out / RECORDS_DIR).iterdir()) == ["00.json", "01.json", "02.json"]
    assert not (out / "predictions.csv").exists() and not (out / ".locconf.lock").exists()
    assert not [p for p in out.rglob("*") if ".tmp." in p.name or ".staged." in p.name]

    det = GreyLevels()
    summary = predict_images(det, [tmp_path / "imgs"], out, **OPTS)
    assert (summary["predicted"], summary["skipped"], det.calls) == (2, 3, 6)
    assert _tree(out) == _tree(fresh)

    # a damaged output and a changed image are redone; a rerun with other settings redoes everything
    (out / "01.png").write_bytes(b"not the drawing")
    _scene(tmp_path / "imgs" / "03.png", seed=33)
    det = GreyLevels()
    summary = predict_images(det, [tmp_path / "imgs"], out, **OPTS)
    assert (summary["predicted"], summary["skipped"]) == (2, 3)
    det = GreyLevels()
    assert predict_images(det, [tmp_path / "imgs"], out, **dict(OPTS, score_threshold=0.6))["predicted"] == 5
    det = GreyLevels()
    assert predict_images(det, [tmp_path / "imgs"], out, overwrite=True, **dict(OPTS, score_threshold=0.6)
                          )["predicted"] == 5

    # images added in front: the complete ones keep their outputs, renumbered without running the model
    _scene(tmp_path / "imgs" / "000.png", seed=50)
    det = GreyLevels()
    summary = predict_images(det, [tmp_path / "imgs"], out, **dict(OPTS, score_threshold=0.6))
    assert (summary["predicted"], summary["skipped"], det.calls) == (1, 5, 3)
    assert {r["image_id"] for r in json.loads((out / "04.json").read_text())} == {6}
    again = tmp_path / "again"
    predict_images(GreyLevels(), [tmp_path / "imgs"], again, **dict(OPTS, score_threshold=0.6))
    assert (out / "predictions.json").read_bytes() == (again / "predictions.json").read_bytes()
    assert (out / "predictions.csv").read_bytes() == (again / "predictions.csv").read_bytes()


# --------------------------------------------------------------------------------------------
# failures, limits and checks
# --------------------------------------------------------------------------------------------


def _png(path: Path, width: int, height: int, rows: list[bytes], interlace: int = 0) -> None:
    """A PNG written by hand (8-bit grey): ``rows`` are the filtered scanlines of the data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))


def test_png_pixel_data_is_checked_against_its_header(tmp_path):
    from locconf.tiling import check_png_data, open_raster

    # an interlaced (Adam7) PNG written by hand decodes to its pixels and passes the check
    pixels = np.random.default_rng(0).integers(0, 256, (13, 11), dtype=np.uint8)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rows = [b"\x00" + pixels[y, x0::dx].tobytes() for x0, y0, dx, dy in passes for y in range(y0, 13, dy)
            if pixels[y, x0::dx].size]
    _png(tmp_path / "adam7.png", 11, 13, rows, interlace=1)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "adam7.png")), pixels)
    check_png_data(tmp_path / "adam7.png")
    _png(tmp_path / "short7.png", 11, 13, rows[:-1], interlace=1)
    with pytest.raises(ValueError, match="short7.png: the PNG's pixel data is short"):
        check_png_data(tmp_path / "short7.png")
    # a tiny file that declares 20000 x 20000 pixels: Pillow decodes it, the check refuses it
    _png(tmp_path / "bomb.png", 20000, 20000, [b"\x00" * 20001] * 3)
    assert (tmp_path / "bomb.png").stat().st_size < 1000
    with pytest.raises(ValueError, match=r"bomb.png: the PNG's pixel data is short .* 20000 x 20000"):
        with open_raster(tmp_path / "bomb.png"):
            pass
    with pytest.raises(ValueError, match="400,000,000 pixels is more than the limit of 1,000,000"):
        with open_raster(tmp_path / "bomb.png", max_pixels=1_000_000):
            pass
    good = tmp_path / "good.png"
    Image.fromarray(pixels).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) - 30])
    with pytest.raises(ValueError, match="cut.png"):
        with open_raster(tmp_path / "cut.png"):
            pass


def test_failed_images_are_reported_by_name_and_the_batch_goes_on(tmp_path, caplog):
    truth = _images(tmp_path / "imgs", n=3)
    _png(tmp_path / "imgs" / "00a.png", 200, 200, [b"\x00" * 201] * 2)  # short pixel data
    Image.fromarray(np.zeros((300, 400), dtype=np.uint8)).save(tmp_path / "imgs" / "01a.png")
    (tmp_path / "imgs" / "zz.png").write_text("not an image")
    caplog.set_level(logging.INFO, logger="locconf")
    summary = predict_images(GreyLevels(), [tmp_path / "imgs"], tmp_path / "out", max_pixels=100_000, **OPTS)
    assert summary["predicted"] == 3
    failed = {Path(f["image"]).name: f["reason"] for f in summary["failed"]}
    assert set(failed) == {"00a.png", "01a.png", "zz.png"}
    assert "pixel data is short" in failed["00a.png"] and "more than the limit of 100,000" in failed["01a.png"]
    assert "not an image" in failed["zz.png"]
    assert "00a.png failed: the PNG's pixel data is short" in caplog.text
    coco = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(im["file_name"]).name for im in coco["images"]] == sorted(truth)  # the failed ones left out
    assert [im["id"] for im in coco["images"]] == [1, 3, 5]  # ids are positions among all the call's images
    with pytest.raises(ValueError, match="pixel data is short"):
        predict_images(GreyLevels(), [tmp_path / "imgs"], tmp_path / "out2", fail_fast=True, overwrite=True, **OPTS)
    # a model error is one image's failure too
    summary = predict_images(GreyLevels(fail_on_call=1), [tmp_path / "imgs" / "00.png", tmp_path / "imgs" / "01.png"],
                             tmp_path / "out3", **OPTS)
    assert [f["reason"] for f in summary["failed"]] == ["the model broke"] and summary["predicted"] == 1


def test_size_and_tile_count_are_logged_before_the_first_tile(tmp_path, caplog):
    _scene(tmp_path / "big.png", seed=1, height=150, width=200)
    events = []

    class Recording(logging.Handler):
        def emit(self, record):
            events.append(("log", record.getMessage()))

    class Watched(GreyLevels):
        def candidates(self, images):
            events.append(("tile", len(images)))
            return super().candidates(images)

    handler = Recording(level=logging.INFO)
    logging.getLogger("locconf").addHandler(handler)
    level = logging.getLogger("locconf").level
    logging.getLogger("locconf").setLevel(logging.INFO)
    try:
        predict_images(Watched(), [tmp_path / "big.png"], tmp_path / "out", **OPTS)
    finally:
        logging.getLogger("locconf").removeHandler(handler)
        logging.getLogger("locconf").setLevel(level)
    first_tile = events.index(next(e for e in events if e[0] == "tile"))
    assert any(e[0] == "log" and "200 x 150 pixels, 24 tiles of 64 px" in e[1] for e in events[:first_tile])


def test_outputs_never_land_on_inputs_and_bad_settings_are_refused_before_any_image(tmp_path):
    _images(tmp_path / "imgs", n=2)
    det = GreyLevels()
    with pytest.raises(ValueError, match="inside the input folder"):
        predict_images(det, [tmp_path / "imgs"], tmp_path / "imgs" / "out", **OPTS)
    with pytest.raises(ValueError, match="is the input folder"):
        predict_images(det, [tmp_path / "imgs"], tmp_path / "imgs", **OPTS)
    _scene(tmp_path / "more" / "predictions.png", seed=3)
    with pytest.raises(ValueError, match="combined JSON"):
        predict_images(det, [tmp_path / "more"], tmp_path / "out", **OPTS)
    ckpt = tmp_path / "out" / "00.json"
    ckpt.parent.mkdir()
    ckpt.write_text("{}")
    with pytest.raises(ValueError, match="checkpoint"):
        predict_images(det, [tmp_path / "imgs" / "00.png"], tmp_path / "out", checkpoint=ckpt, **OPTS)
    with pytest.raises(ValueError, match="tile_size must be at least 32"):
        predict_images(det, [tmp_path / "imgs"], tmp_path / "o2", **dict(OPTS, tile_size=1, overlap=0))
    with pytest.raises(ValueError, match="tta must be one of"):
        predict_images(det, [tmp_path / "imgs"], tmp_path / "o2", tta="sideways", **OPTS)
    with pytest.raises(ValueError, match="border"):
        predict_images(det, [tmp_path / "imgs"], tmp_path / "o2", border="crop", **OPTS)
    assert det.calls == 0 and not (tmp_path / "o2").exists()


def test_write_together_leaves_the_old_set_when_a_writer_fails(tmp_path):
    from locconf.tiling import write_together

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    write_together({a: lambda t: t.write_text("old a"), b: lambda t: t.write_text("old b")})

    def broken(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_together({a: lambda t: t.write_text("new a"), b: broken})
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_single_image_predict_writes_the_csv_schema_with_image_path(tmp_path):
    from locconf.experiment import predict

    truth = _scene(tmp_path / "one.png", seed=4)
    predict(GreyLevels(), tmp_path / "one.png", tmp_path / "vis.png", tile_size=64, overlap=32, max_side=64,
            image_name="one.png")
    rows = list(csv.DictReader(open(tmp_path / "vis.csv", encoding="utf-8")))
    assert list(rows[0])[:7] == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"]
    assert {r["image_path"] for r in rows} == {"one.png"}
    assert sorted([float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for r in rows) == truth
    assert {r["image_id"] for r in json.loads((tmp_path / "vis.json").read_text())} == {1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_command_line_default_pixel_limit_is_the_library_s():
    from locconf.cli.predict import DEFAULT_MAX_PIXELS as CLI_DEFAULT
    from locconf.tiling import DEFAULT_MAX_PIXELS

    assert CLI_DEFAULT == DEFAULT_MAX_PIXELS


def test_a_folder_of_geotiffs_gets_one_geojson_per_image_in_map_coordinates(tmp_path):
    """Georeferenced images: each image's boxes also as GeoJSON polygons in its CRS; PNGs get none."""
    rasterio = pytest.importorskip("rasterio")
    pyogrio = pytest.importorskip("pyogrio")
    shapely = pytest.importorskip("shapely")
    from rasterio.transform import from_origin

    truth = {}
    for i, origin in enumerate(((300000.0, 5000000.0), (300500.0, 5000000.0))):
        png = tmp_path / "src" / f"{i}.png"
        truth[i] = _scene(png, seed=i)
        pixels = np.asarray(Image.open(png))
        (tmp_path / "tifs").mkdir(exist_ok=True)
        with rasterio.open(tmp_path / "tifs" / f"t{i}.tif", "w", driver="GTiff", height=pixels.shape[0],
                           width=pixels.shape[1], count=3, dtype="uint8", crs="EPSG:32618",
                           transform=from_origin(*origin, 0.5, 0.5)) as ds:
            ds.write(np.stack([pixels] * 3))
    summary = predict_images(GreyLevels(), [tmp_path / "tifs", tmp_path / "src" / "0.png"], tmp_path / "out", **OPTS)
    assert summary["predicted"] == 3 and not summary["failed"]
    out = tmp_path / "out" / "tifs"  # the outputs keep the folders that tell the inputs apart
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.geojson")) == [
        "tifs/t0.geojson", "tifs/t1.geojson"]
    for i, origin in enumerate(((300000.0, 5000000.0), (300500.0, 5000000.0))):
        assert "32618" in pyogrio.read_info(out / f"t{i}.geojson")["crs"]
        _, _, geoms, _ = pyogrio.raw.read(out / f"t{i}.geojson")
        got = sorted(shapely.from_wkb(g).bounds for g in geoms)
        want = sorted((origin[0] + 0.5 * x1, origin[1] - 0.5 * y2, origin[0] + 0.5 * x2, origin[1] - 0.5 * y1)
                      for x1, y1, x2, y2 in truth[i])
        assert np.allclose(np.array(got), np.array(want), rtol=0, atol=1e-6)
