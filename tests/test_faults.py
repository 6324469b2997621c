"""Fault injection for training: kills at random steps and during saves, a full disk, corrupt
checkpoints and NaN losses. After each fault, resuming must give the losses and weights of the
uninterrupted run bit for bit (one thread, CPU), and nothing may be lost or half-written.

One tiny torchvision Faster R-CNN (64 px, 16 FPN channels) on 8 synthetic scenes with random
flips/rotations/jitter, 6 steps with a checkpoint every 2: the uninterrupted reference is trained
once per module.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from locconf.data import SyntheticScenes, build_transforms
from locconf.engine import checkpoint as ckpt_mod
from locconf.engine.checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint
from locconf.engine.train import NonFiniteLossError, train
from locconf.models import build_torchvision_frcnn

ITERATIONS, EVERY = 6, 2
SETTINGS = dict(iterations=ITERATIONS, batch_size=2, lr=0.02, warmup_iters=2, checkpoint_every=EVERY,
                keep_checkpoints=None, log_every=1, seed=11, progress=False)

#: What torch.save raises when the disk fills up under its zip writer.
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:671] . unexpected pos 15926720 vs 15926616"


def tiny_model(init_seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(init_seed)
    return build_torchvision_frcnn(2, fpn_channels=16, representation_size=32, min_size=64, max_size=64,
                                   rpn_batch_size_per_image=32, box_batch_size_per_image=16)


def tiny_dataset() -> SyntheticScenes:
    return SyntheticScenes(8, image_size=64, num_classes=2, min_size=8, max_size=24, max_objects=3, seed=0,
                           transforms=build_transforms(True))


def records(out_dir: Path) -> list[dict]:
    """The training records without their timings."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "data_time")} for line in lines]


def run(out_dir: Path, resume: bool | str = False, init_seed: int = 0, hook=None) -> dict:
    model = tiny_model(init_seed)
    if hook is not None:
        model.register_forward_pre_hook(hook)
    train(model, tiny_dataset(), out_dir=out_dir, resume=resume, **SETTINGS)
    return model.state_dict()


def assert_same_run(out_dir: Path, weights: dict, reference) -> None:
    ref_records, ref_weights = reference
    assert records(out_dir) == ref_records  # every loss term, total, lr, epoch: compared with ==
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


class Killed(Exception):
    """Stands for a kill: raised from inside the training step."""


def kill_at(step: int):
    """A forward pre-hook that raises at the forward of ``step`` (1-based)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == step:
            raise Killed(step)
    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    weights = run(out)
    torch.set_num_threads(threads)
    return records(out), weights


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# -- kills ----------------------------------------------------------------------------------------


def test_kills_at_random_steps_then_resume_bitwise(tmp_path, reference):
    assert [r["step"] for r in reference[0]] == list(range(1, ITERATIONS + 1))
    steps = sorted(random.Random(14).sample(range(1, ITERATIONS + 1), 3))
    out = tmp_path / "run"
    for step in steps:  # killed again and again in the same folder, resumed each time
        start = max([s for s, _ in list_checkpoints(out)], default=0)  # where this attempt resumes
        with pytest.raises(Killed):
            run(out, resume=True, init_seed=step if start else 0, hook=kill_at(step - start))
        done = [r["step"] for r in records(out)]
        assert done == list(range(1, step))  # every finished step is logged, none beyond
        assert [s for s, _ in list_checkpoints(out)] == list(range(EVERY, step, EVERY))
    weights = run(out, resume=True, init_seed=99)
    assert_same_run(out, weights, reference)


SAVE_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    import test_faults as tf
    from locconf.engine import checkpoint as ckpt_mod

    real_save, saves = torch.save, [0]

    def save_then_hang(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # the checkpoint of step 4: half written, then killed
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            time.sleep(600)
        return real_save(obj, f, *args, **kwargs)

    ckpt_mod.torch.save = save_then_hang
    tf.run(tf.Path(sys.argv[1]))
    """
)


def test_sigkill_during_a_save_then_resume_bitwise(tmp_path, reference):
    """SIGKILL while checkpoint 4 is being written: checkpoint 2 survives, the torn temp file is removed."""
    script = tmp_path / "victim.py"
    script.write_text(SAVE_KILL_SCRIPT)
    out = tmp_path / "run"
    victim = subprocess.Popen([sys.executable, str(script), str(out), str(Path(__file__).parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.glob(".checkpoint_0000004.pth.tmp.*")):
            if victim.poll() is not None:
                pytest.fail(f"training process ended: {victim.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the training process did not reach the save of step 4")
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    torn = list(out.glob(".checkpoint_*.tmp.*"))
    assert len(torn) == 1 and [s for s, _ in list_checkpoints(out)] == [2]
    weights = run(out, resume=True, init_seed=5)
    assert not torn[0].exists()
    assert_same_run(out, weights, reference)


# -- full disk ------------------------------------------------------------------------------------


def test_full_disk_during_training_then_resume_bitwise(tmp_path, reference, monkeypatch):
    real_save, saves = torch.save, [0]

    def full_at_second_save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:
            f.write(b"x" * 1000)
            raise RuntimeError(TORCH_DISK_FULL)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_at_second_save)
    disk_usage = ckpt_mod.shutil.disk_usage
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=1000))
    out = tmp_path / "run"
    with pytest.raises(OSError, match=r"no space left on device: writing checkpoint .*checkpoint_0000004\.pth"):
        run(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_0000002.pth", "metrics.jsonl"]
    assert load_checkpoint(out / "checkpoint_0000002.pth")["step"] == 2
    monkeypatch.undo()  # space freed
    weights = run(out, resume=True, init_seed=7)
    assert_same_run(out, weights, reference)


# -- corrupt checkpoints ----------------------------------------------------------------------------


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    """It used to fail with torch's "corrupted" message without the path (the other unreadable
    kinds, text and empty files, are load_checkpoint's tests in test_checkpoint.py)."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(out, hook=kill_at(ITERATIONS))  # checkpoints 2 and 4 written
    latest = checkpoint_path(out, 4)
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"resuming from .*checkpoint_0000002\.pth, the latest intact checkpoint, "
                                         r"because checkpoint .*checkpoint_0000004\.pth is truncated") as caught:
        weights = run(out, resume=True, init_seed=3)
    assert len(caught) == 1
    assert (out / "checkpoint_0000004.pth.corrupt").read_bytes() == data[: len(data) // 2]  # kept aside
    assert load_checkpoint(latest)["step"] == 4  # rewritten by the resumed run
    assert_same_run(out, weights, reference)


def test_no_readable_checkpoint_or_a_bad_explicit_one_writes_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_0000002.pth").write_text("not a checkpoint\n")
    (out / "checkpoint_0000004.pth").write_bytes(b"PK\x03\x04 torn")
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read: checkpoint .*_0000004\.pth is "
                                              r"truncated.*; checkpoint .*_0000002\.pth is not a checkpoint"):
        run(out, resume=True)
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint_0000002\.pth is not a checkpoint") as err:
        run(out, resume=str(out / "checkpoint_0000002.pth"))
    assert "weights_only" not in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_text_file_as_checkpoint_for_eval_is_named(tmp_path):
    from locconf.experiment import load_trained

    path = tmp_path / "weights.pth"
    path.write_text("these are not weights\n")
    cfg = {"model": {"arch": "torchvision_frcnn", "num_classes": 2}, "data": {}, "train": {}, "eval": {}}
    with pytest.raises(ValueError, match=r"checkpoint .*weights\.pth is not a checkpoint written by torch\.save"):
        load_trained(path, cfg)


# -- NaN loss -------------------------------------------------------------------------------------


def test_nan_loss_at_a_random_step_then_resume_bitwise(tmp_path, reference):
    """The NaN step is neither applied, logged nor saved; resuming without the fault gives the reference."""
    step = random.Random(5).randint(2, ITERATIONS)
    calls = [0]

    def nan_loss(module, args, output):
        calls[0] += 1
        if calls[0] == step:
            return {k: v * float("nan") if k == "loss_box_reg" else v for k, v in output.items()}
        return output

    model = tiny_model()
    model.register_forward_hook(nan_loss)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {step}: loss_box_reg=nan"):
        train(model, tiny_dataset(), out_dir=out, **SETTINGS)
    assert [r["step"] for r in records(out)] == list(range(1, step))
    assert [s for s, _ in list_checkpoints(out)] == list(range(EVERY, step, EVERY))
    weights = run(out, resume=True, init_seed=8)
    assert_same_run(out, weights, reference)
