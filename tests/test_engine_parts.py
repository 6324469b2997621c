"""The parts of the training loop in their own modules: schedule, sampler, metrics log, run state."""

from __future__ import annotations

import inspect
import json
import random

import pytest
import torch
from torch import nn

import locconf.engine.train as train_mod
from locconf.engine import metrics_log, run_state, sampler, schedule, step
from locconf.engine.checkpoint import get_rng_state


def test_engine_train_re_exports_the_same_objects():
    for name, module in (("lr_factor", schedule), ("build_lr_scheduler", schedule), ("sample_seed", sampler),
                         ("InfiniteBatchSampler", sampler), ("SeededDataset", sampler),
                         ("seed_everything", sampler), ("NonFiniteLossError", step),
                         ("METRICS_FILE", metrics_log)):
        assert name in train_mod.__all__
        assert getattr(train_mod, name) is getattr(module, name)


def test_is_int_and_is_number_refuse_bools_and_non_finite():
    assert schedule.is_int(3) and not schedule.is_int(True) and not schedule.is_int(3.0)
    assert schedule.is_number(0.5) and schedule.is_number(2)
    assert not schedule.is_number(False) and not schedule.is_number(float("nan")) and not schedule.is_number("1")


def test_build_lr_scheduler_has_the_defaults_of_lr_factor():
    # the scheduler repeats lr_factor's keyword signature (it wraps it); the defaults must agree
    factor = inspect.signature(schedule.lr_factor).parameters
    scheduler = inspect.signature(schedule.build_lr_scheduler).parameters
    assert list(factor)[1:] == list(scheduler)[1:]
    assert all(factor[k].default == scheduler[k].default for k in list(factor)[1:])


def test_metrics_log_writes_on_rank_0_only_and_truncates(tmp_path):
    path = tmp_path / metrics_log.METRICS_FILE
    log = metrics_log.MetricsLog(path)
    for s in (1, 2, 3):
        log.write({"type": "train", "step": s, "loss": torch.tensor(0.5 * s)})
    log.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "train", "st')  # a line cut short by a kill
    nothing = metrics_log.MetricsLog(None)
    nothing.write({"step": 9})
    nothing.close()
    metrics_log.truncate_log(path, 2)
    assert [json.loads(line) for line in open(path)] == [{"type": "train", "step": 1, "loss": 0.5},
                                                         {"type": "train", "step": 2, "loss": 1.0}]
    assert metrics_log.temp_files(tmp_path) == []
    metrics_log.truncate_log(tmp_path / "missing.jsonl", 1)  # no file, nothing to do


def _run(tmp_path, world_size: int = 1) -> run_state.TrainingRun:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return run_state.TrainingRun(
        model=model, params=list(model.parameters()), optimizer=optimizer,
        scheduler=schedule.build_lr_scheduler(optimizer, iterations=10),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loader_generator=torch.Generator(), settings={"seed": 3, "iterations": 10}, device=torch.device("cpu"),
        rank=0, world_size=world_size, out_dir=tmp_path, batches_per_epoch=3,
    )


def test_advance_sampler_wraps_into_the_next_epoch(tmp_path):
    run = _run(tmp_path)
    places = []
    for _ in range(7):
        run.advance_sampler()
        places.append((run.epoch, run.position))
    assert places == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]


def test_save_run_then_load_into_restores_the_run(tmp_path):
    run = _run(tmp_path)
    run.epoch, run.position = 4, 2
    path = run_state.save_run(run, 7, keep_checkpoints=1)
    assert path.name == "checkpoint_0000007.pth"
    ckpt_file, ckpt, unreadable = run_state.load_for_resume(tmp_path, True)
    assert ckpt_file == path and unreadable == [] and ckpt["world_size"] == 1
    assert ckpt["sampler"] == {"epoch": 4, "position": 2}
    fresh = _run(tmp_path)
    run_state.load_into(fresh, ckpt_file, ckpt, iterations=10)
    assert (fresh.start_step, fresh.epoch, fresh.position) == (7, 4, 2)
    assert torch.equal(fresh.model.weight, run.model.weight)
    with pytest.raises(ValueError, match="beyond iterations=5"):
        run_state.load_into(_run(tmp_path), ckpt_file, ckpt, iterations=5)
    other = _run(tmp_path)
    other.settings = {"seed": 4, "iterations": 10}
    with pytest.raises(ValueError, match=r"other settings \(seed: 3 -> 4\)"):
        run_state.load_into(other, ckpt_file, ckpt, iterations=10)


def test_settings_differences_compare_lists_and_tuples_alike():
    saved = {"steps": [0.7, 0.9], "lr": 0.02, "gone": 1}
    assert run_state.settings_differences(saved, {"steps": (0.7, 0.9), "lr": 0.02}) == []
    assert run_state.settings_differences(saved, {"steps": (0.5,), "lr": 0.01}) == [
        "lr: 0.02 -> 0.01", "steps: [0.7, 0.9] -> (0.5,)"]


def test_restore_rng_sets_this_ranks_state_or_reseeds_with_a_warning(tmp_path):
    torch.manual_seed(11)
    random.seed(11)
    states = [get_rng_state()]
    expected = (torch.rand(3), random.random())
    run_state.restore_rng(_run(tmp_path), states)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    with pytest.warns(UserWarning, match="RNG states of 1 processes, this run has 2"):
        run_state.restore_rng(_run(tmp_path, world_size=2), states)
