"""Checkpoints: atomic writes, latest-checkpoint discovery, RNG states, and exact resumption after SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import re
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from locconf.engine import checkpoint as ckpt_mod
from locconf.engine.checkpoint import (
    checkpoint_path,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


def test_checkpoint_path_and_discovery(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 40, 300):
        save_checkpoint({"step": step}, checkpoint_path(tmp_path, step))
    # leftovers of an interrupted write and unrelated files are ignored
    (tmp_path / ".checkpoint_0000900.pth.tmp.12345").write_bytes(b"\x00partial")
    (tmp_path / "checkpoint_final.pth").write_bytes(b"x")
    (tmp_path / "checkpoint_0000999.pth.bak").write_bytes(b"x")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 40, 300]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_0000300.pth"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 300
    with pytest.raises(ValueError, match="step"):
        checkpoint_path(tmp_path, -1)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth")


def test_save_is_temp_file_then_replace(tmp_path, monkeypatch):
    calls = []
    real_replace, real_fsync = os.replace, os.fsync

    def spy_replace(src, dst):
        calls.append(("replace", Path(src), Path(dst), Path(src).stat().st_size))
        real_replace(src, dst)

    def spy_fsync(fd):
        calls.append(("fsync",))
        real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "replace", spy_replace)
    monkeypatch.setattr(ckpt_mod.os, "fsync", spy_fsync)
    dst = checkpoint_path(tmp_path, 7)
    save_checkpoint({"w": torch.arange(1000)}, dst)
    kinds = [c[0] for c in calls]
    assert "replace" in kinds and kinds.index("fsync") < kinds.index("replace")  # data synced before rename
    _, src, target, size = calls[kinds.index("replace")]
    assert target == dst and src.parent == dst.parent and src.name != dst.name
    assert ckpt_mod.CHECKPOINT_PATTERN.match(src.name) is None and size > 0
    assert not src.exists() and torch.equal(load_checkpoint(dst)["w"], torch.arange(1000))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    dst = checkpoint_path(tmp_path, 1)
    save_checkpoint({"v": 1}, dst)
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"v": 2}, dst)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(dst)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]  # no temp file left behind


#: What torch.save raises when the disk fills up under its zip writer (seen on a full volume).
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:671] . unexpected pos 15926720 vs 15926616"


def free_space(monkeypatch, free: int) -> None:
    """Make the checkpoint module see ``free`` bytes free on every disk."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_full_disk_says_so_with_the_path(tmp_path, monkeypatch):
    dst = checkpoint_path(tmp_path, 2)
    save_checkpoint({"v": 1}, dst)

    def full(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    free_space(monkeypatch, 10)
    with pytest.raises(OSError, match=r"no space left on device: writing checkpoint .*checkpoint_0000002\.pth") as err:
        save_checkpoint({"v": 2}, dst)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(dst)
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]  # temp file removed, old checkpoint kept
    monkeypatch.undo()
    assert load_checkpoint(dst)["v"] == 1


def test_unexpected_pos_with_free_space_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """torch's "unexpected pos" also follows a failed write for other reasons: with the space there, it
    propagates as it is (it used to be reported as "no space left on device" whatever the cause)."""
    dst = checkpoint_path(tmp_path, 2)

    def short(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(ckpt_mod.torch, "save", short)
    free_space(monkeypatch, 10**12)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint({"w": torch.zeros(1000)}, dst)
    assert list(tmp_path.iterdir()) == []


class Writer:
    """A file whose writes raise ``interrupt`` after ``limit`` bytes, as Ctrl-C during ``torch.save`` does."""

    def __init__(self, path, mode, interrupt, limit=5000):
        self.f, self.interrupt, self.limit, self.n = open(path, mode), interrupt, limit, 0

    def write(self, data):
        self.n += len(data)
        if self.n > self.limit:
            raise self.interrupt
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("kind", ["sigint", "sigterm"])
def test_an_interrupt_while_saving_stays_an_interrupt(tmp_path, monkeypatch, kind):
    """Ctrl-C inside torch.save's writer reaches torch as an exception in its callback, which torch
    reports as "unexpected pos": it used to be turned into "no space left on device"."""
    from locconf.cli import Terminated

    interrupt = KeyboardInterrupt() if kind == "sigint" else Terminated()
    dst = checkpoint_path(tmp_path, 3)
    save_checkpoint({"v": 1}, dst)
    monkeypatch.setattr(ckpt_mod, "open", lambda path, mode: Writer(path, mode, interrupt), raising=False)
    free_space(monkeypatch, 0)  # even on a full disk, an interrupt is an interrupt
    with pytest.raises(KeyboardInterrupt) as err:
        save_checkpoint({"w": torch.zeros(100_000)}, dst)
    assert type(err.value) is type(interrupt)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [dst.name] and load_checkpoint(dst)["v"] == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_real_enospc_from_dev_full(tmp_path, monkeypatch):
    """torch.save really writing into a full device (Linux's /dev/full): OSError ENOSPC, named."""
    real_open = open
    monkeypatch.setattr(ckpt_mod, "open", lambda path, mode: real_open("/dev/full", mode), raising=False)
    with pytest.raises(OSError, match="no space left on device.*checkpoint_0000003.pth") as err:
        save_checkpoint({"w": torch.zeros(10000)}, checkpoint_path(tmp_path, 3))
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b"step: 3\nweights: none\n", "is not a checkpoint written by torch.save"),
    ("truncated", "is truncated or corrupted"),
    ("list", "holds a list"),
])
def test_unreadable_checkpoints_are_named(tmp_path, content, problem):
    path = tmp_path / "checkpoint_0000001.pth"
    if content == "truncated":
        save_checkpoint({"w": torch.arange(1000.0)}, path)
        path.write_bytes(path.read_bytes()[:700])
    elif content == "list":
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)
    with pytest.raises(ckpt_mod.CheckpointError, match=f"checkpoint {re.escape(str(path))} {problem}") as err:
        load_checkpoint(path)
    assert isinstance(err.value, ValueError) and "weights_only" not in str(err.value)


def test_clean_temp_files_removes_only_the_writers_leftovers(tmp_path):
    save_checkpoint({"v": 1}, checkpoint_path(tmp_path, 1))
    stale = [tmp_path / ".checkpoint_0000002.pth.tmp.4242", tmp_path / ".checkpoint_0000003.pth.tmp.7"]
    keep = [tmp_path / "notes.tmp.1", tmp_path / ".checkpoint_final.pth.tmp.3"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    assert ckpt_mod.clean_temp_files(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint_0000001.pth"] + [p.name for p in keep])
    assert ckpt_mod.clean_temp_files(tmp_path / "missing") == []


def test_rng_state_round_trip_through_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in the numpy state
    path = save_checkpoint({"rng": get_rng_state()}, tmp_path / "checkpoint_0000001.pth")
    first = (random.random(), np.random.normal(), torch.rand(3))
    set_rng_state(load_checkpoint(path)["rng"])
    second = (random.random(), np.random.normal(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


# -- kill and resume ----------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    from locconf.data import SyntheticScenes, build_transforms
    from locconf.engine.train import train
    from locconf.models import build_torchvision_frcnn

    out_dir, block_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(123 if resume else 0)  # a resumed run must not depend on the initial weights
    model = build_torchvision_frcnn(3, fpn_channels=16, representation_size=64, min_size=96, max_size=96,
                                    rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    if block_at:
        calls = [0]
        def block(module, args):
            calls[0] += 1
            if calls[0] == block_at:
                time.sleep(600)  # wait here to be killed
        model.register_forward_pre_hook(block)
    ds = SyntheticScenes(10, image_size=96, min_size=10, max_size=40, max_objects=4, seed=0,
                         transforms=build_transforms(True))
    train(model, ds, iterations=12, batch_size=2, lr=0.02, warmup_iters=3, out_dir=out_dir,
          checkpoint_every=4, log_every=1, resume=resume, seed=5, progress=False)
    torch.save(model.state_dict(), out_dir + "/final_weights.pt")
    """
)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    full, killed = tmp_path / "full", tmp_path / "killed"
    py = [sys.executable, str(script)]
    ref = subprocess.Popen(py + [str(full), "0", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(py + [str(killed), "7", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:  # step 6 logged: checkpoint 4 is written, step 7 is blocked
            if victim.poll() is not None:
                pytest.fail(f"training process died: {victim.stderr.read().decode()[-2000:]}")
            recs = _records(killed / "metrics.jsonl")
            if recs and recs[-1]["step"] >= 6:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the training process did not reach step 6")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed) == checkpoint_path(killed, 4)
    assert [r["step"] for r in _records(killed / "metrics.jsonl")] == list(range(1, 7))
    (killed / ".checkpoint_0000008.pth.tmp.4242").write_bytes(b"torn write")  # as if killed mid-save

    resumed = subprocess.run(py + [str(killed), "0", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert ref.wait(timeout=120) == 0, ref.stderr.read().decode()[-2000:]

    a, b = _records(full / "metrics.jsonl"), _records(killed / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))  # stale steps 5-6 replaced
    loss_keys = [k for k in a[0] if k.startswith("loss_")] + ["total", "lr", "epoch"]
    for ra, rb in zip(a, b):
        for k in loss_keys:
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9), (ra["step"], k, ra[k], rb[k])
    wa, wb = torch.load(full / "final_weights.pt"), torch.load(killed / "final_weights.pt")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=k)
    state = load_checkpoint(latest_checkpoint(killed))
    assert state["step"] == 12 and state["sampler"] == {"epoch": 2, "position": 2}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "loader_generator"} <= set(state)
