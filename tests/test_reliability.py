"""Issue 25, "nothing lost, nothing silent": the regression tests of each case, in process.

The subprocess side (real SIGINT/SIGTERM/SIGKILL at random points, two processes on one folder,
every output flag against every input) is tests/test_faults_cli.py.

One tiny Faster R-CNN with a DIR head (timm's ``test_efficientnet`` trunk, 64 px) is trained once
per module, in 2 steps, on synthetic scenes whose two categories have the COCO ids 3 ("oak") and
7 ("pine"); the data root in its configuration is relative to the folder it was trained in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from locconf.cli import main, run_command

CATEGORIES = {1: (3, "oak"), 2: (7, "pine")}  # synthetic class -> (COCO id, name)


@contextlib.contextmanager
def working_folder(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def make_data(root: Path, num_train: int = 2, num_val: int = 3) -> None:
    """Synthetic scenes as COCO files whose categories have the ids and names of :data:`CATEGORIES`."""
    from locconf.experiment.build import write_synthetic_splits

    write_synthetic_splits(root, num_train=num_train, num_val=num_val, image_size=64, num_classes=2, seed=0)
    for split in ("train", "val"):
        data = json.loads((root / f"{split}.json").read_text())
        data["categories"] = [{"id": cid, "name": name} for cid, name in CATEGORIES.values()]
        for ann in data["annotations"]:
            ann["category_id"] = CATEGORIES[ann["category_id"]][0]
        (root / f"{split}.json").write_text(json.dumps(data))


def tiny_config(out_dir: str = "run", root: str = "data", **train) -> dict:
    return {
        "model": dict(arch="rcnn", quality="dir", backbone="test_efficientnet", fpn_channels=16, min_size=64,
                      max_size=64, representation_size=32, candidates_per_image=200),
        "data": dict(source="coco", root=root, train_json="train.json", val_json="val.json"),
        "train": dict(dict(iterations=2, batch_size=1, lr=0.001, warmup_iters=1, out_dir=out_dir, checkpoint_every=2,
                           log_every=1, progress=False), **train),
        "eval": dict(methods=["nms", "quality"]),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(base folder, checkpoint)``: a 2-step run in base/run on base/data (relative paths)."""
    base = tmp_path_factory.mktemp("reliability")
    make_data(base / "data")
    (base / "cfg.yaml").write_text(yaml.safe_dump(tiny_config()))
    torch.manual_seed(0)
    with working_folder(base):
        assert run_command(["train", "cfg.yaml", "--no-progress"]) == 0
    return base, base / "run" / "checkpoint_0000002.pth"


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``locconf argv`` through ``main``: its exit code must be ``code``; the one error line."""
    assert main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- locconf.files --------------------------------------------------------------------------------


def test_output_set_commits_all_or_nothing(tmp_path):
    from locconf.files import OutputSet

    a, b, c = tmp_path / "a.json", tmp_path / "sub" / "b.md", tmp_path / "c.png"
    for p, text in ((a, "old a"), (c, "old c")):
        p.write_text(text)
    with pytest.raises(KeyboardInterrupt):
        with OutputSet({"a": a, "b": b, "c": c}) as out:
            out.temp("a").write_text("new a")
            raise KeyboardInterrupt  # e.g. Ctrl-C between two files
    assert a.read_text() == "old a" and not b.exists() and c.read_text() == "old c"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "c.png"]  # no temp file
    with OutputSet({"a": a, "b": b, "c": c}) as out:
        out.temp("a").write_text("new a")
        out.temp("b").write_text("new b")  # c is not produced this time: the old one must not stay
    assert a.read_text() == "new a" and b.read_text() == "new b" and not c.exists()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        OutputSet({"a": tmp_path / "sub"})


def test_signals_wait_until_the_renames_are_done(tmp_path):
    """A SIGINT that arrives in the middle of the commit is raised after the last rename."""
    from locconf.files import OutputSet, deferred_signals

    def _ctrl_c():  # to this (the main) thread: delivered before the call returns, not to another thread later
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            _ctrl_c()
            done.append("after the signal")
    assert done == ["after the signal"]
    paths = {name: tmp_path / name for name in ("x", "y", "z")}
    real_replace, calls = os.replace, []

    def replace_and_interrupt(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            _ctrl_c()  # Ctrl-C right after the first rename

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace_and_interrupt)
        with pytest.raises(KeyboardInterrupt):
            with OutputSet(paths) as out:
                for name in paths:
                    out.temp(name).write_text(name)
    assert [p.read_text() for p in paths.values()] == ["x", "y", "z"]  # all three, not one


def test_stale_temp_files_go_with_the_next_write(tmp_path):
    from locconf.files import atomic_write_text

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale, live = tmp_path / f".out.json.tmp.{dead}", tmp_path / f".out.json.tmp.{os.getppid()}"
    stale.write_text("torn")
    live.write_text("another process writing")
    atomic_write_text(tmp_path / "out.json", "{}")
    assert not stale.exists() and live.exists()  # a live writer's file is not touched


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
    """The lock is the first write: a folder that cannot take it fails at once, naming the folder (it
    used to fail after all the work, naming a hidden temp file). /proc refuses new files even to root."""
    from locconf.files import output_lock

    with pytest.raises(OSError, match=r"cannot (write into|create the output folder) /proc/locconf"):
        with output_lock(Path("/proc/locconf_out"), folder=True):
            pass


def test_require_file_says_folder():
    from locconf.files import require_file

    with pytest.raises(IsADirectoryError, match="config file .* is a folder, not a file: give the YAML"):
        require_file(Path.cwd(), "config file", "give the YAML file")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        require_file(Path("no/such.yaml"), "config file")


# -- eval ------------------------------------------------------------------------------------------


def test_eval_writes_its_calibration_into_out_and_keeps_another_splits(trained, capsys, monkeypatch):
    """Item 3: `eval` used to write <checkpoint>.calibration.json beside the checkpoint every time,
    replacing the one that predict uses with one fitted on whatever split was just evaluated."""
    base, ckpt = trained
    monkeypatch.chdir(base)
    out = base / "ev_cal"
    args = ["eval", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress", "--calibration-min-boxes", "1"]
    assert main(args) == 0  # the configuration is the checkpoint's own
    printed = capsys.readouterr().out
    assert not list(ckpt.parent.glob("*.calibration.json"))
    if not (out / "calibration.json").exists():
        pytest.skip("the 2-step model matched no box: nothing to calibrate")
    assert f"calibration (isotonic, for predict/postprocess --calibration): {out / 'calibration.json'}" in printed
    info = json.loads((out / "calibration.json").read_text())["info"]
    assert info["fitted_on"]["checkpoint"] == str(ckpt.resolve()) and info["fitted_on"]["images"] == 3
    assert main(args) == 0  # the same evaluation again replaces it
    capsys.readouterr()
    # another annotation file (here of the same images) into the same folder: refused before any work
    shutil.copy(base / "data" / "val.json", base / "data" / "val_copy.json")
    other = tiny_config()
    other["data"]["val_json"] = "val_copy.json"
    (base / "other_split.yaml").write_text(yaml.safe_dump(other))
    before = folder_state(out)
    line = one_line_error(capsys, ["eval", "other_split.yaml", *args[1:]])
    assert f"{out / 'calibration.json'} holds a calibration fitted on 3 images of" in line
    assert "--overwrite-calibration" in line and folder_state(out) == before
    assert main(["eval", "other_split.yaml", *args[1:], "--overwrite-calibration"]) == 0
    fitted_on = json.loads((out / "calibration.json").read_text())["info"]["fitted_on"]
    assert fitted_on["annotations"] == str((base / "data" / "val_copy.json").resolve())


def test_eval_refuses_outputs_on_inputs_and_a_held_folder(trained, capsys, monkeypatch):
    """Item 2 (`eval cfg.yaml --checkpoint ck.pth --html cfg.yaml` replaced the config with the report)
    and item 1 (a second process into a held --out)."""
    base, ckpt = trained
    monkeypatch.chdir(base)
    config = base / "cfg.yaml"
    before = config.read_bytes()
    for flags, what in ((["--html", "cfg.yaml"], "--html .*cfg.yaml is the config"),
                        (["--out", str(ckpt)], "--out .*checkpoint_0000002.pth is the checkpoint"),
                        (["--html", str(ckpt)], "--html .* is the checkpoint"),
                        (["--html", "data/val.json"], "--html .*val.json is the annotation file"),
                        (["--html", "data/val/000001.png"], "is the image")):
        line = one_line_error(capsys, ["eval", "cfg.yaml", "--checkpoint", str(ckpt), "--out", "ev_x", *flags])
        assert __import__("re").search(what, line), line
    assert config.read_bytes() == before and not (base / "ev_x").exists()
    held = base / "ev_held"
    held.mkdir()
    (held / ".locconf.lock").write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname(),
                                                    "command": "locconf eval", "started": 0}))
    line = one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--out", str(held)])
    assert f"{held} is in use by locconf eval (pid {os.getppid()}" in line
    assert sorted(p.name for p in held.iterdir()) == [".locconf.lock"]


def test_an_interrupted_eval_leaves_the_previous_set(trained, monkeypatch):
    """Ctrl-C after results.json is written but before the plots: results.json, table.md and the
    plots are all the previous run's (no new results.json beside old plots)."""
    from locconf.evaluation import plots

    base, ckpt = trained
    monkeypatch.chdir(base)
    out = base / "ev_int"
    assert run_command(["eval", "--checkpoint", str(ckpt), "--out", str(out), "--methods", "nms", "--no-progress"]) == 0
    before = folder_state(out)
    real = plots.draw_detections

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "draw_detections", interrupted)
    monkeypatch.setattr("locconf.evaluation.draw_detections", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_command(["eval", "--checkpoint", str(ckpt), "--out", str(out), "--methods", "nms,soft-linear",
                     "--no-progress"])
    monkeypatch.setattr("locconf.evaluation.draw_detections", real)
    assert folder_state(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temp file, no lock


def test_eval_names_another_heads_config_and_other_categories(trained, capsys, monkeypatch):
    """Item 12: PyTorch's "Missing key(s) / Unexpected key(s)" becomes the checkpoint's settings
    against the configuration's; categories other than the checkpoint's are refused."""
    base, ckpt = trained
    monkeypatch.chdir(base)
    kl = tiny_config()
    kl["model"]["quality"] = "kl"
    (base / "kl.yaml").write_text(yaml.safe_dump(kl))
    line = one_line_error(capsys, ["eval", "kl.yaml", "--checkpoint", str(ckpt), "--out", "ev_kl"])
    assert "does not fit the model the configuration builds: model settings differ: quality: 'dir' in the " \
           "checkpoint, 'kl' here: leave the configuration out to use the one the checkpoint records" in line
    # the same images with other category ids: every label would be scored as another category
    other = base / "data_other"
    shutil.copytree(base / "data", other)
    val = json.loads((other / "val.json").read_text())
    val["categories"][1]["id"] = 8
    for ann in val["annotations"]:
        ann["category_id"] = 8 if ann["category_id"] == 7 else ann["category_id"]
    (other / "val.json").write_text(json.dumps(val))
    cfg = tiny_config(root="data_other")
    (base / "other_cats.yaml").write_text(yaml.safe_dump(cfg))
    line = one_line_error(capsys, ["eval", "other_cats.yaml", "--checkpoint", str(ckpt), "--out", "ev_cats"])
    assert "trained on the categories [3 'oak', 7 'pine'] but data_other/val.json has [3 'oak', 8 'pine']" in line


# -- predict: classes from the checkpoint ---------------------------------------------------------


def test_predict_from_another_folder_writes_names_and_category_ids(trained, tmp_path, monkeypatch):
    """Item 7: the checkpoint knows its classes; the data (root "data", relative) is not there."""
    import csv

    base, ckpt = trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = base / "data" / "val" / "000000.png"
    assert run_command(["predict", str(image), "--checkpoint", str(ckpt), "--out", "p.png", "--no-progress",
                        "--score-threshold", "0"]) == 0
    rows = list(csv.DictReader(open("p.csv")))
    records = json.loads(Path("p.json").read_text())
    assert rows and records, "the untrained model detected nothing"
    assert {r["label"] for r in rows} <= {"oak", "pine"}
    assert {r["category_id"] for r in records} <= {3, 7}


# -- postprocess -----------------------------------------------------------------------------------


def candidates_file(path: Path, images: int = 3, per_image: int = 20) -> Path:
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(images):
        xy = (torch.rand(per_image, 2, generator=g) * 50).tolist()
        wh = (torch.rand(per_image, 2, generator=g) * 20 + 5).tolist()
        for k in range(per_image):
            records.append({"image_id": i, "category_id": 1, "bbox": xy[k] + wh[k],
                            "score": float(torch.rand(1, generator=g)), "quality": float(torch.rand(1, generator=g))})
    path.write_text(json.dumps(records))
    return path


def test_postprocess_leaves_no_temp_file(tmp_path, monkeypatch):
    """Item 4: a write killed with SIGKILL left .<out>.<pid>.<hex>.tmp for good; an interrupt while the
    output is written leaves the previous output and no temp file."""
    from locconf.postprocess_files import write

    inp = candidates_file(tmp_path / "c.json")
    out = tmp_path / "o.json"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / f".o.json.tmp.{dead}").write_text("[{\"torn")
    assert run_command(["postprocess", str(inp), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "o.json"]
    before = out.read_bytes()
    real_write, count = write._AtomicWriter.write, [0]

    def interrupted(self, record):
        count[0] += 1
        if count[0] == 5:
            raise KeyboardInterrupt
        real_write(self, record)

    monkeypatch.setattr(write._AtomicWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_command(["postprocess", str(inp), "--out", str(out), "--method", "soft-gaussian", "--no-progress"])
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "o.json"]


def test_postprocess_and_fuse_refuse_a_held_output(tmp_path, capsys):
    import socket

    inp = candidates_file(tmp_path / "c.json")
    out = tmp_path / "o.json"
    lock = tmp_path / ".o.json.locconf.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "locconf postprocess",
                                "started": 0}))
    for argv in (["postprocess", str(inp)], ["postprocess", "--fuse", str(inp), str(inp)]):
        line = one_line_error(capsys, argv + ["--out", str(out), "--no-progress"])
        assert f"{out} is in use by locconf postprocess (pid {os.getppid()}" in line
    assert not out.exists() and lock.exists()


# -- COCO areas ------------------------------------------------------------------------------------


def two_box_gt(area) -> dict:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "iscrowd": 0}]
    if area != "absent":
        anns[1]["area"] = area
    return {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
            "categories": [{"id": 1, "name": "tree"}], "annotations": anns}


@pytest.mark.parametrize("area", [-400, float("nan"), float("inf"), "400"])
def test_a_bad_area_is_refused_naming_the_record(tmp_path, area):
    """Item 6: a negative or non-finite area made the object stop counting in AP (0.505 -> 0.000 in this
    two-box case: COCO's evaluation ignores a ground truth outside its area range)."""
    from locconf.data import CocoDetection
    from locconf.evaluation import load_coco

    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(two_box_gt(area)))
    message = r"gt\.json: annotations\[1\] has 'area' .*(finite number of pixels|not a number)"
    with pytest.raises(ValueError, match=message):
        load_coco(gt)
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, gt, check_files=False)


def test_without_area_both_boxes_count(tmp_path):
    """The reference for the case above: area left out is w * h, and finding both boxes is AP 1."""
    from locconf.postprocess_files import postprocess_file

    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(two_box_gt("absent")))
    dets = [{"image_id": 1, "category_id": 1, "bbox": b, "score": s} for b, s in (([10, 10, 20, 20], 0.9),
                                                                                   ([50, 50, 20, 20], 0.8))]
    (tmp_path / "d.json").write_text(json.dumps(dets))
    report = postprocess_file(tmp_path / "d.json", tmp_path / "o.json", gt=gt, progress=False)
    assert report["metrics"]["output (nms)"]["AP"] == pytest.approx(1.0)


# -- calibration -----------------------------------------------------------------------------------


def test_a_calibration_needs_enough_boxes_and_iou_knots(tmp_path):
    """Item 8: one matched box gave a map sending every quality to 0.909, saved and applied silently;
    knots outside [0, 1] were accepted."""
    from locconf.evaluation.calibration import MIN_BOXES, Calibration, TooFewBoxesError, fit_calibration

    cand = {"boxes": torch.tensor([[0.0, 0, 10, 11]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]), "quality": torch.tensor([0.7])}
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    with pytest.raises(TooFewBoxesError, match=rf"needs at least {MIN_BOXES} candidates matched .*; 1 matched in 1"):
        fit_calibration([cand], [target])
    assert fit_calibration([cand], [target], min_boxes=1).calibrate("quality", torch.tensor([0.2])).item() == \
        pytest.approx(10 / 11)
    for x, y, what in (([0.1, 2.0], [0.2, 0.3], r"knots\['quality'\]\.x must lie in \[0, 1\]"),
                       ([0.1, 0.2], [-1.0, 0.3], r"knots\['quality'\]\.y must lie in \[0, 1\] \(IoUs\)")):
        path = tmp_path / "cal.json"
        path.write_text(json.dumps({"format": "locconf-calibration", "version": 1, "kind": "isotonic",
                                    "signals": {"quality": {"x": x, "y": y}}}))
        with pytest.raises(ValueError, match=rf"cal\.json: {what}"):
            Calibration.load(path)


# -- training ------------------------------------------------------------------------------------


def test_eval_every_is_evaluated_and_logged(tmp_path, monkeypatch):
    """Item 12: train.eval_every was accepted by the config check, then refused by train() for want of
    an eval_fn. It now evaluates the val split every N steps (and at the end)."""
    make_data(tmp_path / "data", num_val=1)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(iterations=3, eval_every=2, checkpoint_every=0)
    cfg["eval"] = {"methods": ["nms"]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run_command(["train", "cfg.yaml", "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    assert set(evals[0]) == {"type", "step", "nms"} and 0 <= evals[0]["nms"]["AP50"] <= 1
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]


def test_resuming_with_another_model_names_the_settings(trained, tmp_path, capsys, monkeypatch):
    """Item 12: resuming a checkpoint of another model (or version) gave "Missing key(s) in state_dict"."""
    base, ckpt = trained
    run = tmp_path / "run"
    run.mkdir()
    state = torch.load(ckpt, weights_only=True)
    state["meta"]["locconf_version"] = "0.0.1"
    torch.save(state, run / "checkpoint_0000002.pth")
    monkeypatch.chdir(base)
    cfg = tiny_config(out_dir=str(run))
    cfg["model"]["quality"] = "iou_direct"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    line = one_line_error(capsys, ["train", str(tmp_path / "cfg.yaml"), "--resume", "--no-progress"])
    assert f"cannot resume from {run / 'checkpoint_0000002.pth'}: its weights do not fit this model: model " \
           "settings differ: quality: 'dir' in the checkpoint, 'iou_direct' here" in line
    assert "it was written by locconf 0.0.1, this is locconf" in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_0000002.pth"]  # nothing written


def test_training_refuses_to_write_over_its_inputs(tmp_path, capsys, monkeypatch):
    make_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    config = tmp_path / "run" / "metrics.jsonl"  # a config file named as the run's log
    config.write_text(yaml.safe_dump(tiny_config()))
    line = one_line_error(capsys, ["train", str(config), "--no-progress"])
    assert f"train.out_dir's metrics.jsonl {config} is the config" in line and config.exists()
    # the run's own config.yaml, resumed with: kept as it is (comments included)
    cfg_text = "# my notes\n" + yaml.safe_dump(tiny_config())
    (tmp_path / "run" / "config.yaml").write_text(cfg_text)
    assert run_command(["train", "run/config.yaml", "--no-progress"]) == 0
    assert (tmp_path / "run" / "config.yaml").read_text() == cfg_text


# -- one-line errors that name the argument, file or record ----------------------------------------


def test_user_mistakes_are_one_line_errors_naming_the_thing(trained, tmp_path, capsys, monkeypatch):
    """Item 11/13: each of these escaped as a KeyError, RuntimeError or IndexError with a traceback, or
    named the wrong thing (a folder reported as a missing file)."""
    base, ckpt = trained
    monkeypatch.chdir(base)
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pth")
    (tmp_path / "folder").mkdir()
    bad_gt = tmp_path / "gt.json"
    bad_gt.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1}],
                                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": "x"}]}))
    cands = candidates_file(tmp_path / "c.json")
    cases = [
        (["eval", "--checkpoint", str(tmp_path / "bare.pth")], r"holds no model weights \('model'\): it has a bare "
                                                                "state_dict"),
        (["eval", "--checkpoint", str(tmp_path / "folder")], "checkpoint .*folder is a folder, not a checkpoint file"),
        (["eval", str(tmp_path / "folder"), "--checkpoint", str(ckpt)], "config file .*folder is a folder"),
        (["eval", "--checkpoint", str(ckpt), "--device", "tpu7"], "device 'tpu7' is not a device: use cpu, cuda"),
        (["eval", "--checkpoint", str(ckpt), "--device", "cuda:7"], "device 'cuda:7': this machine has"),
        (["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e"), "--html", str(tmp_path / "folder")],
         "the output .*folder \\(html\\) is a folder: give a file name"),
        (["eval", "--checkpoint", str(ckpt), "--out", str(cands)], "c.json is a file, not a folder"),
        (["postprocess", str(cands), "--out", str(tmp_path / "o.json"), "--gt", str(bad_gt)],
         r"gt\.json: annotations\[0\] needs 'bbox' \[x, y, w, h\]"),
        (["postprocess", str(tmp_path / "folder"), "--out", str(tmp_path / "o.json")], "input .*folder is a folder"),
        (["postprocess", str(cands), "--out", str(tmp_path / "folder")], "output .*folder is a folder"),
        (["train", str(tmp_path / "folder")], "config file .*folder is a folder"),
        (["postprocess", str(cands), "--out", str(tmp_path / "o.json"), "--fuse-iou", "0.7"],
         "--fuse-iou applies to --fuse FILE"),  # was ignored without a word
        (["data", "synthetic", "--out", str(cands)], "--out .*c.json is a file: give a folder"),
    ]
    import re

    for argv, message in cases:
        line = one_line_error(capsys, argv + (["--no-progress"] if argv[0] not in ("train", "data") else []))
        assert re.search(message, line), (argv, line)


def test_an_exception_after_a_signal_is_reported_as_the_interruption(monkeypatch, capsys):
    """An interrupt that lands inside a library's import or compile comes out as whatever that library
    made of it (an AttributeError of a half-imported numpy was seen): still an interruption."""
    from locconf.cli import train as train_cmd

    def interrupted_then_broken(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pass  # swallowed, as a library might
        raise AttributeError("module 'numpy' has no attribute 'dtype'")

    monkeypatch.setattr(train_cmd, "run", interrupted_then_broken)
    assert main(["train", "x.yaml"]) == 143
    assert capsys.readouterr().err.strip() == "locconf train: terminated"


def test_oserrors_print_without_errno(tmp_path, capsys, monkeypatch):
    from locconf.cli import train as train_cmd

    def no_space(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(train_cmd, "run", no_space)
    assert one_line_error(capsys, ["train", "x.yaml"]) == \
        f"locconf train: error: {tmp_path / 'x'}: No space left on device"


# -- PrRoIPool -------------------------------------------------------------------------------------


def test_prroi_pool_names_a_list_of_the_wrong_length():
    """Item 12: 3 box tensors for 2 images, or boxes for no image, were "batch index out of range"."""
    from locconf.prroi_pool import prroi_pool

    features = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"rois is a list of 3 box tensors but features holds 2 image\(s\)"):
        prroi_pool(features, [torch.zeros(1, 4)] * 3, 2)
    assert prroi_pool(features[:0], [], 2).shape == (0, 1, 2, 2)  # no image, no box: empty
    with pytest.raises(ValueError, match="rois has 1 boxes but the feature map holds no image"):
        prroi_pool(features[:0], torch.zeros(1, 5), 2)
    assert math.isfinite(float(prroi_pool(features, [torch.zeros(0, 4), torch.tensor([[0.0, 0, 2, 2]])], 2).sum()))
