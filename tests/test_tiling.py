"""Tiled prediction: grid, shifts, cut boxes, progressive merging, readers and writers.

References: hand-computed windows and boxes, a brute-force pixel cover of the grid, a plain-Python
loop over every pair for the border rule, merging the whole image at once for the progressive
merger, and a "perfect detector" that boxes the objects it sees in each tile, so that the right
merge recovers the ground truth exactly.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from locconf.tiling import (
    TileMerger,
    cut_sides,
    map_boxes,
    merge_candidates,
    open_raster,
    predict_tiled,
    resolve_borders,
    shift_candidates,
    tile_grid,
    write_coco_results,
    write_csv,
)

# --------------------------------------------------------------------------------------------
# Grid, shift, cut sides
# --------------------------------------------------------------------------------------------


def test_tile_grid_hand_computed():
    # starts every 300 px, the last pushed back to end at the edge: x 0, 300 (700 - 400); y 0, 300, 600
    expected = [[0, 0, 400, 400], [300, 0, 700, 400], [0, 300, 400, 700], [300, 300, 700, 700],
                [0, 600, 400, 1000], [300, 600, 700, 1000]]
    assert tile_grid(1000, 700, 400, 100).tolist() == expected
    assert tile_grid(300, 200, 400, 100).tolist() == [[0, 0, 200, 300]]  # smaller than a tile: one tile
    assert tile_grid(400, 400, 400, 0).tolist() == [[0, 0, 400, 400]]
    assert tile_grid(0, 50, 400, 100).shape == (0, 4)


@pytest.mark.parametrize("h,w,tile,overlap", [(1000, 700, 400, 100), (97, 301, 40, 13), (50, 50, 50, 0),
                                              (123, 45, 16, 15)])
def test_tile_grid_covers_every_pixel_with_the_overlap(h, w, tile, overlap):
    windows = tile_grid(h, w, tile, overlap)
    cover = np.zeros((h, w), dtype=int)
    for x1, y1, x2, y2 in windows.tolist():
        assert x2 - x1 == min(tile, w) and y2 - y1 == min(tile, h)  # full tiles
        cover[y1:y2, x1:x2] += 1
    assert (cover >= 1).all()
    # neighbours in a row / column overlap by at least `overlap` pixels
    xs = sorted(set(windows[:, 0].tolist()))
    ys = sorted(set(windows[:, 1].tolist()))
    assert all(a + min(tile, w) - b >= overlap for a, b in zip(xs, xs[1:]))
    assert all(a + min(tile, h) - b >= overlap for a, b in zip(ys, ys[1:]))
    assert windows[:, 1].tolist() == sorted(windows[:, 1].tolist())


@pytest.mark.parametrize("kwargs,name", [(dict(overlap=400), "overlap"), (dict(overlap=-1), "overlap"),
                                         (dict(tile_size=0), "tile_size"), (dict(tile_size=True), "tile_size"),
                                         (dict(height=-3), "height"), (dict(width=2.5), "width")])
def test_tile_grid_bad_arguments_are_named(kwargs, name):
    args = {**dict(height=100, width=100, tile_size=40, overlap=10), **kwargs}
    with pytest.raises(ValueError, match=name):
        tile_grid(**args)


def test_shift_clips_to_the_tile_and_moves_to_image_coordinates():
    cands = {"boxes": torch.tensor([[-5.0, 10.0, 50.0, 120.0], [0.0, 0.0, 10.0, 10.0]]),
             "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2]),
             "variances": torch.ones(2, 4), "extra": "dropped"}
    out = shift_candidates(cands, (300, 200, 400, 300))
    assert out["boxes"].tolist() == [[300.0, 210.0, 350.0, 300.0], [300.0, 200.0, 310.0, 310.0 - 100.0]]
    assert torch.equal(out["variances"], torch.ones(2, 4)) and "extra" not in out
    with pytest.raises(ValueError, match=r"candidates\['scores'\]"):
        shift_candidates(dict(cands, scores=torch.zeros(3)), (0, 0, 10, 10))


def test_cut_sides_only_interior_edges():
    # image 100 x 200 (h x w); tile (100, 0, 200, 100) touches the image's right, top and bottom edges
    boxes = torch.tensor([[101.0, 10.0, 150.0, 50.0],    # near the left (interior) edge: cut left
                          [150.0, 0.0, 200.0, 100.0],    # on the top, right and bottom image edges: not cut
                          [130.0, 30.0, 170.0, 60.0]])   # inside
    cut = cut_sides(boxes, torch.tensor([100, 0, 200, 100]), (100, 200), margin=2.0)
    assert cut.tolist() == [[True, False, False, False], [False] * 4, [False] * 4]
    assert not cut_sides(boxes, torch.tensor([100, 0, 200, 100]), (100, 200), margin=0.5)[0].any()
    with pytest.raises(ValueError, match="margin"):
        cut_sides(boxes, torch.tensor([100, 0, 200, 100]), (100, 200), margin=-1)


# --------------------------------------------------------------------------------------------
# Border rule
# --------------------------------------------------------------------------------------------

# two tiles side by side in a 100 x 160 image: tile 0 = x 0..100, tile 1 = x 60..160
WINDOWS = torch.tensor([[0, 0, 100, 100], [60, 0, 160, 100]])


def _pooled(rows):
    """rows: (box, score, label, tile) -> pooled candidates and tile index."""
    boxes = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    return ({"boxes": boxes, "scores": torch.tensor([r[1] for r in rows]),
             "labels": torch.tensor([r[2] for r in rows])}, torch.tensor([r[3] for r in rows]))


def test_drop_removes_a_cut_box_whose_whole_counterpart_a_neighbour_sees():
    whole = ([50.0, 20.0, 90.0, 60.0], 0.8, 1, 0)  # tile 0 sees the object whole
    piece = ([60.0, 20.0, 90.0, 60.0], 0.9, 1, 1)  # tile 1 sees it cut at its left edge (x = 60)
    cands, tile = _pooled([whole, piece])
    keep, scores = resolve_borders(cands, tile, WINDOWS, (100, 160), "drop")
    assert keep.tolist() == [True, False] and torch.equal(scores, cands["scores"])
    # another label, a much weaker counterpart, or one that does not reach past the edge: kept
    for other in [([50.0, 20.0, 90.0, 60.0], 0.8, 2, 0), ([50.0, 20.0, 90.0, 60.0], 0.3, 1, 0),
                  ([61.0, 20.0, 90.0, 60.0], 0.8, 1, 0)]:
        cands, tile = _pooled([other, piece])
        assert resolve_borders(cands, tile, WINDOWS, (100, 160), "drop")[0].tolist() == [True, True]
    cands, tile = _pooled([whole, piece])
    assert resolve_borders(cands, tile, WINDOWS, (100, 160), "none")[0].all()
    keep, scores = resolve_borders(cands, tile, WINDOWS, (100, 160), "down-weight", cut_weight=0.25)
    assert keep.all() and scores.tolist() == pytest.approx([0.8, 0.225])


def test_drop_prefers_the_counterpart_with_higher_predicted_quality():
    whole = ([50.0, 20.0, 90.0, 60.0], 0.4, 1, 0)
    piece = ([60.0, 20.0, 90.0, 60.0], 0.9, 1, 1)
    cands, tile = _pooled([whole, piece])
    assert resolve_borders(cands, tile, WINDOWS, (100, 160), "drop")[0].tolist() == [True, True]  # 0.4 < 0.5 * 0.9
    # ranked by sqrt(score x quality): sqrt(0.4 * 1.0) = 0.63 >= 0.5 * sqrt(0.9 * 0.2) = 0.21
    cands["quality"] = torch.tensor([1.0, 0.2])
    assert resolve_borders(cands, tile, WINDOWS, (100, 160), "drop")[0].tolist() == [True, False]


def _brute_force_drop(cands, tile, windows, image_size, margin, cover, score_ratio):
    """Plain-Python reading of the module docstring's rule, pair by pair."""
    h, w = image_size
    boxes, scores, labels = cands["boxes"].tolist(), cands["scores"].tolist(), cands["labels"].tolist()
    quality = cands["quality"].tolist() if "quality" in cands else None
    rank = [math.sqrt(min(max(s, 0), 1) * min(max(q, 0), 1)) for s, q in zip(scores, quality)] if quality else scores

    def cut(i):
        x1, y1, x2, y2 = windows[tile[i]].tolist()
        b = boxes[i]
        return [x1 > 0 and b[0] <= x1 + margin, y1 > 0 and b[1] <= y1 + margin,
                x2 < w and b[2] >= x2 - margin, y2 < h and b[3] >= y2 - margin]

    cuts = [cut(i) for i in range(len(boxes))]
    drop = []
    for i, c in enumerate(boxes):
        if not any(cuts[i]):
            drop.append(False)
            continue
        win = windows[tile[i]].tolist()
        area = (c[2] - c[0]) * (c[3] - c[1])
        found = False
        for j, f in enumerate(boxes):
            if any(cuts[j]) or labels[j] != labels[i] or rank[j] < score_ratio * rank[i] or area <= 0:
                continue
            inter = max(0.0, min(c[2], f[2]) - max(c[0], f[0])) * max(0.0, min(c[3], f[3]) - max(c[1], f[1]))
            beyond = [f[0] < win[0], f[1] < win[1], f[2] > win[2], f[3] > win[3]]
            if inter >= cover * area and any(b for b, s in zip(beyond, cuts[i]) if s):
                found = True
                break
        drop.append(found)
    return drop


def _scene(height, width, n_objects, seed, tile=200, overlap=50, per_object=3, quality=False):
    """Noisy candidates of random objects, cut to each tile: ``(windows, per-tile candidates)``."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n_objects, 2, generator=g) * torch.tensor([width - 60.0, height - 60.0])
    size = 15 + torch.rand(n_objects, 2, generator=g) * 45
    objects = torch.cat([xy, xy + size], dim=1)
    labels = torch.randint(1, 3, (n_objects,), generator=g)
    windows = tile_grid(height, width, tile, overlap)
    tiles = []
    for x1, y1, x2, y2 in windows.tolist():
        c = objects.repeat(per_object, 1) + torch.randn(per_object * n_objects, 4, generator=g) * 3
        c[:, 2:] = torch.maximum(c[:, 2:], c[:, :2] + 1)
        inside = (c[:, 2] > x1 + 1) & (c[:, 0] < x2 - 1) & (c[:, 3] > y1 + 1) & (c[:, 1] < y2 - 1)
        c = c[inside] - torch.tensor([x1, y1, x1, y1], dtype=torch.float32)
        n = c.shape[0]
        cands = {"boxes": c, "scores": torch.rand(n, generator=g), "labels": labels.repeat(per_object)[inside]}
        if quality:
            cands["quality"] = torch.rand(n, generator=g)
        tiles.append(cands)
    return windows, tiles


def _pool(windows, tiles):
    shifted = [shift_candidates(t, w) for t, w in zip(tiles, windows)]
    pooled = {k: torch.cat([s[k] for s in shifted]) for k in shifted[0]}
    tile = torch.cat([torch.full((s["boxes"].shape[0],), i) for i, s in enumerate(shifted)])
    return pooled, tile


@pytest.mark.parametrize("seed,quality", [(0, False), (1, True), (2, False)])
def test_drop_matches_a_brute_force_reading_of_the_rule(seed, quality):
    windows, tiles = _scene(420, 380, 40, seed, tile=160, overlap=60, quality=quality)
    cands, tile = _pool(windows, tiles)
    keep, _ = resolve_borders(cands, tile, windows, (420, 380), "drop", margin=4.0, cover=0.7, score_ratio=0.5)
    expected = _brute_force_drop(cands, tile, windows, (420, 380), 4.0, 0.7, 0.5)
    assert (~keep).tolist() == expected
    assert sum(expected) > 5  # the scene exercises the rule


# --------------------------------------------------------------------------------------------
# Progressive merging
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nms", "soft-gaussian", "quality"])
@pytest.mark.parametrize("border", ["none", "drop", "down-weight"])
def test_progressive_merge_equals_merging_the_whole_image(method, border):
    height, width = 2400, 500
    windows, tiles = _scene(height, width, 400, seed=3, quality=True)
    merger = TileMerger(windows, (height, width), method, border=border)
    for i, t in enumerate(tiles):
        merger.add(i, t)
    got = merger.finish()
    cands, tile = _pool(windows, tiles)
    ref = merge_candidates(cands, tile, windows, (height, width), method, border=border,
                           max_detections=merger.max_detections)
    assert torch.equal(got["boxes"], ref["boxes"])
    assert torch.equal(got["scores"], ref["scores"])
    assert torch.equal(got["tile"], ref["tile"])
    assert merger.peak_buffer < cands["boxes"].shape[0] / 2  # a strip, not the image


def test_buffer_is_bounded_by_a_strip_not_by_the_image_height():
    peaks = []
    for height in (2000, 4000):
        windows, tiles = _scene(height, 400, height // 6, seed=4)
        merger = TileMerger(windows, (height, 400), "nms")
        for i, t in enumerate(tiles):
            merger.add(i, t)
        merger.finish()
        peaks.append(merger.peak_buffer)
    assert peaks[1] < 1.3 * peaks[0]  # same density, twice the height: about the same strip


def test_max_detections_keeps_the_best():
    windows, tiles = _scene(1200, 400, 150, seed=5)
    merger = TileMerger(windows, (1200, 400), "soft-linear", max_detections=7)
    for i, t in enumerate(tiles):
        merger.add(i, t)
    got = merger.finish()
    cands, tile = _pool(windows, tiles)
    ref = merge_candidates(cands, tile, windows, (1200, 400), "soft-linear", max_detections=7)
    assert got["scores"].shape == (7,) and torch.equal(got["scores"], ref["scores"])


def test_merger_errors_are_named_and_empty_input_gives_empty_output():
    windows = tile_grid(300, 300, 200, 50)
    with pytest.raises(ValueError, match="method"):
        TileMerger(windows, (300, 300), "nmss")
    with pytest.raises(ValueError, match="border"):
        TileMerger(windows, (300, 300), border="cut")
    with pytest.raises(ValueError, match="params"):
        TileMerger(windows, (300, 300), "soft-gaussian", params={"sigmaa": 0.5})
    with pytest.raises(ValueError, match="cover"):
        TileMerger(windows, (300, 300), cover=1.5)
    merger = TileMerger(windows, (300, 300))
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    with pytest.raises(ValueError, match="expected tile 0, got 1"):
        merger.add(1, empty)
    with pytest.raises(ValueError, match="finish"):
        merger.finish()
    for i in range(len(windows)):
        merger.add(i, empty)
    out = merger.finish()
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,)
    with pytest.raises(ValueError, match="fields"):
        m = TileMerger(windows, (300, 300))
        m.add(0, empty)
        m.add(1, dict(empty, quality=torch.zeros(0)))
    none = TileMerger(tile_grid(0, 0, 200, 50), (0, 0)).finish()
    assert none["boxes"].shape == (0, 4)


# --------------------------------------------------------------------------------------------
# Whole images through a perfect detector
# --------------------------------------------------------------------------------------------


class BoxTheGreyLevels(torch.nn.Module):
    """A perfect detector: each grey level > 0 of a tile is one object, boxed tightly (score 0.9)."""

    def candidates(self, images):  # the detector protocol: locconf.candidates.candidates_of
        out = []
        for image in images:
            levels = torch.round(image[0] * 255).long()
            boxes = []
            for v in torch.unique(levels).tolist():
                if v == 0:
                    continue
                ys, xs = torch.nonzero(levels == v, as_tuple=True)
                boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0])
            n = len(boxes)
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4), "scores": torch.full((n,), 0.9),
                        "labels": torch.ones(n, dtype=torch.int64), "quality": torch.full((n,), 0.8)})
        return out


def _objects_image(height=300, width=500, seed=0):
    """Grey rectangles (one level each, 20-60 px, apart) on black; returns (uint8 image, boxes)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width), dtype=np.uint8)
    boxes = []
    for level in range(1, 200):
        w, h = rng.integers(20, 61, size=2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        if pixels[max(0, y - 3):y + h + 3, max(0, x - 3):x + w + 3].any():
            continue
        pixels[y:y + h, x:x + w] = level
        boxes.append([x, y, x + w, y + h])
        if len(boxes) == 25:
            break
    return pixels, sorted(map(tuple, boxes))


def test_drop_recovers_every_object_exactly_once_where_plain_nms_keeps_the_cut_pieces(tmp_path):
    pixels, truth = _objects_image()
    Image.fromarray(np.stack([pixels] * 3, axis=2)).save(tmp_path / "scene.png")
    model = BoxTheGreyLevels()
    with open_raster(tmp_path / "scene.png") as raster:
        assert (raster.height, raster.width, raster.transform) == (300, 500, None)
        dets = predict_tiled(model, raster, tile_size=128, overlap=64, batch_size=3, border="drop", progress=False)
        plain = predict_tiled(model, raster, tile_size=128, overlap=64, batch_size=3, border="none", progress=False)
    got = sorted(tuple(int(v) for v in b) for b in dets["boxes"].round().tolist())
    assert got == truth
    assert len(plain["boxes"]) > len(truth)  # cut pieces whose IoU with the whole box is below 0.5
    assert "quality" in dets and dets["quality"].eq(0.8).all()


def test_writers_csv_and_coco_results(tmp_path):
    from locconf.postprocess_files import read_detections

    dets = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 6.0, 9.0]]), "scores": torch.tensor([0.9, 0.4]),
            "labels": torch.tensor([1, 2]), "quality": torch.tensor([0.7, 0.5])}
    write_csv(dets, tmp_path / "d.csv", class_names=["__background__", "Tree", "Bird"])
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert list(rows[0]) == ["xmin", "ymin", "xmax", "ymax", "label", "score", "quality"]
    assert rows[0]["label"] == "Tree" and rows[1]["label"] == "Bird" and float(rows[0]["ymax"]) == 22.0
    write_coco_results(dets, tmp_path / "d.json", image_id=7, label_to_cat_id={1: 10, 2: 20})
    records = json.loads((tmp_path / "d.json").read_text())
    assert records[0] == {"image_id": 7, "category_id": 10, "bbox": [1.0, 2.0, 10.0, 20.0],
                          "score": pytest.approx(0.9), "quality": pytest.approx(0.7)}
    assert len(read_detections(tmp_path / "d.json")) == 2  # an input of locconf postprocess
    with pytest.raises(ValueError, match="label_to_cat_id"):
        write_coco_results(dets, tmp_path / "e.json", label_to_cat_id={1: 10})
    assert not (tmp_path / "e.json").exists()


def test_map_boxes_north_up_and_rotated():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    # north-up: 0.5 m pixels from (500000, 4000000)
    assert map_boxes(boxes, (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)).tolist() == [
        [500005.0, 3999970.0, 500015.0, 3999990.0]]
    # 90 degrees: X = -row, Y = col; the corners (10..30, 20..60) map to X -60..-20, Y 10..30
    assert map_boxes(boxes, (0.0, -1.0, 0.0, 1.0, 0.0, 0.0)).tolist() == [[-60.0, 10.0, -20.0, 30.0]]


def test_geotiff_is_read_window_by_window_and_written_in_map_coordinates(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    from locconf.experiment import predict

    pixels, truth = _objects_image(seed=1)
    path = tmp_path / "ortho.tif"
    transform = from_origin(500000.0, 4000000.0, 0.1, 0.1)
    with rasterio.open(path, "w", driver="GTiff", height=300, width=500, count=3, dtype="uint8",
                       crs="EPSG:32612", transform=transform) as ds:
        ds.write(np.stack([pixels] * 3))
    with open_raster(path) as raster:
        assert type(raster).__name__ == "_RasterioRaster"
        assert raster.transform == pytest.approx((0.1, 0.0, 500000.0, 0.0, -0.1, 4000000.0))
    dets = predict(BoxTheGreyLevels(), path, tmp_path / "ortho_det.png", tile_size=128, overlap=64, batch_size=2,
                   class_names=["__background__", "crown"])
    rows = list(csv.DictReader(open(tmp_path / "ortho_det.csv")))
    assert len(rows) == len(truth) == len(dets["boxes"])
    for r in rows:
        x1, y1, x2, y2 = (float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert float(r["map_xmin"]) == pytest.approx(500000.0 + 0.1 * x1)
        assert float(r["map_ymax"]) == pytest.approx(4000000.0 - 0.1 * y1)
        assert float(r["map_ymin"]) == pytest.approx(4000000.0 - 0.1 * y2)
        assert r["crs"] == "EPSG:32612" and r["label"] == "crown"
    assert (tmp_path / "ortho_det.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "ortho_det.json").read_text())) == len(truth)
    # the GeoJSON beside them: each box's corners in map coordinates, the raster's CRS, the same fields
    pyogrio = pytest.importorskip("pyogrio")
    shapely = pytest.importorskip("shapely")
    info, fields = pyogrio.read_info(tmp_path / "ortho_det.geojson"), None
    assert "32612" in info["crs"]
    meta, _, geoms, fields = pyogrio.raw.read(tmp_path / "ortho_det.geojson")
    names = list(meta["fields"])
    assert len(geoms) == len(rows)
    for r, g, label, score in zip(rows, geoms, fields[names.index("label")], fields[names.index("score")]):
        x1, y1, x2, y2 = shapely.from_wkb(g).bounds
        assert (x1, y1, x2, y2) == pytest.approx(tuple(float(r[k]) for k in ("map_xmin", "map_ymin", "map_xmax",
                                                                                "map_ymax")), abs=1e-6)
        assert label == "crown" and score == pytest.approx(float(r["score"]), abs=1e-5)


def test_predict_checks_before_writing(tmp_path):
    from locconf.experiment import predict

    pixels, _ = _objects_image()
    image = tmp_path / "scene.png"
    Image.fromarray(pixels).save(image)
    with pytest.raises(ValueError, match="input image"):
        predict(BoxTheGreyLevels(), image, tmp_path / "out.png", csv_path=image)
    with pytest.raises(ValueError, match="overlap"):
        predict(BoxTheGreyLevels(), image, tmp_path / "out.png", tile_size=100, overlap=100)
    with pytest.raises(ValueError, match="border"):
        predict(BoxTheGreyLevels(), image, tmp_path / "out.png", border="crop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]
    # a grey PNG (mode L) is read and drawn downscaled
    dets = predict(BoxTheGreyLevels(), image, tmp_path / "out.png", tile_size=128, overlap=64, max_side=100)
    assert len(dets["boxes"]) == 25
    assert Image.open(tmp_path / "out.png").size[0] >= 100  # draw_detections enlarges small drawings for text


# --------------------------------------------------------------------------------------------
# benchmarks/tiled_neon.py: the held-out bands as whole images
# --------------------------------------------------------------------------------------------


def _tiled_neon():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))  # for `from common import cpu_name`
    spec = importlib.util.spec_from_file_location("locconf_bench_tiled_neon", bench / "tiled_neon.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _voc(path, width, height, boxes):
    objects = "".join(f"<object><name>Tree</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                      f"<ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.write_text(f"<annotation><filename>{path.stem}.png</filename><size><width>{width}</width>"
                    f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>")
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path.with_suffix(".png"))


def test_neon_bands_are_whole_images_with_their_crowns(tmp_path):
    bench = _tiled_neon()
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    # a 500 x 600 image (band: y 400..600) and a small one from another site (whole)
    _voc(src / "2019_YELL_1_big.xml", 500, 600, [[10, 450, 60, 500],    # inside the band
                                                   [100, 380, 140, 440],  # 40 of 60 px inside: kept, clipped
                                                   [200, 300, 240, 420],  # 20 of 120 px inside: not kept
                                                   [300, 100, 340, 150]])  # above the band
    _voc(src / "OSBS_002.xml", 300, 200, [[5, 5, 25, 30]])
    gt = json.loads(bench.held_out_bands(src, out, val_height=200, tile_size=400).read_text())
    images = {im["source"]: im for im in gt["images"]}
    big, small = images["2019_YELL_1_big.png"], images["OSBS_002.png"]
    assert (big["width"], big["height"], big["window"], big["site"]) == (500, 200, [0, 400, 500, 600], "YELL")
    assert (small["width"], small["height"], small["site"]) == (300, 200, "OSBS")
    boxes = {a["image_id"]: [] for a in gt["annotations"]}
    for a in gt["annotations"]:
        boxes[a["image_id"]].append(a["bbox"])
    assert sorted(boxes[big["id"]]) == [[10.0, 50.0, 50.0, 50.0], [100.0, 0.0, 40.0, 40.0]]
    assert boxes[small["id"]] == [[5.0, 5.0, 20.0, 25.0]]
    assert Image.open(out / big["file_name"]).size == (500, 200)
    # perfect detections score AP 1 with the benchmark's evaluation
    from locconf.evaluation import load_coco

    coco = load_coco(out / "bands.json")
    records = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    assert bench.coco_scores(coco, records, [big["id"], small["id"]])["AP75"] == pytest.approx(1.0)


def test_sixteen_bit_grey_tiles_and_overview(tmp_path):
    pixels = (np.arange(300 * 400).reshape(300, 400) * 7 % 65536).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    with open_raster(tmp_path / "g16.png") as raster:
        tile = raster.read((100, 50, 228, 178))
        assert tile.shape == (3, 128, 128)
        assert torch.allclose(tile[0], torch.from_numpy(pixels[50:178, 100:228].astype(np.float32)) / 65535)
        overview, scale = raster.overview(100)
        assert scale == 0.25 and overview.shape == (3, 75, 100)
        assert float(overview.mean()) == pytest.approx(pixels.mean() / 65535, abs=0.05)  # not saturated
