"""`locconf.io` without geometry: CSV (DeepForest's columns, by name), COCO results and instances, format
by extension, string image keys and label names mapped consistently, fields kept through
`locconf postprocess`.

References: the same boxes written here as COCO results with integer ids (the path the older
tests check against the Python API), hand-written CSV files in both column orders, and round trips
through `write_detections`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from locconf.cli import run_command as main
from locconf.io import FORMATS, Categories, format_of, read_annotations, read_detections, write_detections
from locconf.postprocess_files import fuse_files, postprocess_file

# Two images named by path in the ground truth; COCO ids 10 and 20; categories Tree (3) and Snag (7).
GT = {"images": [{"id": 10, "file_name": "tiles/a.png", "width": 100, "height": 100},
                 {"id": 20, "file_name": "tiles/b.png", "width": 100, "height": 100}],
      "annotations": [{"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 30]},
                      {"id": 2, "image_id": 10, "category_id": 7, "bbox": [60, 60, 20, 30]},
                      {"id": 3, "image_id": 20, "category_id": 3, "bbox": [5, 50, 40, 40]}],
      "categories": [{"id": 3, "name": "Tree"}, {"id": 7, "name": "Snag"}]}

# Predictions: (image, label name, xmin, ymin, xmax, ymax, score)
PREDS = [("a.png", "Tree", 11, 10, 40, 41, 0.9), ("a.png", "Tree", 12, 11, 39, 40, 0.7),
         ("a.png", "Snag", 60, 61, 80, 90, 0.8), ("b.png", "Tree", 5, 52, 44, 90, 0.6),
         ("b.png", "Snag", 70, 5, 90, 20, 0.3)]
IDS = {"a.png": 10, "b.png": 20}
CAT = {"Tree": 3, "Snag": 7}


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def deepforest_csv(path: Path, order: str = "xyxy", score: str = "score", labels: str = "names") -> Path:
    """The predictions as DeepForest writes them, in either box-column order."""
    boxes = ["xmin", "ymin", "xmax", "ymax"] if order == "xyxy" else ["xmin", "xmax", "ymin", "ymax"]
    header = ["label", "image_path", *boxes, score, "note"]
    rows = []
    for image, label, x1, y1, x2, y2, s in PREDS:
        v = {"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2}
        lab = label if labels == "names" else str(sorted(CAT.values()).index(CAT[label]))  # DeepForest's 0-based
        rows.append([lab, image, *[v[c] for c in boxes], s, f"note {x1}"])
    return write_csv(path, header, rows)


def coco_results(path: Path) -> Path:
    """The same predictions as COCO results with integer ids (the reference)."""
    recs = [{"image_id": IDS[im], "category_id": CAT[lab], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            for im, lab, x1, y1, x2, y2, s in PREDS]
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture()
def gt(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    return path


def _boxes(recs):
    return sorted((r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"]) for r in recs)


@pytest.mark.parametrize("order, score, labels", [("xyxy", "score", "names"), ("xxyy", "scores", "names"),
                                                  ("xxyy", "score", "numbers")])
def test_csv_in_either_column_order_reads_as_the_coco_reference(tmp_path, gt, order, score, labels):
    src = deepforest_csv(tmp_path / "p.csv", order, score, labels)
    got = read_detections(src, gt=gt)
    ref = read_detections(coco_results(tmp_path / "ref.json"), gt=gt)
    assert _boxes(got) == _boxes(ref)
    assert {r["image_path"] for r in got} == {"a.png", "b.png"} and all("note" in r for r in got)


def test_string_keys_and_names_score_like_integer_ids(tmp_path, gt):
    ref = postprocess_file(coco_results(tmp_path / "ref.json"), tmp_path / "ref.out.json", gt=gt, progress=False)
    got = postprocess_file(deepforest_csv(tmp_path / "p.csv"), tmp_path / "out.json", gt=gt, progress=False)
    assert got["metrics"] == ref["metrics"]
    out = json.loads((tmp_path / "out.json").read_text())
    assert {(r["image_id"], r["image_path"]) for r in out} == {(10, "a.png"), (20, "b.png")}
    # the ground truth as a CSV too: both sides named by path, mapped to the same images
    rows = [[GT["images"][0 if a["image_id"] == 10 else 1]["file_name"], a["bbox"][0], a["bbox"][1],
             a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3], {3: "Tree", 7: "Snag"}[a["category_id"]]]
            for a in GT["annotations"]]
    gt_csv = write_csv(tmp_path / "gt.csv", ["image_path", "xmin", "ymin", "xmax", "ymax", "label"], rows)
    via_csv = postprocess_file(deepforest_csv(tmp_path / "p.csv"), tmp_path / "out2.csv", gt=gt_csv, progress=False)
    assert via_csv["metrics"] == ref["metrics"]
    assert via_csv["metrics"]["output (nms)"]["box_recall"] == pytest.approx(1.0)


def test_ground_truth_from_csv(tmp_path):
    rows = [["b.png", 5, 50, 45, 90, "Tree"], ["a.png", 0, 0, 0, 0, "Tree"],  # a.png: no objects
            ["b.png", 60, 60, 80, 90, "Snag"]]
    data = read_annotations(write_csv(tmp_path / "gt.csv", ["image_path", "xmin", "ymin", "xmax", "ymax", "label"],
                                      rows))
    assert [(im["id"], im["file_name"]) for im in data["images"]] == [(1, "a.png"), (2, "b.png")]
    assert data["categories"] == [{"id": 1, "name": "Snag"}, {"id": 2, "name": "Tree"}]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in data["annotations"]] == [
        (2, 2, [5.0, 50.0, 40.0, 40.0]), (2, 1, [60.0, 60.0, 20.0, 30.0])]
    assert "width" not in data["images"][0]  # the images are not there


def test_labels_map_to_categories_by_name_id_or_deepforest_position():
    cats = Categories(GT["categories"])
    where = [f"r{i}" for i in range(4)]
    assert cats.ids(["Tree", "Snag", "3", 7], where) == [3, 7, 3, 7]  # names, ids
    assert cats.ids(["0", "1", "Tree"], where[:3]) == [3, 7, 3]  # 0-based positions (DeepForest's numbers)
    with pytest.raises(ValueError, match="r0: label 'Oak' is not a category of the ground truth"):
        cats.ids(["Oak"], where[:1])
    with pytest.raises(ValueError, match="r1: label '9' is neither a category id"):
        cats.ids(["3", "9"], where[:2])
    free = Categories()
    assert free.ids(["Tree", "Snag", "Tree"], where[:3]) == [2, 1, 2] and free.name(2) == "Tree"


def test_write_detections_round_trips_csv_and_coco(tmp_path):
    dets = {"boxes": torch.tensor([[1.5, 2.25, 30.125, 40.0], [50.0, 60.0, 70.0, 80.0]], dtype=torch.float64),
            "scores": torch.tensor([0.9, 0.4], dtype=torch.float64), "labels": torch.tensor([1, 2]),
            "quality": torch.tensor([0.7, 0.2], dtype=torch.float64),
            "variances": torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 0.125, 8.0]], dtype=torch.float64)}
    for name in ("d.csv", "d.json", "d.jsonl"):
        path = write_detections(tmp_path / name, dets, image_path="tiles/a.png", class_names=["bg", "Tree", "Snag"])
        recs = read_detections(path)
        boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                              for r in recs], dtype=torch.float64)
        assert torch.equal(boxes, dets["boxes"]), name
        assert [r["score"] for r in recs] == dets["scores"].tolist()
        assert [r["quality"] for r in recs] == dets["quality"].tolist()
        assert [r["variance"] for r in recs] == dets["variances"].tolist()
        assert {r["image_path"] for r in recs} == {"tiles/a.png"}
    header = (tmp_path / "d.csv").read_text().splitlines()[0]
    assert header == "image_path,xmin,ymin,xmax,ymax,label,score,quality,var_x1,var_y1,var_x2,var_y2"
    assert (tmp_path / "d.csv").read_text().splitlines()[1].split(",")[5] == "Tree"
    # no image: a CSV without the image column reads as one image
    write_detections(tmp_path / "one.csv", dets)
    assert {r["image_id"] for r in read_detections(tmp_path / "one.csv")} == {1}
    with pytest.raises(ValueError, match="no name in class_names"):
        write_detections(tmp_path / "x.csv", dets, class_names=["bg"])
    assert not (tmp_path / "x.csv").exists()


def test_postprocess_keeps_fields_it_does_not_use(tmp_path, gt, caplog):
    recs = json.loads(coco_results(tmp_path / "ref.json").read_text())
    for i, r in enumerate(recs):
        r.update(id=1000 + i, segmentation=[[r["bbox"][0], r["bbox"][1], r["bbox"][0] + 1, r["bbox"][1] + 1]],
                 keypoints=[1, 2, 2], track="t%d" % i, quality=0.5, variance=[1.0, 1.0, 1.0, 1.0])
    src = tmp_path / "c.json"
    src.write_text(json.dumps(recs))
    by_id = {r["id"]: r for r in recs}
    for method in ("nms", "soft-gaussian", "var-voting"):
        for out in (tmp_path / f"{method}.json", tmp_path / f"{method}.jsonl"):
            postprocess_file(src, out, method=method, progress=False)
            text = out.read_text()
            got = json.loads(text) if out.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
            assert got and all(r["segmentation"] == by_id[r["id"]]["segmentation"] and r["track"] == by_id[r["id"]]["track"]
                               and r["keypoints"] == [1, 2, 2] for r in got), (method, out)
    csv_out = tmp_path / "nms.csv"
    postprocess_file(src, csv_out, progress=False, gt=gt)
    rows = list(csv.DictReader(open(csv_out)))
    assert {"id", "segmentation", "keypoints", "track"} <= set(rows[0])
    assert json.loads(rows[0]["segmentation"]) == by_id[int(rows[0]["id"])]["segmentation"]
    assert rows[0]["image_path"] in ("tiles/a.png", "tiles/b.png") and rows[0]["label"] in ("Tree", "Snag")
    # CSV in, CSV out: extra columns kept as text; DeepForest's geometry column (derived) dropped
    p = deepforest_csv(tmp_path / "p.csv")
    with open(p) as f:
        lines = f.read().splitlines()
    (tmp_path / "g.csv").write_text("\n".join([lines[0] + ",geometry"] + [ln + ',"POLYGON ((0 0, 1 0, 1 1, 0 0))"'
                                                                           for ln in lines[1:]]) + "\n")
    postprocess_file(tmp_path / "g.csv", tmp_path / "g.out.csv", progress=False)
    out_rows = list(csv.DictReader(open(tmp_path / "g.out.csv")))
    assert "geometry" not in out_rows[0] and out_rows[0]["note"].startswith("note ")
    # fusion merges records: their fields are not carried, and a warning says so
    with caplog.at_level(logging.WARNING, logger="locconf"):
        fuse_files([src, src], tmp_path / "fused.json", progress=False)
    assert "not carried" in caplog.text and "segmentation" in caplog.text
    assert all("segmentation" not in r for r in json.loads((tmp_path / "fused.json").read_text()))


def test_gt_that_is_a_results_file_is_named_as_such(tmp_path):
    results = coco_results(tmp_path / "results.json")
    with pytest.raises(ValueError, match=r"results\.json: not a COCO instances file \(ground truth\): it holds a "
                                         r"JSON array of 5 records whose records look like COCO results"):
        main(["postprocess", str(results), "--gt", str(results), "--out", str(tmp_path / "o.json")])
    (tmp_path / "obj.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"no list 'annotations', 'categories'"):
        main(["postprocess", str(results), "--gt", str(tmp_path / "obj.json"), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()


def test_format_by_extension_or_flag(tmp_path, gt, capsys):
    assert [format_of(f"x{s}") for s in (".json", ".JSONL", ".csv", ".geojson", ".gpkg", ".shp")] == [
        "json", "jsonl", "csv", "geojson", "gpkg", "shp"]
    with pytest.raises(ValueError, match=r"x\.txt: cannot tell the format from the extension '\.txt'.*gt_format"):
        format_of("x.txt", flag="gt_format")
    txt = tmp_path / "p.txt"
    txt.write_text(deepforest_csv(tmp_path / "p.csv").read_text())
    with pytest.raises(ValueError, match="cannot tell the format"):
        main(["postprocess", str(txt), "--out", str(tmp_path / "o.json")])
    main(["postprocess", str(txt), "--format", "csv", "--gt", str(gt), "--out", str(tmp_path / "o.dat"),
          "--out-format", "csv", "--no-progress"])
    out = capsys.readouterr().out
    assert "box_precision | box_recall |" in out and "| output (nms) |" in out
    assert (tmp_path / "o.dat").read_text().startswith("image_path,xmin,ymin,xmax,ymax,label,score,note")


def test_csv_errors_name_file_line_and_column(tmp_path):
    head = ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"]
    cases = [
        (["image_path", "xmin", "ymin", "xmax", "label", "score"], [["a", 1, 1, 2, "T", 0.5]], "no column 'ymax'"),
        (head[:-1], [["a", 1, 1, 2, 2, "T"]], "no 'score' \\(or 'scores'\\) column"),
        (head, [["a", 1, 1, 2, 2, "T", 0.5], ["a", 1, "x", 2, 2, "T", 0.5]], "line 3: column 'ymin' must be a number"),
        (head, [["a", 5, 1, 2, 2, "T", 0.5]], "line 2: the box has xmax < xmin"),
        (head, [["a", 1, 1, 2, 2, "T", "nan"]], "line 2: column 'score' must be finite"),
        (head + ["var_x1"], [["a", 1, 1, 2, 2, "T", 0.5, 1]], "variance columns \\['var_x1'\\] without"),
        (head + ["score"], [["a", 1, 1, 2, 2, "T", 0.5, 0.5]], "column 'score' appears twice"),
    ]
    for header, rows, match in cases:
        path = write_csv(tmp_path / "bad.csv", header, rows)
        with pytest.raises(ValueError, match=f"bad.csv: .*{match}"):
            read_detections(path)


def test_format_choices_mirror_the_library():
    from locconf.cli import choices

    assert choices.FORMATS == FORMATS


@pytest.mark.parametrize("out", ["o.jsonl", "o.csv"])
def test_postprocess_writers_round_trip_through_the_readers(tmp_path, gt, out):
    src = deepforest_csv(tmp_path / "p.csv")
    postprocess_file(src, tmp_path / "ref.json", method="soft-gaussian", gt=gt, progress=False)
    postprocess_file(src, tmp_path / out, method="soft-gaussian", gt=gt, progress=False)
    ref = read_detections(tmp_path / "ref.json", gt=gt)
    got = read_detections(tmp_path / out, gt=gt)
    assert _boxes(got) == _boxes(ref)
    assert sorted((r["image_path"], r["note"]) for r in got) == sorted((r["image_path"], r["note"]) for r in ref)
