"""`locconf.io` with geometry: GeoJSON, GeoPackage and shapefiles in map coordinates against GeoTIFFs
written here with rasterio.

References: pixel coordinates of each vertex computed here from the geotransform by hand
(``col = (X - c) / a``, ``row = (Y - f) / e`` for a north-up raster), round trips through
`write_detections`, and the same ground truth given as COCO.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pytest.importorskip("pyogrio")

from rasterio.transform import Affine, from_origin  # noqa: E402

from locconf.cli import main as cli_main  # noqa: E402
from locconf.cli import run_command as main  # noqa: E402
from locconf.io import GeoDependencyError, read_annotations, read_detections, write_detections  # noqa: E402
from locconf.io.geo import box_polygons, raster_info, read_vector, write_vector  # noqa: E402
from locconf.postprocess_files import postprocess_file  # noqa: E402

CRS = "EPSG:32617"
ORIGIN = (402345.25, 4501234.75)  # UTM metres: large coordinates, as real ones
PIXEL = 0.1
W, H = 200, 150


def geotiff(path, transform=None, width=W, height=H, crs=CRS):
    transform = transform or from_origin(*ORIGIN, PIXEL, PIXEL)
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(rng.integers(0, 255, (3, height, width), dtype=np.uint8))
    return path


def to_map(cols, rows):
    return ORIGIN[0] + PIXEL * np.asarray(cols, float), ORIGIN[1] - PIXEL * np.asarray(rows, float)


def crowns_in_pixels():
    """Irregular crowns (hexagons) around centres, in pixels: their vertices, and their pixel bounds by hand."""
    centres = [(30.3, 40.7, 12.0), (100.1, 75.25, 20.5), (160.0, 30.0, 9.0), (195.0, 140.0, 15.0)]  # last: on the edge
    polys, bounds = [], []
    for cx, cy, r in centres:
        ang = np.linspace(0, 2 * np.pi, 7)[:-1] + 0.3
        cols, rows = cx + r * np.cos(ang), cy + 0.8 * r * np.sin(ang)
        polys.append((cols, rows))
        bounds.append([cols.min(), rows.min(), cols.max(), rows.max()])
    return polys, np.array(bounds)


def crowns_file(path, fmt, fields=None, crs=CRS, reproject_to=None):
    polys, _ = crowns_in_pixels()
    geoms = []
    for cols, rows in polys:
        x, y = to_map(cols, rows)
        if reproject_to is not None:
            from rasterio.warp import transform as warp

            x, y = warp(CRS, reproject_to, x, y)
        geoms.append(shapely.Polygon(np.stack([x, y], 1)))
    fields = fields or {"label": np.array(["Tree"] * len(geoms), dtype=object)}
    return write_vector(path, fmt, np.array(geoms, dtype=object), fields, reproject_to or crs)


@pytest.fixture()
def tile(tmp_path):
    return geotiff(tmp_path / "tile.tif")


def _xyxy(recs):
    return np.array([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                     for r in recs]).reshape(-1, 4)


@pytest.mark.parametrize("fmt", ["geojson", "shp", "gpkg"])
def test_crowns_in_map_coordinates_become_the_pixel_bounds_of_their_vertices(tmp_path, tile, fmt):
    path = crowns_file(tmp_path / f"crowns.{fmt}", fmt)
    data = read_annotations(path, images=[tile])
    _, bounds = crowns_in_pixels()
    expected = bounds.copy()
    expected[:, [0, 2]] = expected[:, [0, 2]].clip(0, W)  # the edge crown is clipped to the raster
    expected[:, [1, 3]] = expected[:, [1, 3]].clip(0, H)
    got = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                    for a in data["annotations"]])
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert data["images"] == [{"id": 1, "file_name": str(tile), "width": W, "height": H}]
    assert data["categories"] == [{"id": 1, "name": "Tree"}]


def test_crowns_in_another_crs_are_reprojected(tmp_path, tile, caplog):
    path = crowns_file(tmp_path / "crowns.geojson", "geojson", reproject_to="EPSG:4326")
    with caplog.at_level(logging.INFO, logger="locconf"):
        data = read_annotations(path, images=[tile])
    assert "reprojecting from EPSG:4326 to EPSG:32617" in caplog.text
    _, bounds = crowns_in_pixels()
    got = np.array([a["bbox"][:2] for a in data["annotations"]])
    np.testing.assert_allclose(got[:3], bounds[:3, :2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["geojson", "shp", "gpkg"])
@pytest.mark.parametrize("rotated", [False, True])
def test_write_detections_in_map_coordinates_reads_back_to_the_same_pixels(tmp_path, fmt, rotated):
    transform = from_origin(*ORIGIN, PIXEL, PIXEL)
    if rotated:
        transform = transform @ Affine.rotation(17.0)
    tif = geotiff(tmp_path / "r.tif", transform)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 150
    boxes = torch.cat([xy, xy + 1 + torch.rand(12, 2, generator=gen, dtype=torch.float64) * 40], 1)
    dets = {"boxes": boxes, "scores": torch.rand(12, generator=gen, dtype=torch.float64),
            "labels": torch.ones(12, dtype=torch.long), "quality": torch.rand(12, generator=gen, dtype=torch.float64)}
    out = write_detections(tmp_path / f"d.{fmt}", dets, image_path="r.tif", transform=transform, crs=CRS,
                           class_names=["__background__", "Tree"])
    geoms, fields, crs = read_vector(out)
    assert rasterio.crs.CRS.from_user_input(crs) == rasterio.crs.CRS.from_user_input(CRS)
    a, b, c, d, e, f = tuple(transform)[:6]
    x, y = float(boxes[0, 0]), float(boxes[0, 1])
    np.testing.assert_allclose(shapely.get_coordinates(geoms[:1])[0], [a * x + b * y + c, d * x + e * y + f],
                               atol=1e-6)  # map coordinates, not pixels
    recs = read_detections(out, images=[tif])  # boxes reaching past the raster stay as they are
    assert len(recs) == 12
    for r in recs:
        k = int(np.argmin(np.abs(dets["scores"].numpy() - r["score"])))
        np.testing.assert_allclose(_xyxy([r])[0], boxes[k].numpy(), atol=1e-6, rtol=0)
        assert r["quality"] == pytest.approx(float(dets["quality"][k]), abs=1e-12)
        assert r["image_path"] == "r.tif" and r["category_id"] == 1


def test_one_crowns_file_against_several_tiles(tmp_path):
    left = geotiff(tmp_path / "left.tif")
    right = geotiff(tmp_path / "right.tif", from_origin(ORIGIN[0] + 120 * PIXEL, ORIGIN[1], PIXEL, PIXEL))
    path = crowns_file(tmp_path / "crowns.shp", "shp")
    data = read_annotations(path, images=[tmp_path])  # a folder: its .tif files
    names = {im["id"]: im["file_name"] for im in data["images"]}
    assert sorted(names.values()) == [str(left), str(right)]
    per_image = {}
    for a in data["annotations"]:
        per_image.setdefault(names[a["image_id"]], []).append(a["bbox"])
    _, bounds = crowns_in_pixels()
    assert len(per_image[str(left)]) == 4  # every crown touches the left tile (the last one clipped)
    shifted = bounds[bounds[:, 2] > 120] - [120, 0, 120, 0]  # the crowns that reach into the right tile
    assert len(shifted) == 2
    got = np.array(sorted(per_image[str(right)]))
    expected = np.array(sorted([[max(b[0], 0), b[1], min(b[2], W) - max(b[0], 0), min(b[3], H) - b[1]]
                                for b in shifted]))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_image_path_field_names_each_features_raster(tmp_path, tile):
    fields = {"image_path": np.array(["tile.tif"] * 4, dtype=object), "label": np.array([1, 1, 2, 2]),
              "site": np.array(["OSBS"] * 4, dtype=object)}
    path = crowns_file(tmp_path / "crowns.gpkg", "gpkg", fields=fields)
    data = read_annotations(path)  # the raster is found beside the file
    assert data["images"][0]["file_name"] == "tile.tif" and data["images"][0]["site"] == "OSBS"
    assert [a["category_id"] for a in data["annotations"]] == [1, 1, 2, 2]
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    (tmp_path / "crowns.gpkg").rename(elsewhere / "crowns.gpkg")
    with pytest.raises(ValueError, match="the raster of image_path 'tile.tif' is not among the images given"):
        read_annotations(elsewhere / "crowns.gpkg")
    assert len(read_annotations(elsewhere / "crowns.gpkg", images=[tmp_path])["annotations"]) == 4


def test_pixel_coordinate_vectors_and_bad_geometry(tmp_path, tile):
    boxes = np.array([[1.0, 2.0, 10.0, 20.0], [30.0, 30.0, 40.0, 45.0]])
    write_vector(tmp_path / "px.geojson", "geojson", box_polygons(boxes), {"label": np.array(["Tree", "Tree"],
                                                                                                dtype=object)})
    data = read_annotations(tmp_path / "px.geojson")  # no CRS, no raster: pixels of one image
    assert [a["bbox"] for a in data["annotations"]] == [[1.0, 2.0, 9.0, 18.0], [30.0, 30.0, 10.0, 15.0]]
    crowns_file(tmp_path / "m.geojson", "geojson")
    with pytest.raises(ValueError, match="in map coordinates .* no raster was given .* --images"):
        read_annotations(tmp_path / "m.geojson")
    with pytest.raises(ValueError, match="none of its 4 features overlaps the raster"):
        read_annotations(tmp_path / "m.geojson", images=[geotiff(tmp_path / "far.tif",
                                                                 from_origin(0.0, 100.0, PIXEL, PIXEL))])
    import pyogrio

    pyogrio.raw.write(tmp_path / "pts.geojson", shapely.to_wkb(np.array([shapely.Point(ORIGIN)], dtype=object)),
                      [], [], geometry_type="Point", crs=CRS, driver="GeoJSON")
    with pytest.raises(ValueError, match="feature 0 is a Point, not a polygon"):
        read_annotations(tmp_path / "pts.geojson", images=[tile])


def test_deepforest_csv_scored_against_a_shapefile_of_crowns(tmp_path, tile, capsys):
    crowns = crowns_file(tmp_path / "crowns.shp", "shp")
    _, bounds = crowns_in_pixels()
    gt = read_annotations(crowns, images=[tile])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rows = ["image_path,xmin,xmax,ymin,ymax,label,scores"]
    for k, b in enumerate(bounds[:3]):
        rows.append(f"tile.tif,{b[0] + 1},{b[2]},{b[1]},{b[3] - 1},Tree,{0.9 - 0.1 * k}")
    rows.append("tile.tif,150,190,100,140,Tree,0.5")  # a false positive
    (tmp_path / "preds.csv").write_text("\n".join(rows) + "\n")
    main(["postprocess", str(tmp_path / "preds.csv"), "--gt", str(crowns), "--images", str(tile),
          "--out", str(tmp_path / "dets.geojson"), "--no-progress"])
    out = capsys.readouterr().out
    via_coco = main(["postprocess", str(tmp_path / "preds.csv"), "--gt", str(tmp_path / "gt.json"),
                     "--out", str(tmp_path / "dets.csv"), "--no-progress"])
    assert via_coco == 0
    out_coco = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("| output (nms)")]
    assert table and table == [ln for ln in out_coco.splitlines() if ln.startswith("| output (nms)")]
    assert table[0].endswith("| 75.0 | 75.0 |")  # 3 of 4 crowns found; 3 of 4 predictions right
    geoms, fields, crs = read_vector(tmp_path / "dets.geojson")  # GIS output in the raster's CRS
    assert rasterio.crs.CRS.from_user_input(crs).to_epsg() == 32617 and len(geoms) == 4
    assert list(fields["image_path"]) == ["tile.tif"] * 4
    assert shapely.get_coordinates(geoms).min(0)[0] > ORIGIN[0]


def test_missing_geo_dependency_says_what_to_install(tmp_path, tile, monkeypatch, capsys):
    crowns = crowns_file(tmp_path / "crowns.geojson", "geojson")
    monkeypatch.setitem(sys.modules, "pyogrio", None)  # as if not installed
    with pytest.raises(GeoDependencyError, match=r'pyogrio is not installed.*pip install "locconf\[geo\]"'):
        read_annotations(crowns, images=[tile])
    assert cli_main(["postprocess", str(crowns), "--out", str(tmp_path / "o.json"), "--images", str(tile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "locconf[geo]"' in err[0] and err[0].startswith("locconf postprocess: error:")
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(ImportError, match="rasterio is not installed"):
        raster_info(tile)


@pytest.mark.parametrize("fmt", ["geojson", "gpkg", "shp"])
def test_postprocess_vector_output_round_trips(tmp_path, tile, fmt):
    _, bounds = crowns_in_pixels()
    rows = ["image_path,xmin,ymin,xmax,ymax,label,score,quality,note"]
    rows += [f"tile.tif,{b[0]},{b[1]},{b[2]},{b[3]},Tree,{0.9 - 0.1 * k},{0.5 + 0.1 * k},n{k}"
             for k, b in enumerate(bounds)]
    (tmp_path / "px").mkdir()
    for folder in (tmp_path, tmp_path / "px"):  # beside the raster, and in a folder without it
        (folder / "p.csv").write_text("\n".join(rows) + "\n")
    for images, name in (([tile], f"map.{fmt}"), (None, f"found.{fmt}"), (None, f"px/pixels.{fmt}")):
        src = tmp_path / Path(name).parent / "p.csv"
        postprocess_file(src, tmp_path / name, method="none", images=images, progress=False)
        _, _, crs = read_vector(tmp_path / name)
        assert (crs is None) == name.startswith("px/")  # the raster is found beside the input, else pixels
        back = read_detections(tmp_path / name, images=images)
        ref = read_detections(src)
        assert len(back) == len(ref) == 4
        for r, s in zip(sorted(back, key=lambda r: -r["score"]), ref):
            np.testing.assert_allclose(r["bbox"], s["bbox"], atol=1e-6, rtol=0)
            assert (r["score"], r["quality"], r["note"], r["category_id"]) == pytest.approx(
                (s["score"], s["quality"], s["note"], s["category_id"]))


def test_no_detections_in_every_format_give_empty_files_and_empty_output(tmp_path):
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    for fmt in ("csv", "json", "jsonl", "geojson", "gpkg", "shp"):
        path = write_detections(tmp_path / f"e.{fmt}", empty, image_path="t.tif")
        assert read_detections(path) == [], fmt
        report = postprocess_file(path, tmp_path / f"out.{fmt}", progress=False)
        assert report["detections"] == 0 and read_detections(tmp_path / f"out.{fmt}") == [], fmt
