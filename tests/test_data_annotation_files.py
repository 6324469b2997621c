"""`data.source: annotations`: training and validation splits from DeepForest CSVs and from crowns in map
coordinates with their GeoTIFFs, converted to COCO (cached by content) and read by CocoDetection.

References: the boxes written into the files here, and the same split given as a COCO file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from locconf.experiment import build_datasets
from locconf.experiment.config import check_config


def _png(path, w=64, h=48):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _csv(path, rows):
    path.write_text("image_path,xmin,xmax,ymin,ymax,label\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCCONF_CACHE", str(tmp_path / "cache"))


def test_csv_splits_share_the_training_categories(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "img" / name)
    _csv(tmp_path / "train.csv", [("a.png", 1, 20, 2, 30, "Tree"), ("a.png", 30, 60, 5, 40, "Snag"),
                                  ("b.png", 0, 0, 0, 0, "Tree")])
    _csv(tmp_path / "val.csv", [("c.png", 10, 30, 10, 20, "Tree")])
    train, val, val_json = build_datasets(source="annotations", root=tmp_path, train_annotations="train.csv",
                                          val_annotations="val.csv", train_images="img", val_images="img")
    assert train.class_names == val.class_names == ["__background__", "Snag", "Tree"]
    assert len(train) == 2 and train.target(1)["boxes"].shape == (0, 4)  # b.png: an image without objects
    t = train.target(0)
    assert t["boxes"].tolist() == [[1.0, 2.0, 20.0, 30.0], [30.0, 5.0, 60.0, 40.0]] and t["labels"].tolist() == [2, 1]
    assert val.target(0)["labels"].tolist() == [2]
    image, target = val[0]
    assert image.shape == (3, 48, 64) and torch.equal(target["boxes"], torch.tensor([[10.0, 10.0, 30.0, 20.0]]))
    assert json.loads(val_json.read_text())["categories"] == [{"id": 1, "name": "Snag"}, {"id": 2, "name": "Tree"}]
    again = build_datasets(source="annotations", root=tmp_path, train_annotations="train.csv",
                           val_annotations="val.csv", train_images="img", val_images="img")[2]
    assert again == val_json and len(list(val_json.parent.iterdir())) == 2  # same content, same cached file
    check_config({"model": {}, "data": {"source": "annotations", "train_annotations": "t.csv",
                                        "val_annotations": "v.shp", "annotation_format": "csv"},
                  "train": {}, "eval": {}})
    with pytest.raises(ValueError, match="image 'missing.png' not found"):
        _csv(tmp_path / "bad.csv", [("missing.png", 1, 2, 1, 2, "Tree")])
        build_datasets(source="annotations", root=tmp_path, train_annotations="bad.csv", val_annotations="val.csv",
                       train_images="img", val_images="img")


def test_crowns_and_geotiffs_as_a_split(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    shapely = pytest.importorskip("shapely")
    from rasterio.transform import from_origin

    from locconf.io.geo import write_vector

    (tmp_path / "tiles").mkdir()
    transform = from_origin(500000.0, 4000000.0, 0.5, 0.5)
    with rasterio.open(tmp_path / "tiles" / "t1.tif", "w", driver="GTiff", width=40, height=30, count=3,
                       dtype="uint8", crs="EPSG:32611", transform=transform) as dst:
        dst.write(np.full((3, 30, 40), 128, dtype=np.uint8))
    crown = shapely.Polygon([(500001.0, 3999999.0), (500006.0, 3999998.0), (500004.0, 3999990.0)])
    write_vector(tmp_path / "crowns.shp", "shp", np.array([crown], dtype=object), {}, "EPSG:32611")
    train, val, _ = build_datasets(source="annotations", root=tmp_path, train_annotations="crowns.shp",
                                   val_annotations="crowns.shp", train_images="tiles", val_images="tiles")
    assert train.class_names == ["__background__", "Tree"]  # no label field: DeepForest's "Tree"
    # pixels: col = (X - 500000) / 0.5, row = (4000000 - Y) / 0.5
    assert train.target(0)["boxes"].tolist() == [[2.0, 2.0, 12.0, 20.0]]
    image, _ = val[0]
    assert image.shape == (3, 30, 40)
