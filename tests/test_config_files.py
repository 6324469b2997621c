"""Configuration files as users write them: duplicate keys, ``_base_`` inheritance, ``--set``, eval with only val."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from locconf.cli import main
from locconf.cli import run_command
from locconf.experiment import (apply_overrides, build_datasets, build_model, check_config, load_config, read_config,
                                run_eval)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


TINY = """\
model:
  arch: torchvision_frcnn
  backbone: resnet18
  fpn_channels: 16
data:
  source: synthetic
  root: {root}
  synthetic: {{num_train: 6, num_val: 2, image_size: 64}}
train:
  iterations: 3
  lr: 0.01
  batch_size: 2
  out_dir: {root}/run
eval:
  methods: [nms, soft-linear]
  max_detections: 50
"""


# -- duplicate keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 0.01\n  batch_size: 2\n  lr: 0.02\n", "lr", "on lines 2 and 4"),
    ("train:\n  lr: 0.01\n  out_dir: runs/a\nmodel: {arch: rcnn}\ntrain:\n  iterations: 5\n", "train",
     "on lines 1 and 5"),
    ("data:\n  synthetic: {num_train: 4, seed: 1, num_train: 5}\n", "num_train", "twice on line 2"),
])
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, text, key, lines):
    path = write(tmp_path / "dup.yaml", text)
    with pytest.raises(ValueError, match=rf"dup\.yaml: duplicate key '{key}' {lines}"):
        load_config(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    """YAML's ``<<`` merge is not a duplicate: the mapping's own key wins, as YAML says."""
    path = write(tmp_path / "m.yaml", "train:\n  <<: {lr: 0.01, iterations: 4}\n  lr: 0.02\n")
    assert load_config(path)["train"] == {"lr": 0.02, "iterations": 4}


# -- _base_ ----------------------------------------------------------------------------------------


def test_base_merges_key_by_key_and_delete_replaces(tmp_path):
    root = tmp_path / "data"
    write(tmp_path / "base.yaml", TINY.format(root=root))
    (tmp_path / "exp").mkdir()
    child = write(tmp_path / "exp" / "child.yaml",
                  "_base_: ../base.yaml\n"
                  "train:\n  lr: 0.005\n"
                  "data:\n  synthetic: {num_train: 8}\n"
                  "eval:\n  _delete_: true\n  methods: [nms]\n"
                  "model:\n")  # an empty section changes nothing
    cfg = load_config(child)
    assert cfg["train"] == {"iterations": 3, "lr": 0.005, "batch_size": 2, "out_dir": f"{root}/run"}
    assert cfg["data"]["synthetic"] == {"num_train": 8, "num_val": 2, "image_size": 64}
    assert cfg["data"]["source"] == "synthetic"
    assert cfg["eval"] == {"methods": ["nms"]}  # max_detections is gone with the base's section
    assert cfg["model"] == {"arch": "torchvision_frcnn", "backbone": "resnet18", "fpn_channels": 16}


def test_several_bases_in_order_and_recursive(tmp_path):
    write(tmp_path / "a.yaml", "train: {iterations: 10, lr: 0.1, batch_size: 1}\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\ntrain: {lr: 0.2}\n")
    write(tmp_path / "c.yaml", "train: {lr: 0.3, batch_size: 3}\n")
    cfg, origins = read_config(write(tmp_path / "d.yaml", "_base_: [b.yaml, c.yaml]\ntrain: {iterations: 20}\n"))
    assert cfg["train"] == {"iterations": 20, "lr": 0.3, "batch_size": 3}  # c after b, d last
    assert origins == {"train.iterations": str(tmp_path / "d.yaml"), "train.lr": str(tmp_path / "c.yaml"),
                       "train.batch_size": str(tmp_path / "c.yaml")}
    cfg, _ = read_config(write(tmp_path / "e.yaml", "_base_: [c.yaml, b.yaml]\n"))
    assert cfg["train"] == {"iterations": 10, "lr": 0.2, "batch_size": 1}  # b brings a along, over c


def test_a_value_replaces_a_mapping_and_lists_replace_whole(tmp_path):
    write(tmp_path / "a.yaml", "eval: {method_params: {nms: {iou_threshold: 0.6}}, methods: [nms, soft-linear]}\n")
    cfg, _ = read_config(write(tmp_path / "b.yaml", "_base_: a.yaml\neval: {method_params: null, methods: [nms]}\n"))
    assert cfg["eval"] == {"method_params": None, "methods": ["nms"]}


def test_base_cycles_and_missing_bases_are_refused(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: c.yaml\ntrain: {lr: 0.1}\n")
    write(tmp_path / "c.yaml", "_base_: a.yaml\n")
    with pytest.raises(ValueError, match=r"_base_ files include each other: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> "
                                         r".*a\.yaml$"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ValueError, match=r"include each other: .*self\.yaml -> .*self\.yaml"):
        load_config(tmp_path / "self.yaml")
    write(tmp_path / "m.yaml", "_base_: [a_missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match=r"m\.yaml: its _base_ 'a_missing\.yaml' does not exist"):
        load_config(tmp_path / "m.yaml")


@pytest.mark.parametrize("text, match", [
    ("_base_: 3\n", r"_base_ must be a file name or a list of file names"),
    ("_base_: [a.yaml, [b.yaml]]\n", r"_base_ must be a file name or a list"),
    ("_delete_: true\ntrain: {lr: 0.1}\n", r"_delete_ belongs inside a section"),
    ("train: {_delete_: yes please, lr: 0.1}\n", r"train\._delete_ must be true or false"),
])
def test_bad_base_and_delete_values_name_the_file(tmp_path, text, match):
    write(tmp_path / "a.yaml", "train: {iterations: 3}\n")
    with pytest.raises(ValueError, match=r"x\.yaml: " + match):
        load_config(write(tmp_path / "x.yaml", text))


def test_an_error_in_a_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "train: {lr: fast}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain: {iterations: 3}\n")
    with pytest.raises(ValueError, match=r"child\.yaml \(from .*base\.yaml\): train\.lr must be a number, got 'fast'"):
        load_config(child)
    with pytest.raises(ValueError, match=r"_base_ is read from files only"):
        check_config({"_base_": "base.yaml"})


# -- --set ----------------------------------------------------------------------------------------------


def test_set_items_are_yaml_values_at_dotted_paths():
    cfg = {"train": {"lr": 0.02}, "data": {}}
    origins = apply_overrides(cfg, ["train.lr=1e-3", "train.steps=[0.5, 0.8]", "model.quality=dir",
                                    "train.clip_grad_norm=null", "data.synthetic.num_train=50",
                                    "eval.method_params.nms.iou_threshold=0.6", "train.amp=false",
                                    "train.out_dir=runs/a=b"])
    assert cfg == {"train": {"lr": 1e-3, "steps": [0.5, 0.8], "clip_grad_norm": None, "amp": False,
                             "out_dir": "runs/a=b"},
                   "data": {"synthetic": {"num_train": 50}}, "model": {"quality": "dir"},
                   "eval": {"method_params": {"nms": {"iou_threshold": 0.6}}}}
    assert origins["train.lr"] == "--set train.lr=1e-3"
    assert origins["eval.method_params.nms.iou_threshold"] == "--set eval.method_params.nms.iou_threshold=0.6"
    assert check_config(cfg)["train"]["lr"] == 1e-3


@pytest.mark.parametrize("item, match", [
    ("train.lr", r"--set 'train\.lr': expected SECTION\.KEY=VALUE"),
    ("lr=0.1", r"--set 'lr=0\.1': expected SECTION\.KEY=VALUE"),
    ("train..lr=0.1", r"expected SECTION\.KEY=VALUE"),
    ("trian.lr=0.1", r"--set 'trian\.lr=0\.1': unknown section 'trian'"),
    ("train.lr=", r"--set 'train\.lr=': no value"),
    ("train.steps=[0.5,", r"--set 'train\.steps=\[0\.5,': the value is not valid YAML"),
    ("train.lr.x=1", r"--set 'train\.lr\.x=1': train\.lr is 0\.02, not a mapping"),
])
def test_bad_set_items_are_named(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides({"train": {"lr": 0.02}}, [item])


def test_set_goes_through_the_same_check_naming_the_item(tmp_path):
    path = write(tmp_path / "c.yaml", TINY.format(root=tmp_path / "data"))
    assert load_config(path, ["train.lr=0.005", "data.synthetic.num_train=9"])["train"]["lr"] == 0.005
    with pytest.raises(ValueError, match=r"c\.yaml \(--set train\.lr=fast\): train\.lr must be a number, got 'fast'"):
        load_config(path, ["train.lr=fast"])
    with pytest.raises(ValueError, match=r"\(--set train\.lrr=1\): unknown key\(s\) \['lrr'\] in section 'train'"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ValueError, match=r"\(--set data\.synthetic\.num_clases=3\): unknown key\(s\) "
                                         r"\['data\.synthetic\.num_clases'\]"):
        load_config(path, ["data.synthetic.num_clases=3"])
    with pytest.raises(ValueError, match=r"\(--set model\.backbon=resnet50\): unknown key\(s\) \['backbon'\]"):
        load_config(path, ["model.backbon=resnet50"])
    with pytest.raises(ValueError, match=r"\(--set eval\.methods=\[nms, nmms\]\): eval\.methods: 'nmms' is not"):
        load_config(path, ["eval.methods=[nms, nmms]"])
    # a key of the file itself is not blamed on a --set item
    with pytest.raises(ValueError, match=r"bad\.yaml: train\.lr must be a number"):
        load_config(write(tmp_path / "bad.yaml", "train: {lr: fast}\n"), ["train.iterations=5"])


def test_cli_set_on_train_and_config_show(tmp_path, capsys, one_thread):
    path = write(tmp_path / "c.yaml", TINY.format(root=tmp_path / "data"))
    assert main(["config", "show", path, "--set", "train.lr=0.005", "--set", "model.fpn_channels=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.005 and shown["model"]["fpn_channels"] == 8
    assert main(["train", path, "--set", "train.lr=fast"]) == 2
    assert "locconf train: error: " in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before the data were generated
    assert main(["train", path, "--no-progress", "--set", "train.iterations=1", "--set", "train.lr=0.002",
                 "--set", f"train.out_dir={tmp_path / 'run1'}"]) == 0
    saved = yaml.safe_load((tmp_path / "run1" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.002 and saved["train"]["iterations"] == 1
    records = [json.loads(line) for line in open(tmp_path / "run1" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["type"] == "train"] == [1]


# -- eval needs only its split ---------------------------------------------------------------------------


def test_eval_needs_only_val_json(tmp_path, one_thread):
    """``locconf eval`` used to demand data.train_json (and read the training images) to evaluate."""
    from locconf.experiment.build import write_synthetic_splits

    root = tmp_path / "coco"
    write_synthetic_splits(root, num_train=2, num_val=2, image_size=64, num_classes=2, seed=0)
    (root / "train.json").unlink()
    shutil.rmtree(root / "train", ignore_errors=True)
    cfg = load_config(write(tmp_path / "eval.yaml", f"""\
model: {{arch: torchvision_frcnn, backbone: resnet18, fpn_channels: 16, min_size: 64, max_size: 64}}
data: {{source: coco, root: {root}, val_json: val.json}}
eval: {{methods: [nms]}}
"""))
    with pytest.raises(ValueError, match=r"data\.train_json is required to train and evaluate"):
        build_datasets(**cfg["data"])
    with pytest.raises(ValueError, match=r"data\.train_json is required to train with data\.source 'coco'"):
        build_datasets(**cfg["data"], split="train")
    train_ds, val_ds, val_json = build_datasets(**cfg["data"], split="val")
    assert train_ds is None and len(val_ds) == 2 and val_json == root / "val.json"
    torch.manual_seed(0)
    model = build_model(num_classes=2, **cfg["model"]).eval()
    report = run_eval(model, cfg, tmp_path / "out", progress=False)
    assert set(report["results"]) == {"nms"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"].keys() == {"nms"}


def test_split_is_not_a_configuration_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['split'\] in section 'data'"):
        check_config({"data": {"split": "val"}})
    with pytest.raises(ValueError, match=r"split must be None, 'train' or 'val'"):
        build_datasets(source="coco", root=tmp_path, val_json="v.json", split="test")


def test_cli_config_choices_match_the_library():
    from locconf.cli import choices
    from locconf.experiment import ARCHS, SECTIONS

    assert choices.SECTIONS == SECTIONS and choices.ARCHS == ARCHS
    with pytest.raises(SystemExit):
        run_command(["config", "keys", "modle"])
