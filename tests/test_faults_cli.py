"""Faults at the edges a user touches, for every command: outputs on inputs, interruptions, two processes.

* Property: for every command (train, eval, predict, postprocess, fuse), every output flag and
  every input, an output that is the input (spelled absolute, relative, through ``..`` or a
  symlink) is refused with a ``ValueError`` naming both, and the input is unchanged.
* Interruptions: real ``python -m locconf`` processes (train, eval, postprocess, fuse) get SIGINT,
  SIGTERM and SIGKILL at seeded random points after they took their output's lock (i.e. while
  they work and write). After each, the outputs are the previous ones or the complete new ones;
  the exit code is 130, 143 or -9 (or 0 when the command finished first); after the next,
  uninterrupted run there is no temporary file and no lock left.
* Concurrency: a second process into an output that a first one holds (stopped with SIGSTOP while
  the second runs, so that the two overlap whatever the timing) is refused (exit 2), and the first
  finishes (exit 0) with outputs of its own alone.

The commands run on a tiny synthetic data set (64 px) with a 2-step Faster R-CNN + DIR on timm's
``test_efficientnet`` trunk (a checkpoint of 1.5 MB); a process costs its imports (a few seconds).
"""

from __future__ import annotations

import json
import os
import random
import signal
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
    candidates(base / "big.json", list(range(150)), 40, seed=3)
    candidates(base / "big2.json", list(range(150)), 40, seed=4)
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


# -- interruptions and a second process -------------------------------------------------------------


def start(world: Path, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "locconf", *argv, "--no-progress"], cwd=world, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def holds(lock: Path, proc: subprocess.Popen) -> bool:
    """Whether ``lock`` is ``proc``'s (not a stale one that a SIGKILL left)."""
    try:
        return json.loads(lock.read_text()).get("pid") == proc.pid
    except (OSError, ValueError):
        return False


def wait_for(lock: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Until ``proc`` holds ``lock`` (True) or ended (False)."""
    deadline = time.time() + timeout
    while not holds(lock, proc):
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{proc.args} did not take {lock} in {timeout} s")
        time.sleep(0.01)
    return True


def refused_while_held(world: Path, holder: subprocess.Popen, contender: list[str]) -> str:
    """Stop ``holder`` (which holds its lock), run ``contender`` to its end, let ``holder`` go on.

    The contender must be refused (exit 2, one line naming the holder): its error line."""
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        proc = start(world, contender)
        err = proc.communicate(timeout=600)[1]
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert proc.returncode == 2, f"a second process into a held output must be refused: {err[-3000:]}"
    line = err.strip().splitlines()[-1]
    assert f"is in use by locconf {contender[0]} (pid {holder.pid}, since" in line, line
    return line


def run_to_end(world: Path, argv: list[str], lock: Path, contender: list[str] | None = None) -> float:
    """Run ``argv`` to its end (a ``contender`` refused while it holds ``lock``); the seconds from taking
    ``lock`` to the exit: the window that an interrupt may hit."""
    proc = start(world, argv)
    assert wait_for(lock, proc), proc.communicate()[1][-3000:]
    if contender is not None:
        refused_while_held(world, proc, contender)
    t0 = time.time()
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    return time.time() - t0


EXPECTED_CODE = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def interrupt(world: Path, argv: list[str], lock: Path, signum: int, delay: float, done) -> None:
    """Start ``argv``; ``delay`` seconds after it took ``lock``, send ``signum``. Its exit code must say
    so: 130 (SIGINT), 143 (SIGTERM), killed (SIGKILL); or 0 when it finished first, or death by the signal
    when it came after the command had finished (``done()`` tells: its complete outputs are there)."""
    proc = start(world, argv)
    if wait_for(lock, proc):
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signum)
    err = proc.communicate(timeout=600)[1]
    what = f"{argv[0]}: {signal.Signals(signum).name} {delay:.2f} s after the lock (exit {proc.returncode})"
    assert proc.returncode in (EXPECTED_CODE[signum], 0) or (proc.returncode == -signum and done()), \
        f"{what}: {err[-3000:]}"
    if proc.returncode != -signal.SIGKILL:
        assert "Traceback" not in err, f"{what}: {err[-3000:]}"


def interruption_chain(world: Path, runs: dict[str, list[str]], lock: Path, state, seed: int, contender=None):
    """Outputs ``new`` (run ``runs["new"]`` to the end), then ``previous`` (``runs["previous"]``, with a
    ``contender`` refused meanwhile), then ``runs["new"]`` again, interrupted by SIGINT, SIGTERM and
    SIGKILL at seeded random points within the time the previous run took after taking ``lock``, then
    to the end. Every state seen must be the previous one or the new one; after a SIGINT or a SIGTERM,
    and at the end, no temporary file and no lock may remain."""
    rng = random.Random(seed)
    run_to_end(world, runs["new"], lock)
    new = state()
    window = run_to_end(world, runs["previous"], lock, contender)
    previous = state()
    assert new != previous, "the two runs must write different outputs"
    for signum in SIGNALS:
        interrupt(world, runs["new"], lock, signum, rng.uniform(0, window), lambda: state() == new)
        assert state() in (previous, new), f"a mixed set after {signal.Signals(signum).name}"
        if signum != signal.SIGKILL:
            assert leftovers(world) == [], (signal.Signals(signum).name, leftovers(world))
    run_to_end(world, runs["new"], lock)
    assert state() == new and leftovers(world) == []


def test_interrupted_postprocess_and_fuse_keep_a_whole_output(world):
    """The previous output is post-processed, the new one fused (the same writer, both commands' paths).
    A second process into the held output is refused."""
    out = world / "pp.json"
    interruption_chain(world, {"previous": ["postprocess", "big.json", "--out", "pp.json", "--method", "nms"],
                               "new": ["postprocess", "--fuse", "big.json", "big2.json", "--out", "pp.json"]},
                       world / ".pp.json.locconf.lock", lambda: out.read_bytes() if out.exists() else None, seed=1,
                       contender=["postprocess", "c1.json", "--out", "pp.json"])


def test_interrupted_eval_leaves_one_whole_set(world):
    """results.json, table.md, the plots, calibration.json and the HTML page are one set. A second
    evaluation into the held folder is refused."""
    out = world / "ev_int"

    def state():
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")} \
            if out.exists() else None
        return files, (world / "ev_int.html").read_bytes() if (world / "ev_int.html").exists() else None

    common = ["eval", "--checkpoint", "run/checkpoint_0000002.pth", "--out", "ev_int", "--html", "ev_int.html"]
    interruption_chain(world, {"previous": common + ["--methods", "nms"], "new": common + ["--methods", "nms,soft-linear"]},
                       out / ".locconf.lock", state, seed=3, contender=common + ["--methods", "soft-gaussian"])


def test_interrupted_training_resumes_to_a_whole_run(world):
    """A second training into the held folder is refused (both used to exit 0, leaving run A's
    config.yaml and metrics beside run B's checkpoint). The run is then interrupted by SIGINT, SIGTERM
    and SIGKILL at random points, resumed each time, and resumed to the end: every checkpoint on disk
    loads, the configuration is run A's, and the log has every step once."""
    (world / "train_a.yaml").write_text(yaml.safe_dump(config("run_int", iterations=8)))
    (world / "train_b.yaml").write_text(yaml.safe_dump(config("run_int", iterations=8, lr=0.002)))
    run, lock = world / "run_int", world / "run_int" / ".locconf.lock"
    rng = random.Random(4)
    a = start(world, ["train", "train_a.yaml"])
    assert wait_for(lock, a), a.communicate()[1]
    refused_while_held(world, a, ["train", "train_b.yaml"])
    a.send_signal(signal.SIGINT)
    assert a.wait(timeout=600) in (130, 0)
    for signum in SIGNALS[1:] + SIGNALS[:1]:
        interrupt(world, ["train", "train_a.yaml", "--resume"], lock, signum, rng.uniform(0, 4.0),
                  lambda: [s for s, _ in list_checkpoints(run)][-1:] == [8])
        for _, path in list_checkpoints(run):
            assert load_checkpoint(path)["meta"]["config"]["train"]["lr"] == 0.001
        if signum != signal.SIGKILL:
            assert leftovers(run) == [], leftovers(run)
    run_to_end(world, ["train", "train_a.yaml", "--resume"], lock)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.001
    assert [s for s, _ in list_checkpoints(run)][-1] == 8 and leftovers(run) == []
