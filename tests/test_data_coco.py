import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from locconf.data import CocoDetection, collate_fn
from locconf.data.transforms import RandomHorizontalFlip


def _valid_coco():
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 20, "height": 10, "site": "YELL"},
            {"id": 11, "file_name": "sub/b.png", "width": 8, "height": 6},
            {"id": 12, "file_name": "empty.png", "width": 5, "height": 5},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0.5, 0.5, 2.0, 1.5]},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [2, 1, 4, 3], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


def _write(tmp_path, coco):
    """Write ``coco`` as ann.json and the images of the *valid* records (so mutations need no files)."""
    for im in _valid_coco()["images"]:
        p = tmp_path / im["file_name"]
        p.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(im["id"])
        arr = rng.integers(0, 256, size=(im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(p)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_valid_dataset(tmp_path):
    ds = CocoDetection(tmp_path, _write(tmp_path, _valid_coco()))
    assert len(ds) == 3 and ds.num_classes == 2
    # categories sorted by COCO id: cat (3) -> 1, dog (7) -> 2
    assert ds.label_to_cat_id == {1: 3, 2: 7}
    assert ds.cat_id_to_label == {3: 1, 7: 2}
    assert ds.class_names == ["__background__", "cat", "dog"]
    assert ds.category_ids(torch.tensor([2, 1, 1])).tolist() == [7, 3, 3]

    img, t = ds[0]
    assert img.shape == (3, 10, 20) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    expected = np.asarray(Image.open(tmp_path / "a.png")).transpose(2, 0, 1) / 255.0
    assert torch.allclose(img, torch.from_numpy(expected).float())
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0], [0.5, 0.5, 2.5, 2.0]]
    assert t["labels"].tolist() == [2, 1]
    assert t["area"].tolist() == [12.0, 3.0]
    assert t["iscrowd"].tolist() == [0, 0]
    assert t["image_id"] == 10 and t["site"] == "YELL"

    _, t = ds[1]  # its only annotation is a crowd box: not a training target
    assert "site" not in t and t["boxes"].shape == (0, 4) and t["iscrowd"].tolist() == []
    _, t = ds[2]  # no objects
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["area"].shape == (0,)
    assert ds.num_boxes() == 2 and ds.image_ids == [10, 11, 12]
    assert ds.clipped == 0 and sum(ds.skipped.values()) == 0 and ds.crowd == 1


def test_crowd_boxes_are_dropped_and_counted_or_kept_on_request(tmp_path, caplog):
    coco = _valid_coco()
    coco["annotations"].append({"id": 4, "image_id": 10, "category_id": 7, "bbox": [5, 5, 4, 4], "iscrowd": 1})
    coco["annotations"].append({"id": 5, "image_id": 10, "category_id": 7, "bbox": [0, 0, 0, 3], "iscrowd": 1})
    path = _write(tmp_path, coco)
    with caplog.at_level(logging.INFO, logger="locconf.data.coco"):
        ds = CocoDetection(tmp_path, path)
    assert ds.crowd == 3 and sum(ds.skipped.values()) == 0  # a crowd box is counted as crowd, whatever its size
    assert "3 crowd annotations" in caplog.text
    assert ds.target(0)["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0], [0.5, 0.5, 2.5, 2.0]]
    assert all(ds.target(i)["iscrowd"].sum() == 0 for i in range(len(ds)))
    kept = CocoDetection(tmp_path, path, keep_crowd=True)
    assert kept.crowd == 0 and kept.skipped == {"zero_or_negative_size": 1}
    assert kept.target(0)["iscrowd"].tolist() == [0, 0, 1] and kept.target(1)["iscrowd"].tolist() == [1]
    assert kept.target(0)["boxes"][2].tolist() == [5.0, 5.0, 9.0, 9.0]
    with pytest.raises(ValueError, match="keep_crowd"):
        CocoDetection(tmp_path, path, keep_crowd=1)


def test_category_ids_rejects_out_of_range(tmp_path):
    ds = CocoDetection(tmp_path, _write(tmp_path, _valid_coco()))
    with pytest.raises(ValueError, match="labels"):
        ds.category_ids(torch.tensor([0, 1]))


def test_transforms_and_collate(tmp_path):
    ds = CocoDetection(tmp_path, _write(tmp_path, _valid_coco()), transforms=RandomHorizontalFlip(1.0))
    img, t = ds[0]
    assert t["boxes"][0].tolist() == [16.0, 2.0, 19.0, 6.0]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images] == [(3, 10, 20), (3, 6, 8), (3, 5, 5)]
    assert [tg["image_id"] for tg in targets] == [10, 11, 12]
    # the dataset's stored targets are not modified by transforms
    assert ds.target(0)["boxes"][0].tolist() == [1.0, 2.0, 4.0, 6.0]


def test_clipping_and_skips_are_counted(tmp_path, caplog):
    coco = _valid_coco()
    coco["annotations"] = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [-2, 3, 5, 4]},  # clipped at x=0
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [18, 8, 5, 5]},  # clipped at W, H
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [25, 1, 3, 3]},  # fully outside
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [4, 4, 0, 3]},  # zero width
        {"id": 5, "image_id": 10, "category_id": 3, "bbox": [4, 4, 3, -1]},  # negative height
        {"id": 6, "image_id": 11, "category_id": 7, "bbox": [1, 1, 2, 2]},  # fine
    ]
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, _write(tmp_path, coco))
    assert ds.clipped == 2
    assert ds.skipped == {"outside_image": 1, "zero_or_negative_size": 2}
    assert "clipped 2" in caplog.text
    t = ds.target(0)
    assert t["boxes"].tolist() == [[0.0, 3.0, 3.0, 7.0], [18.0, 8.0, 20.0, 10.0]]
    assert t["area"].tolist() == [12.0, 4.0]
    assert ds.target(1)["boxes"].tolist() == [[1.0, 1.0, 3.0, 3.0]]


def _mutations():
    def m(fn):
        coco = _valid_coco()
        fn(coco)
        return coco

    return {
        "missing images": (m(lambda c: c.pop("images")), "missing top-level key 'images'"),
        "missing annotations": (m(lambda c: c.pop("annotations")), "missing top-level key 'annotations'"),
        "missing categories": (m(lambda c: c.pop("categories")), "missing top-level key 'categories'"),
        "images not a list": (m(lambda c: c.update(images={"a": 1})), "'images' must be a list"),
        "empty categories": (m(lambda c: c.update(categories=[])), "'categories' is empty"),
        "category without name": (m(lambda c: c["categories"][1].pop("name")), r"categories\[1\].*'name'"),
        "category id string": (m(lambda c: c["categories"][0].update(id="7")), r"categories\[0\].*'id'"),
        "duplicate category": (m(lambda c: c["categories"].append({"id": 3, "name": "x"})), "repeats category"),
        "image not an object": (m(lambda c: c["images"].append(5)), r"images\[3\] is not an object"),
        "image id missing": (m(lambda c: c["images"][0].pop("id")), r"images\[0\].*'id'"),
        "image id bool": (m(lambda c: c["images"][0].update(id=True)), r"images\[0\].*'id'"),
        "file_name missing": (m(lambda c: c["images"][1].pop("file_name")), r"images\[1\].*'file_name'"),
        "zero width": (m(lambda c: c["images"][2].update(width=0)), r"images\[2\].*'width'"),
        "height float": (m(lambda c: c["images"][2].update(height=5.5)), r"images\[2\].*'height'"),
        "duplicate image id": (m(lambda c: c["images"][1].update(id=10)), "repeats image id 10"),
        "site not a string": (m(lambda c: c["images"][0].update(site=3)), "'site'"),
        "unknown image id": (m(lambda c: c["annotations"][1].update(image_id=99)), r"annotations\[1\].*unknown image id 99"),
        "unknown category": (m(lambda c: c["annotations"][2].update(category_id=1)), r"annotations\[2\].*unknown category id 1"),
        "bbox too short": (m(lambda c: c["annotations"][0].update(bbox=[1, 2, 3])), r"annotations\[0\].*'bbox'"),
        "bbox string": (m(lambda c: c["annotations"][0].update(bbox=[1, 2, "3", 4])), r"annotations\[0\].*'bbox'"),
        "bbox nan": (m(lambda c: c["annotations"][0].update(bbox=[1, 2, float("nan"), 4])), r"annotations\[0\].*'bbox'"),
        "bbox missing": (m(lambda c: c["annotations"][0].pop("bbox")), r"annotations\[0\].*'bbox'"),
        "iscrowd 2": (m(lambda c: c["annotations"][0].update(iscrowd=2)), "iscrowd"),
        "area string": (m(lambda c: c["annotations"][0].update(area="big")), "'area'"),
        "image_id missing": (m(lambda c: c["annotations"][0].pop("image_id")), r"annotations\[0\].*'image_id'"),
        "duplicate annotation id": (m(lambda c: c["annotations"][2].update(id=1)),
                                    r"annotations\[2\] repeats annotation id 1\b"),
        "annotation id not int": (m(lambda c: c["annotations"][1].update(id=True)), r"annotations\[1\].*'id'"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_malformed_annotations_raise(tmp_path, case):
    coco, pattern = _mutations()[case]
    path = _write(tmp_path, coco)
    with pytest.raises(ValueError, match=pattern) as err:
        CocoDetection(tmp_path, path)
    assert str(path) in str(err.value)


def test_not_json_and_wrong_top_level(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(tmp_path, path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="top level"):
        CocoDetection(tmp_path, path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    coco = _valid_coco()
    path = _write(tmp_path, coco)
    (tmp_path / "sub" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images\[1\] \(id 11\).*sub/b.png"):
        CocoDetection(tmp_path, path)
    # without the eager check the error comes at load time, still naming the file
    ds = CocoDetection(tmp_path, path, check_files=False)
    ds[0]
    with pytest.raises(FileNotFoundError, match="b.png"):
        ds[1]


def test_image_size_mismatch_at_load(tmp_path):
    coco = _valid_coco()
    path = _write(tmp_path, coco)
    bad = copy.deepcopy(coco)
    bad["images"][0]["width"] = 21
    path.write_text(json.dumps(bad))
    ds = CocoDetection(tmp_path, path)
    with pytest.raises(ValueError, match="a.png.*says 21x10"):
        ds[0]


def test_latin1_annotation_file_names_the_file(tmp_path):
    coco = _valid_coco()
    coco["categories"][0]["name"] = "ch\u00eane"  # a French oak, written below in Latin-1
    path = _write(tmp_path, coco)
    path.write_bytes(json.dumps(coco, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"ann\.json: not UTF-8 text \(byte 0xea"):
        CocoDetection(tmp_path, path)


def test_truncated_and_corrupt_images_name_file_and_id(tmp_path):
    path = _write(tmp_path, _valid_coco())
    ds = CocoDetection(tmp_path, path)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ann\.json: image id 10: .*a\.png: cannot read the image.*truncated"):
        ds[0]
    (tmp_path / "sub" / "b.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"image id 11: .*b\.png: cannot read the image"):
        ds[1]


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    """A 16-bit grey PNG used to be clipped at 255 by Pillow's RGB conversion: 99.6 % of pixels at 1.0."""
    from locconf.data import load_image

    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    expected = torch.from_numpy(grey.astype(np.float64) / 65535.0).float()
    for c in range(3):
        assert torch.equal(img[c], expected)
    assert (img == 1.0).float().mean() == 0.0
    # 8-bit images keep their /255 scaling
    Image.fromarray((grey >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    assert torch.equal(load_image(tmp_path / "g8.png")[0], torch.from_numpy((grey >> 8).astype(np.float32) / 255.0))


def test_float_images_are_refused_and_missing_files_named(tmp_path):
    from locconf.data import load_image

    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"f\.tiff: Pillow mode 'F'"):
        load_image(tmp_path / "f.tiff")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
