"""Faults at the edges a user touches, for every command: outputs on inputs, interruptions, two processes.

* Property: for every command (train, eval, predict, postprocess, fuse), every output flag and
  every input, an output that is the input (spelled absolute, relative, through ``..`` or a
  symlink) is refused with a ``ValueError`` naming both, and the input is unchanged.
* Interruptions: real ``python -m locconf`` processes get SIGINT, SIGTERM and SIGKILL at seeded
  random points after they took their output's lock (i.e. while they work and write). After each,
  the outputs are the previous ones or the complete new ones; the exit code is 130, 143 or -9 (or
  0 when the command finished first); after the next, uninterrupted run there is no temporary file
  and no lock left.
* Concurrency: a second process into an output a first one holds is refused (exit 2) while the
  first finishes (exit 0); the folder is the first run's alone.

The commands run on a tiny synthetic data set (64 px) with a 2-step Faster R-CNN + DIR on timm's
``test_efficientnet`` trunk (a checkpoint of 1.5 MB); a process costs its imports (a few seconds).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locconf.cli import run_command
from locconf.engine.checkpoint import list_checkpoints, load_checkpoint
from locconf.files import TEMP_PATTERN

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def config(out_dir: str, iterations: int = 2, **train) -> dict:
    return {
        "model": dict(arch="rcnn", quality="dir", backbone="test_efficientnet", fpn_channels=16, min_size=64,
                      max_size=64, representation_size=32, candidates_per_image=100),
        "data": dict(source="coco", root="data", train_json="train.json", val_json="val.json"),
        "train": dict(dict(iterations=iterations, batch_size=1, lr=0.001, warmup_iters=1, out_dir=out_dir,
                           checkpoint_every=2, log_every=1, progress=False), **train),
        "eval": dict(methods=["nms", "quality"]),
    }


def candidates(path: Path, image_ids: list[int], per_image: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in image_ids:
        xy = (torch.rand(per_image, 2, generator=g) * 48).tolist()
        wh = (torch.rand(per_image, 2, generator=g) * 16 + 4).tolist()
        score, quality = torch.rand(per_image, generator=g).tolist(), torch.rand(per_image, generator=g).tolist()
        records += [{"image_id": i, "category_id": 1 + k % 2, "bbox": xy[k] + wh[k], "score": score[k],
                     "quality": quality[k]} for k in range(per_image)]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with data/, cfg.yaml, a trained run/ (checkpoint), candidates and a calibration."""
    from locconf.experiment.build import write_synthetic_splits

    base = tmp_path_factory.mktemp("faults_cli")
    write_synthetic_splits(base / "data", num_train=2, num_val=2, image_size=64, num_classes=2, seed=0)
    (base / "cfg.yaml").write_text(yaml.safe_dump(config("run")))
    previous = Path.cwd()
    os.chdir(base)
    try:
        torch.manual_seed(0)
        assert run_command(["train", "cfg.yaml", "--no-progress", "-q"]) == 0
    finally:
        os.chdir(previous)
    val_ids = [im["id"] for im in json.loads((base / "data" / "val.json").read_text())["images"]]
    candidates(base / "c1.json", val_ids, 40, seed=1)
    candidates(base / "c2.json", val_ids, 40, seed=2)
    # many images: the interrupt suite's postprocess runs long enough to be hit while it writes
    candidates(base / "big.json", list(range(400)), 60, seed=3)
    (base / "cal.json").write_text(json.dumps({"format": "locconf-calibration", "version": 1, "kind": "isotonic",
                                               "signals": {"quality": {"x": [0.1, 0.9], "y": [0.55, 0.85]}},
                                               "info": {"n": 100}}))
    return base


def files_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def leftovers(folder: Path) -> list[str]:
    """Temporary files and locks anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if TEMP_PATTERN.match(p.name) or p.name.endswith(".locconf.lock"))


# -- property: no output on an input ---------------------------------------------------------------

#: (command line, the output flag's value, the input it lands on), paths relative to the world.
CASES = [
    *[(["eval", "cfg.yaml", "--checkpoint", "run/checkpoint_0000002.pth", "--out", "ev"], flag, target)
      for flag in ("--html", "--out") for target in ("cfg.yaml", "run/checkpoint_0000002.pth")],
    *[(["eval", "cfg.yaml", "--checkpoint", "run/checkpoint_0000002.pth", "--out", "ev"], "--html", target)
      for target in ("data/val.json", "data/val/000000.png")],
    *[(["predict", "data/val/000000.png", "--checkpoint", "run/checkpoint_0000002.pth", "--config", "cfg.yaml",
        "--calibration", "cal.json", "--out", "p.png"], flag, target)
      for flag in ("--out", "--csv", "--json")
      for target in ("data/val/000000.png", "run/checkpoint_0000002.pth", "cfg.yaml", "cal.json")],
    *[(["postprocess", "c1.json", "--gt", "data/val.json", "--calibration", "cal.json", "--out", "o.json"], "--out",
       target) for target in ("c1.json", "data/val.json", "cal.json")],
    *[(["postprocess", "--fuse", "c1.json", "c2.json", "--gt", "data/val.json", "--out", "o.json"], "--out", target)
      for target in ("c1.json", "c2.json", "data/val.json")],
    *[(["train", target], "train.out_dir", target) for target in ("run_p/metrics.jsonl",
                                                                  "run_p/checkpoint_0000002.pth")],
]


def spell(world: Path, target: str, how: str) -> str:
    """``target`` (relative to ``world``) spelled ``how``: one file, four names."""
    if how == "relative":
        return target
    if how == "absolute":
        return str(world / target)
    if how == "dotdot":
        return f"data/../{target}"
    link = world / "links" / target.replace("/", "_")
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(world / target)
    return str(link)


def with_output(argv: list[str], flag: str, value: str) -> list[str]:
    if flag == "train.out_dir":  # the config itself lies where the run writes: train.out_dir is its folder
        return argv
    if flag in argv:
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [flag, value]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), how=st.sampled_from(["relative", "absolute", "dotdot", "symlink"]))
def test_no_output_lands_on_an_input(world, case, how):
    argv, flag, target = case
    if flag == "train.out_dir":  # the config, named as a file the run writes into its out_dir
        (world / "run_p").mkdir(exist_ok=True)
        (world / target).write_text(yaml.safe_dump(config("run_p")))
        before = (world / target).read_bytes()
        argv = ["train", spell(world, target, how)]
    else:
        before = (world / target).read_bytes()
        argv = with_output(argv, flag, spell(world, target, how))
    previous = Path.cwd()
    os.chdir(world)
    try:
        with pytest.raises(ValueError, match=r"is (the|inside the) .*one of this command's inputs"):
            run_command(argv + ["--no-progress", "-q"])
    finally:
        os.chdir(previous)
    assert (world / target).read_bytes() == before
    assert leftovers(world) == []


# -- interruptions ---------------------------------------------------------------------------------


def start(world: Path, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "locconf", *argv, "--no-progress"], cwd=world, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Until ``path`` exists (True) or ``proc`` ended (False)."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{proc.args} did not take {path} in {timeout} s")
        time.sleep(0.01)
    return True


def timed_run(world: Path, argv: list[str], lock: Path) -> float:
    """Run to the end; the seconds from taking ``lock`` to the exit (the window an interrupt may hit)."""
    proc = start(world, argv)
    wait_for(lock, proc)
    t0 = time.time()
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    return time.time() - t0


def interrupt(world: Path, argv: list[str], lock: Path, signum: int, delay: float) -> tuple[int, str]:
    """Start ``argv``, send ``signum`` ``delay`` seconds after it took ``lock``; its exit code and stderr."""
    proc = start(world, argv)
    if wait_for(lock, proc):
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signum)
    err = proc.communicate(timeout=600)[1]
    return proc.returncode, err


EXPECTED_CODE = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def interruption_chain(world: Path, name: str, first: list[str], second: list[str], lock: Path, state, seed: int):
    """``first`` to the end (the previous outputs), then ``second`` interrupted by SIGINT, SIGTERM and
    SIGKILL at seeded random points after it took ``lock``, then ``second`` to the end. Every state seen
    must be the previous one or the final one; nothing temporary may remain at the end."""
    rng = random.Random(seed)
    assert run_subprocess(world, first) == 0
    previous = state()
    window = timed_run(world, second, lock)
    new = state()
    assert new != previous, "the two runs must write different outputs"
    assert run_subprocess(world, first) == 0 and state() == previous  # back to the previous outputs
    for signum in SIGNALS:
        delay = rng.uniform(0, window)
        code, err = interrupt(world, second, lock, signum, delay)
        assert code in (EXPECTED_CODE[signum], 0), f"{name} {signal.Signals(signum).name} at {delay:.2f} s: {err}"
        if code != -signal.SIGKILL:
            assert "Traceback" not in err, err
        seen = state()
        assert seen in (previous, new), f"{name}: a mixed set after {signal.Signals(signum).name} at {delay:.2f} s"
        if signum != signal.SIGKILL:
            assert leftovers(world) == [], (signal.Signals(signum).name, leftovers(world))
    assert run_subprocess(world, second) == 0 and state() == new
    assert leftovers(world) == []


def run_subprocess(world: Path, argv: list[str]) -> int:
    proc = start(world, argv)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    return proc.returncode


def test_interrupted_postprocess_keeps_the_previous_output(world):
    out = world / "pp.json"

    def state():
        return out.read_bytes() if out.exists() else None

    interruption_chain(world, "postprocess", ["postprocess", "big.json", "--out", "pp.json", "--method", "nms"],
                       ["postprocess", "big.json", "--out", "pp.json", "--method", "soft-gaussian"],
                       world / ".pp.json.locconf.lock", state, seed=1)


def test_interrupted_fuse_keeps_the_previous_output(world):
    out = world / "fused.json"

    def state():
        return out.read_bytes() if out.exists() else None

    interruption_chain(world, "fuse", ["postprocess", "--fuse", "big.json", "big.json", "--out", "fused.json"],
                       ["postprocess", "--fuse", "big.json", "big.json", "--out", "fused.json", "--conf-type", "max",
                        "--method", "none"],
                       world / ".fused.json.locconf.lock", state, seed=2)


def test_interrupted_eval_leaves_one_whole_set(world):
    out = world / "ev_int"

    def state():
        if not out.exists():
            return None
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}

    common = ["eval", "--checkpoint", "run/checkpoint_0000002.pth", "--out", "ev_int", "--html", "ev_int.html"]
    interruption_chain(world, "eval", common + ["--methods", "nms"], common + ["--methods", "nms,soft-linear"],
                       out / ".locconf.lock", lambda: (state(), (world / "ev_int.html").read_bytes()), seed=3)


def test_interrupted_training_resumes_to_a_whole_run(world):
    """Fresh, then resumed three times under SIGINT, SIGTERM and SIGKILL at random points, then resumed
    to the end: every checkpoint on disk loads, and the final log has every step once."""
    (world / "train_int.yaml").write_text(yaml.safe_dump(config("run_int", iterations=8)))
    run, lock = world / "run_int", world / "run_int" / ".locconf.lock"
    rng = random.Random(4)
    window = 6.0
    argv = ["train", "train_int.yaml"]
    for k, signum in enumerate(SIGNALS):
        code, err = interrupt(world, argv + (["--resume"] if k else []), lock, signum, rng.uniform(0, window))
        assert code in (EXPECTED_CODE[signum], 0), err
        for _, path in list_checkpoints(run):
            assert load_checkpoint(path)["step"] > 0
        if signum != signal.SIGKILL:
            assert leftovers(world / "run_int") == [], leftovers(world / "run_int")
    assert run_subprocess(world, argv + ["--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert [s for s, _ in list_checkpoints(run)][-1] == 8 and leftovers(run) == []


# -- two processes, one output ---------------------------------------------------------------------


def hold_and_second(world: Path, first: list[str], second: list[str], lock: Path) -> tuple[str, int]:
    """Start ``first``, stop it (SIGSTOP) as soon as it holds ``lock``, run ``second`` to its end, let
    ``first`` go on: ``(second's stderr, first's exit code)``."""
    a = start(world, first)
    assert wait_for(lock, a), a.communicate()[1][-3000:]
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = start(world, second)
        err_b = b.communicate(timeout=600)[1]
        code_b = b.returncode
    finally:
        os.kill(a.pid, signal.SIGCONT)
    err_a = a.communicate(timeout=600)[1]
    assert a.returncode == 0, err_a[-3000:]
    assert code_b == 2, f"the second process must be refused: {err_b[-3000:]}"
    return err_b, a.returncode


def test_two_trainings_into_one_folder(world):
    """Both used to exit 0, leaving run A's config.yaml and metrics beside run B's checkpoint."""
    (world / "a.yaml").write_text(yaml.safe_dump(config("run_two", iterations=2)))
    (world / "b.yaml").write_text(yaml.safe_dump(config("run_two", iterations=2, lr=0.002)))
    err, _ = hold_and_second(world, ["train", "a.yaml"], ["train", "b.yaml"], world / "run_two" / ".locconf.lock")
    line = err.strip().splitlines()[-1]
    assert line.startswith("locconf train: error: run_two is in use by locconf train (pid ") and \
        socket.gethostname() not in line
    saved = yaml.safe_load((world / "run_two" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.001
    ckpt = load_checkpoint(world / "run_two" / "checkpoint_0000002.pth")
    assert ckpt["meta"]["config"]["train"]["lr"] == 0.001 and leftovers(world / "run_two") == []


def test_two_evaluations_into_one_folder(world):
    common = ["eval", "--checkpoint", "run/checkpoint_0000002.pth", "--out", "ev_two"]
    err, _ = hold_and_second(world, common + ["--methods", "nms"], common + ["--methods", "soft-linear"],
                             world / "ev_two" / ".locconf.lock")
    assert "locconf eval: error: ev_two is in use by locconf eval" in err
    assert set(json.loads((world / "ev_two" / "results.json").read_text())["methods"]) == {"nms"}


def test_two_postprocess_into_one_file(world):
    err, _ = hold_and_second(world, ["postprocess", "big.json", "--out", "two.json"],
                             ["postprocess", "--fuse", "c1.json", "c2.json", "--out", "two.json"],
                             world / ".two.json.locconf.lock")
    assert "locconf postprocess: error: two.json is in use by locconf postprocess" in err
    assert len(json.loads((world / "two.json").read_text())) > 0 and leftovers(world) == []
