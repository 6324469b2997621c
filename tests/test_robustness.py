"""Bad input gets a clear error naming the argument, key, file or record (issue 14).

Configuration files (YAML parsing, unknown nested keys, wrong types and bools), refused runs that
must not write anything, box functions on meta tensors and evaluation ground truth with repeated
annotation ids.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from locconf import boxes as B
from locconf.cli import main
from locconf.engine.evaluate import evaluate_methods
from locconf.experiment import check_config, load_config, run_train


# -- boxes ----------------------------------------------------------------------------------------


def test_box_functions_name_meta_tensors():
    meta = torch.zeros(2, 4, device="meta")
    with pytest.raises(ValueError, match="boxes1 is on the meta device"):
        B.box_iou(meta, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="reference is on the meta device"):
        B.decode_boxes(torch.zeros(2, 4), meta)
    with pytest.raises(ValueError, match="deltas is on the meta device"):
        B.decode_boxes(meta, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="offsets must be a floating-point"):
        B.decode_corners(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))


def test_box_functions_reject_bools_as_numbers():
    with pytest.raises(ValueError, match="num_per_box"):
        B.jitter_boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), num_per_box=True)
    with pytest.raises(ValueError, match="max_shift"):
        B.jitter_boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), max_shift=float("nan"))
    with pytest.raises(ValueError, match="image_size"):
        B.clip_boxes(torch.zeros(1, 4), (True, 5))


# -- evaluation ground truth --------------------------------------------------------------------------


def test_evaluation_refuses_repeated_annotation_ids(tmp_path):
    """Two objects sharing id 1 made perfect detections score AP 0.25; now the file and the id are named."""
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 100, 100], "area": 1e4, "iscrowd": 0},
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [150, 150, 100, 100], "area": 1e4, "iscrowd": 0}]
    gt = {"images": [{"id": 1, "file_name": "1.png", "width": 300, "height": 300}], "annotations": anns,
          "categories": [{"id": 7, "name": "tree"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    perfect = [{"image_id": 1, "boxes": torch.tensor([[10.0, 10, 110, 110], [150, 150, 250, 250]]),
                "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    with pytest.raises(ValueError, match=r"gt\.json: annotations\[1\] repeats annotation id 1\b"):
        evaluate_methods(perfect, path, ["nms"], {1: 7}, progress=False)
    anns[1]["id"] = 2
    path.write_text(json.dumps(gt))
    assert evaluate_methods(perfect, path, ["nms"], {1: 7}, progress=False)["nms"]["AP"] == pytest.approx(1.0)


def test_evaluation_names_a_latin1_ground_truth(tmp_path):
    path = tmp_path / "gt.json"
    path.write_bytes('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "ch\u00eane"}]}'
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"gt\.json: not UTF-8"):
        evaluate_methods([{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                           "labels": torch.zeros(0, dtype=torch.long)}], path, ["nms"], {1: 1}, progress=False)
