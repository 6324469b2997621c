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
from locconf.cli import run_command as main  # exceptions propagate
from locconf.evaluation import evaluate_methods
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


# -- configuration files ------------------------------------------------------------------------


def tiny_config(tmp_path, out: str = "run", **train) -> dict:
    """A torchvision Faster R-CNN on 6 synthetic 64 px scenes: about 0.1 s a step on one thread."""
    return {
        "model": dict(arch="torchvision_frcnn", backbone="resnet18", fpn_channels=16, representation_size=32,
                      min_size=64, max_size=64, box_batch_size_per_image=16, rpn_batch_size_per_image=32),
        "data": dict(source="synthetic", root=str(tmp_path / "data"),
                     synthetic=dict(num_train=6, num_val=2, image_size=64, num_classes=2, seed=0)),
        "train": dict(dict(iterations=3, batch_size=2, lr=0.01, warmup_iters=1, checkpoint_every=2, log_every=1,
                           seed=3, progress=False, out_dir=str(tmp_path / out)), **train),
        "eval": dict(methods=["nms"]),
    }


def write_yaml(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def train_losses(run_dir) -> list[dict]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k.startswith("loss_") or k in ("step", "total", "lr")}
            for r in records if r["type"] == "train"]


def test_same_config_twice_gives_the_same_losses(tmp_path, one_thread, capsys):
    """The model used to be built before train() seeded: two runs of one config differed from step 1."""
    first = write_yaml(tmp_path / "a.yaml", tiny_config(tmp_path, "a"))
    second = write_yaml(tmp_path / "b.yaml", tiny_config(tmp_path, "b"))
    assert main(["train", first]) == 0
    torch.rand(10)  # whatever the global RNG state is now
    assert main(["train", second]) == 0
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert a == b  # bitwise: floats compared with ==


@pytest.mark.parametrize("text, key, value", [
    ("lr: 1e-4", "lr", 1e-4), ("lr: 1E-4", "lr", 1e-4), ("lr: -2e+3", "lr", -2e3), ("lr: .5e1", "lr", 5.0),
    ("lr: 1.5", "lr", 1.5), ("lr: 3", "lr", 3), ("lr: 1_000", "lr", 1000), ("lr: 0x10", "lr", 16),
    ("lr: .inf", "lr", float("inf")), ("name: 1e4x", "name", "1e4x"), ("name: 2024-01-01T", "name", "2024-01-01T"),
])
def test_yaml_scientific_notation_is_a_float(tmp_path, text, key, value):
    """PyYAML reads ``1e-4`` as a string (its float pattern needs a dot); the config loader does not."""
    from locconf.experiment import ConfigLoader

    loaded = yaml.load(text, Loader=ConfigLoader)[key]
    assert loaded == value and type(loaded) is type(value)
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # the reason for the loader
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iterations: 10\n  lr: 1e-4\n  weight_decay: 5E-5\n")
    assert load_config(path)["train"] == {"iterations": 10, "lr": 1e-4, "weight_decay": 5e-5}


@pytest.mark.parametrize("section, key, value, match", [
    ("train", "lr", "fast", r"train\.lr must be a number, got 'fast' \(str\)"),
    ("train", "iterations", True, r"train\.iterations must be an integer, got True \(bool\)"),
    ("train", "iterations", 1e3, r"train\.iterations must be an integer, got 1000\.0"),
    ("train", "steps", [0.5, True], r"train\.steps must be a list of numbers"),
    ("train", "clip_grad_norm", False, r"train\.clip_grad_norm must be a number or null"),
    ("model", "fpn_channels", True, r"model\.fpn_channels must be an integer"),
    ("model", "anchor_sizes", [16, "32"], r"model\.anchor_sizes must be a list of numbers or null"),
    ("model", "candidates_per_image", 1.5, r"model\.candidates_per_image must be an integer"),
    ("data", "jitter_strength", True, r"data\.jitter_strength must be a number"),
    ("data", "flips", 1, r"data\.flips must be true or false"),
    ("eval", "max_detections", True, r"eval\.max_detections must be an integer"),
    ("eval", "methods", "nms", r"eval\.methods must be a list"),
])
def test_wrong_types_name_section_and_key(tmp_path, section, key, value, match):
    cfg = tiny_config(tmp_path)
    cfg[section][key] = value
    path = write_yaml(tmp_path / "c.yaml", cfg)
    with pytest.raises(ValueError, match=match) as err:
        load_config(path)
    assert str(err.value).startswith(path)


@pytest.mark.parametrize("section, key, match", [
    ("data", "synthetic", r"unknown key\(s\) \['data\.synthetic\.num_clases'\]"),
    ("model", "backbon", r"unknown key\(s\) \['backbon'\] in section 'model'"),
    ("train", "resume", r"unknown key\(s\) \['resume'\] in section 'train'"),
    ("eval", "per_sight", r"unknown key\(s\) \['per_sight'\] in section 'eval'"),
])
def test_unknown_keys_name_their_path(tmp_path, section, key, match):
    cfg = tiny_config(tmp_path)
    if key == "synthetic":
        cfg["data"]["synthetic"]["num_clases"] = 5
    else:
        cfg[section][key] = 1
    with pytest.raises(ValueError, match=match):
        check_config(cfg)
    with pytest.raises(ValueError, match=match):
        run_train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_synthetic_values_are_checked(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"]["synthetic"]["num_train"] = True
    with pytest.raises(ValueError, match=r"data\.synthetic\.num_train must be an integer >= 1, got True"):
        check_config(cfg)


@pytest.mark.parametrize("text", ["", "# nothing here\n", "\n\n"])
def test_empty_yaml_fails_fast_naming_the_file(tmp_path, text, monkeypatch):
    """An empty config used to mean every default: the NEON data were downloaded before it failed."""
    import locconf.data

    def no_fetch(*a, **k):
        raise AssertionError("data fetched")

    monkeypatch.setattr(locconf.data, "neon_trees", no_fetch)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"config file .*empty\.yaml is empty"):
        main(["train", str(path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_config_without_iterations_fails_before_any_data(tmp_path, monkeypatch):
    import locconf.data

    monkeypatch.setattr(locconf.data, "neon_trees", lambda *a, **k: pytest.fail("data fetched"))
    cfg = tiny_config(tmp_path)
    del cfg["train"]["iterations"]
    with pytest.raises(ValueError, match=r"train\.iterations is required"):
        run_train(check_config(cfg))
    assert not (tmp_path / "data").exists()


def test_bad_yaml_and_encoding_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_config(path)
    path.write_bytes("train:\n  out_dir: ch\u00eane\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad\.yaml: not UTF-8 text \(byte 0xea"):
        load_config(path)


# -- refused runs write nothing ---------------------------------------------------------------------


def test_refused_train_and_resume_keep_the_existing_run(tmp_path, one_thread, capsys):
    """A refused `locconf train` used to overwrite the existing run's config.yaml; a refused --resume too."""
    cfg = tiny_config(tmp_path)
    path = write_yaml(tmp_path / "c.yaml", cfg)
    assert main(["train", path]) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert "config.yaml" in before and "checkpoint_0000003.pth" in before

    other = write_yaml(tmp_path / "other.yaml", tiny_config(tmp_path, lr=0.02, iterations=4))
    with pytest.raises(ValueError, match=r"already holds a run"):
        main(["train", other])
    with pytest.raises(ValueError, match=r"config\.yaml differs in train\.iterations: 3 -> 4; train\.lr: 0\.01 -> 0\.02"):
        main(["train", other, "--resume"])
    changed_model = tiny_config(tmp_path, iterations=4)
    changed_model["model"]["fpn_channels"] = 8
    with pytest.raises(ValueError, match=r"model\.fpn_channels: 16 -> 8"):
        main(["train", write_yaml(tmp_path / "m.yaml", changed_model), "--resume"])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    # the settings recorded in the checkpoint are checked too (a run whose config.yaml is gone)
    (run / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint_0000003\.pth: .*lr: 0\.01 -> 0\.02"):
        main(["train", other, "--resume"])
    assert not (run / "config.yaml").exists()
    before.pop("config.yaml")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    # bookkeeping may change on resume: more logging, other checkpoint spacing
    (run / "config.yaml").write_bytes(yaml.safe_dump(dict(cfg, model=dict(cfg["model"], num_classes=2)),
                                                     sort_keys=False).encode())
    assert main(["train", write_yaml(tmp_path / "d.yaml", tiny_config(tmp_path, log_every=5, checkpoint_every=3)),
                 "--resume"]) == 0
