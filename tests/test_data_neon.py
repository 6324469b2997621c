import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locconf.data import CocoDetection
from locconf.data.neon import (
    convert_voc_to_coco,
    crop_boxes_to_window,
    fetch_deepforest_data,
    neon_trees,
    read_voc,
    site_of,
    tile_starts,
)

# fixture geometry: a 250x230 "YELL" image, tiles of 100 px with 20 px overlap, val band 80 px
W, H, TILE, OVERLAP, BAND = 250, 230, 100, 20, 80


def _voc(path: Path, filename: str, w: int, h: int, objects: list[tuple[str, tuple]]) -> None:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path.write_text(
        f"<annotation><folder>data</folder><filename>{filename}</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def _coded_image(w: int, h: int, tag: int) -> np.ndarray:
    """R = x, G = y, B = tag: every pixel says where it came from."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, np.full_like(x, tag)], axis=-1).astype(np.uint8)


YELL_BOXES = {
    "half_in_first_tile": (90, 10, 110, 30),  # exactly half inside tile x 0..100 -> kept there
    "quarter_in_first_tile": (95, 40, 115, 60),  # a quarter inside tile x 0..100 -> dropped there
    "mostly_val": (20, 140, 40, 170),  # 1/3 above the band -> val only
    "mostly_train": (200, 135, 220, 155),  # 3/4 above the band -> train only
    "across_val_tiles": (115, 180, 145, 200),  # val tiles split at x=125: 1/3 left, 2/3 right
    "too_wide": (10, 70, 240, 80),  # wider than any tile: dropped everywhere
}


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    Image.fromarray(_coded_image(W, H, 1)).save(d / "2019_YELL_2_000_000_image.png")
    _voc(d / "2019_YELL_2_000_000_image.xml", "2019_YELL_2_000_000_image.png", W, H,
         [("Tree", b) for b in YELL_BOXES.values()])
    Image.fromarray(_coded_image(60, 50, 2)).save(d / "SOAP_061.png")
    _voc(d / "SOAP_061.xml", "SOAP_061.png", 60, 50, [("Alive", (1, 2, 11, 12)), ("Dead", (30, 30, 60, 50))])
    # like the real OSBS_029.xml, the XML names a .tif but the PNG next to it is used
    Image.fromarray(_coded_image(40, 40, 3)).save(d / "OSBS_029.png")
    _voc(d / "OSBS_029.xml", "OSBS_029.tif", 40, 40, [("Tree", (5, 5, 15, 15))])
    return d


@pytest.fixture
def converted(src, tmp_path):
    out = tmp_path / "out"
    counts = convert_voc_to_coco(src, out, tile_size=TILE, overlap=OVERLAP, val_height=BAND, progress=False)
    coco = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val")}
    return out, counts, coco


def _boxes_of(coco, window):
    ids = [im["id"] for im in coco["images"] if im["window"] == list(window)]
    assert len(ids) == 1, window
    return sorted(
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
        for a in coco["annotations"] if a["image_id"] == ids[0]
    )


def test_tile_starts_and_clip():
    assert tile_starts(0, 150, 100, 20) == [0, 50]
    assert tile_starts(0, 250, 100, 20) == [0, 80, 150]
    assert tile_starts(0, 100, 100, 20) == [0]
    assert tile_starts(0, 60, 100, 0) == [0]
    assert tile_starts(0, 1200, 400, 0) == [0, 400, 800]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(0, 500, 100, 100)
    boxes = np.array([[90.0, 10, 110, 30], [95, 40, 115, 60], [120, 0, 130, 5]])
    out, keep = crop_boxes_to_window(boxes, (0, 0, 100, 100), 0.5)
    assert keep.tolist() == [True, False, False]
    assert out.tolist() == [[90, 10, 100, 30]]
    out, keep = crop_boxes_to_window(boxes, (80, 0, 180, 100), 0.5)
    assert out.tolist() == [[10, 10, 30, 30], [15, 40, 35, 60], [40, 0, 50, 5]]


def test_site_of():
    assert site_of("2019_YELL_2_528000_4978000_image_crop2.png") == "YELL"
    assert site_of("OSBS_029.png") == "OSBS"
    assert site_of("SOAP_061") == "SOAP"
    assert site_of("random.png") == "random"


def test_read_voc(src, tmp_path):
    voc = read_voc(src / "OSBS_029.xml")
    assert voc.image_path.name == "OSBS_029.png"
    assert (voc.width, voc.height) == (40, 40)
    assert voc.boxes.tolist() == [[5, 5, 15, 15]] and voc.names == ["Tree"]
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size><width>4</width>")
    with pytest.raises(ValueError, match="bad.xml.*not valid XML"):
        read_voc(bad)
    _voc(bad, "x.png", 10, 10, [("Tree", (1, 2, 3, 4))])
    bad.write_text(bad.read_text().replace("<ymax>4</ymax>", ""))
    with pytest.raises(ValueError, match="bad.xml: object 0 needs a numeric <bndbox/ymax>"):
        read_voc(bad)
    _voc(bad, "missing.png", 10, 10, [])
    with pytest.raises(FileNotFoundError, match="no image found"):
        read_voc(bad)


def test_layout_and_counts(converted):
    out, counts, coco = converted
    train, val = coco["train"], coco["val"]
    # train: y in {0, 50} (region 0..150) x x in {0, 80, 150}; val band: two 125x80 tiles + 2 small images
    assert sorted(im["window"] for im in train["images"]) == sorted(
        [x, y, x + 100, y + 100] for x in (0, 80, 150) for y in (0, 50)
    )
    yell_val = sorted(im["window"] for im in val["images"] if im["site"] == "YELL")
    assert yell_val == [[0, 150, 125, 230], [125, 150, 250, 230]]
    assert counts["train"]["images"] == 6 and counts["val"]["images"] == 4
    assert counts["train"]["boxes"] == len(train["annotations"])
    assert counts["val"]["boxes"] == len(val["annotations"])
    assert counts["val"]["sites"] == {
        "YELL": {"images": 2, "boxes": 2}, "SOAP": {"images": 1, "boxes": 2}, "OSBS": {"images": 1, "boxes": 1}
    }
    assert set(counts["train"]["sites"]) == {"YELL"}
    assert counts["source"] == {"images": 3, "boxes": 9, "labels": {"Tree": 7, "Alive": 1, "Dead": 1}}
    assert counts["dropped"] == 1  # too_wide
    assert counts["val_fraction"] == pytest.approx(5 / 9)
    # every image record names its site and source; files exist and have the recorded size
    for split in ("train", "val"):
        for im in coco[split]["images"]:
            assert im["file_name"].startswith(f"{split}/")
            with Image.open(out / im["file_name"]) as f:
                assert f.size == (im["width"], im["height"])
    ids = [im["id"] for s in ("train", "val") for im in coco[s]["images"]]
    assert len(set(ids)) == len(ids)


def test_half_visible_rule_hand_computed(converted):
    _, _, coco = converted
    train, val = coco["train"], coco["val"]
    # tile (0, 0)-(100, 100): half_in_first_tile clipped to x<=100; quarter_in_first_tile dropped
    assert _boxes_of(train, (0, 0, 100, 100)) == [[90, 10, 100, 30]]
    # tile (80, 0)-(180, 100): both whole, shifted by 80
    assert _boxes_of(train, (80, 0, 180, 100)) == [[10, 10, 30, 30], [15, 40, 35, 60]]
    # tile (150, 50)-(250, 150): mostly_train clipped at the band (y=150 -> 100 in the tile)
    assert _boxes_of(train, (150, 50, 250, 150)) == [[50, 85, 70, 100]]
    # mostly_val is in no train tile (1/3 visible at most)
    assert _boxes_of(train, (0, 50, 100, 150)) == []
    # val band: mostly_val clipped to y>=150; across_val_tiles only in the right tile
    assert _boxes_of(val, (0, 150, 125, 230)) == [[20, 0, 40, 20]]
    assert _boxes_of(val, (125, 150, 250, 230)) == [[0, 30, 20, 50]]


def test_no_pixel_in_both_splits(converted):
    """Decode every tile's pixels back to source coordinates (R = x, G = y, B = source)."""
    out, _, coco = converted
    seen = {}
    for split in ("train", "val"):
        coords = set()
        for im in coco[split]["images"]:
            arr = np.asarray(Image.open(out / im["file_name"])).astype(np.int64)
            x1, y1, x2, y2 = im["window"]
            yy, xx = np.mgrid[y1:y2, x1:x2]
            assert (arr[..., 0] == xx).all() and (arr[..., 1] == yy).all()  # window metadata is true
            coords |= set(zip(arr[..., 2].ravel().tolist(), arr[..., 0].ravel().tolist(), arr[..., 1].ravel().tolist()))
        seen[split] = coords
    assert not seen["train"] & seen["val"]
    assert max(y for tag, _, y in seen["train"] if tag == 1) == H - BAND - 1
    # together the splits cover the whole YELL image
    assert sum(1 for p in seen["train"] | seen["val"] if p[0] == 1) == W * H


def test_labels_and_sites(converted):
    out, _, coco = converted
    for split in ("train", "val"):
        assert coco[split]["categories"] == [{"id": 1, "name": "tree"}]
        assert {a["category_id"] for a in coco[split]["annotations"]} <= {1}
    soap = [im for im in coco["val"]["images"] if im["site"] == "SOAP"]
    assert len(soap) == 1 and soap[0]["window"] == [0, 0, 60, 50] and soap[0]["source"] == "SOAP_061.png"
    ds = CocoDetection(out, out / "val.json")
    assert ds.num_classes == 1 and ds.class_names == ["__background__", "tree"]
    k = ds.image_ids.index(soap[0]["id"])
    img, t = ds[k]
    assert t["site"] == "SOAP" and t["labels"].tolist() == [1, 1]
    assert t["boxes"].tolist() == [[1, 2, 11, 12], [30, 30, 60, 50]]
    assert img.shape == (3, 50, 60)
    train = CocoDetection(out, out / "train.json")
    assert train.skipped == {} and train.clipped == 0 and {train.target(i)["site"] for i in range(len(train))} == {"YELL"}


def test_bad_arguments(src, tmp_path):
    with pytest.raises(ValueError, match="val_height"):
        convert_voc_to_coco(src, tmp_path / "o", tile_size=100, overlap=20, val_height=400, progress=False)
    with pytest.raises(ValueError, match="overlap"):
        convert_voc_to_coco(src, tmp_path / "o", tile_size=100, overlap=100, val_height=50, progress=False)
    with pytest.raises(FileNotFoundError, match="no VOC"):
        convert_voc_to_coco(tmp_path / "empty_dir_that_has_no_xml", tmp_path / "o", progress=False)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOCCONF_NETWORK_TESTS") == "0", reason="LOCCONF_NETWORK_TESTS=0")
def test_real_neon_conversion(tmp_path):
    """The real data: fetches the 20 MB wheel once into the default cache (about 2 s here), converts
    in about 2 s; skipped when pip or the package index cannot be reached within a minute."""
    try:
        fetch_deepforest_data(timeout_s=60)
    except RuntimeError as e:
        pytest.skip(f"could not fetch the deepforest wheel: {e}")
    counts = neon_trees(tmp_path / "neon", progress=False)
    assert counts["source"]["images"] == 4
    assert counts["source"]["boxes"] == 951
    assert set(counts["source"]["labels"]) == {"Tree", "Alive", "Dead"}
    assert set(counts["val"]["sites"]) == {"YELL", "OSBS", "SOAP"}
    assert set(counts["train"]["sites"]) == {"YELL"}
    assert counts["val_fraction"] >= 0.25
    assert counts["val"]["sites"]["OSBS"]["boxes"] == 61 and counts["val"]["sites"]["SOAP"]["boxes"] == 37
    val = CocoDetection(tmp_path / "neon", tmp_path / "neon" / "val.json")
    assert val.num_boxes() == counts["val"]["boxes"] and val.skipped == {}
