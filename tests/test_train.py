"""Training loop: schedule, sampler, deterministic samples, a tiny Faster R-CNN run, non-finite losses."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from locconf.data import SyntheticScenes, build_transforms
from locconf.engine.train import (
    InfiniteBatchSampler,
    NonFiniteLossError,
    SeededDataset,
    build_lr_scheduler,
    lr_factor,
    train,
)
from locconf.models import build_torchvision_frcnn


# -- schedule -------------------------------------------------------------------------------


def test_step_schedule_hand_computed():
    kw = dict(iterations=100, warmup_iters=10, warmup_factor=0.001, schedule="step", steps=(0.7, 0.9), gamma=0.1)
    expected = {0: 0.001, 5: 0.001 * 0.5 + 0.5, 9: 0.001 * 0.1 + 0.9, 10: 1.0, 69: 1.0, 70: 0.1, 89: 0.1,
                90: 0.01, 99: 0.01}
    for it, f in expected.items():
        assert lr_factor(it, **kw) == pytest.approx(f, rel=1e-12), it


def test_cosine_schedule_hand_computed():
    kw = dict(iterations=100, warmup_iters=0, schedule="cosine")
    assert lr_factor(0, **kw) == pytest.approx(1.0)
    assert lr_factor(25, **kw) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12)
    # warm-up multiplies the cosine
    w = lr_factor(5, iterations=100, warmup_iters=10, warmup_factor=0.01, schedule="cosine")
    assert w == pytest.approx((0.01 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))


def test_lambda_lr_follows_lr_factor():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_lr_scheduler(opt, iterations=20, warmup_iters=4, warmup_factor=0.1, steps=(0.5,), gamma=0.5)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    hand = [0.5 * (0.1 + 0.9 * i / 4) for i in range(4)] + [0.5] * 6 + [0.25] * 10
    assert seen == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("bad", [dict(schedule="linear"), dict(steps=(0.9, 0.7)), dict(steps=(1.5,)),
                                 dict(warmup_iters=-1), dict(iterations=0), dict(gamma=0.0)])
def test_schedule_bad_arguments(bad):
    kw = dict(iterations=10, warmup_iters=0, schedule="step", steps=(0.5,), gamma=0.1)
    kw.update(bad)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_lr_scheduler(opt, **kw)


# -- sampler and per-sample seeds ---------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_sampler_epochs_reshuffle_and_resume_position():
    s = InfiniteBatchSampler(10, 3, seed=7)
    assert s.batches_per_epoch == 3
    batches = _take(iter(s), 9)  # three epochs
    epochs = [sorted(i for b in batches[3 * e:3 * e + 3] for i, _ in b) for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs)  # no repeats within an epoch (one sample dropped)
    orders = [[i for b in batches[3 * e:3 * e + 3] for i, _ in b] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    # the same sample gets a different seed in another epoch
    seeds = {(e, i): sd for e in range(3) for b in batches[3 * e:3 * e + 3] for i, sd in b}
    common = [i for i in orders[0] if i in orders[1]]
    assert seeds[(0, common[0])] != seeds[(1, common[0])]
    # starting at (epoch 1, position 2) continues the same stream
    resumed = _take(iter(InfiniteBatchSampler(10, 3, seed=7, epoch=1, position=2)), 4)
    assert resumed == batches[5:9]
    assert _take(iter(InfiniteBatchSampler(10, 3, seed=8)), 3) != batches[:3]


def test_sampler_shards_union_equals_single_process_batch():
    single = _take(iter(InfiniteBatchSampler(21, 4, seed=3)), 10)
    ranks = [_take(iter(InfiniteBatchSampler(21, 2, seed=3, rank=r, world_size=2)), 10) for r in range(2)]
    for k in range(10):
        assert ranks[0][k] + ranks[1][k] == single[k]


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteBatchSampler(10, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        InfiniteBatchSampler(3, 2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        InfiniteBatchSampler(10, 2, rank=2, world_size=2)


def test_seeded_dataset_is_independent_of_global_rng():
    ds = SeededDataset(SyntheticScenes(4, image_size=64, min_size=8, max_size=24, seed=1,
                                       transforms=build_transforms(True, min_size=48, max_size=48)))
    torch.manual_seed(0)
    a_img, a_t = ds[(2, 12345)]
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    torch.manual_seed(99)
    random.seed(99)
    b_img, b_t = ds[(2, 12345)]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    c_img, _ = ds[(2, 54321)]  # another seed, another augmentation (flip/rot/jitter: almost surely)
    assert not torch.equal(a_img, c_img)
    # loading a sample leaves the caller's RNG where it was
    torch.manual_seed(5)
    state = torch.get_rng_state()
    ds[(1, 1)]
    assert torch.equal(torch.get_rng_state(), state)
    assert before[0].shape == state.shape


# -- a tiny Faster R-CNN run --------------------------------------------------------------------


def tiny_frcnn(image_size: int = 128) -> nn.Module:
    return build_torchvision_frcnn(
        3, fpn_channels=32, representation_size=128, min_size=image_size, max_size=image_size,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64,
    )


def test_tiny_training_run_loss_falls_and_logs(tmp_path, one_thread):
    torch.manual_seed(0)
    model = tiny_frcnn()
    ds = SyntheticScenes(20, image_size=128, min_size=12, max_size=48, max_objects=5, seed=0,
                         transforms=build_transforms(True, jitter=False))
    calls = []

    def eval_fn(m, step):
        assert not m.training
        calls.append(step)
        torch.rand(100)  # must not disturb the training RNG
        return {"score": torch.tensor(0.5), "step_seen": step}

    summary = train(model, ds, iterations=30, batch_size=2, lr=0.02, warmup_iters=5, out_dir=tmp_path,
                    log_every=1, checkpoint_every=10, eval_every=15, eval_fn=eval_fn, clip_grad_norm=10.0,
                    progress=False)
    assert model.training
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_recs = [r for r in records if r["type"] == "train"]
    eval_recs = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_recs] == list(range(1, 31))
    keys = {"step", "epoch", "lr", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
            "total", "time", "data_time", "grad_norm"}
    assert all(keys <= set(r) for r in train_recs)
    for r in train_recs:
        terms = sum(v for k, v in r.items() if k.startswith("loss_"))
        assert r["total"] == pytest.approx(terms, rel=1e-5)
        assert r["lr"] == pytest.approx(0.02 * lr_factor(r["step"] - 1, iterations=30, warmup_iters=5))
    assert train_recs[-1]["epoch"] == 3  # 10 batches per epoch
    assert calls == [15, 30] and [r["step"] for r in eval_recs] == [15, 30]
    assert eval_recs[0]["score"] == 0.5
    totals = [r["total"] for r in train_recs]
    first, last = np.mean(totals[:5]), np.mean(totals[-5:])
    assert last < 0.75 * first, (first, last)
    assert summary["step"] == 30 and summary["eval"]["step_seen"] == 30
    assert summary["checkpoint"].endswith("checkpoint_0000030.pth")
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_0000010.pth", "checkpoint_0000020.pth", "checkpoint_0000030.pth"]
    # a fresh run into a folder with checkpoints must be explicit about resuming
    with pytest.raises(ValueError, match="resume"):
        train(model, ds, iterations=30, out_dir=tmp_path, progress=False)


# -- non-finite losses ------------------------------------------------------------------------


class NaNAtCall(nn.Module):
    """A toy 'detector' whose ``loss_box`` becomes NaN at its ``nan_call``-th forward."""

    def __init__(self, nan_call: int, term: str = "loss_box") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls, self.nan_call, self.term = 0, nan_call, term

    def forward(self, images, targets=None):
        self.calls += 1
        x = self.conv(torch.stack(images)).mean()
        losses = {"loss_cls": x ** 2, "loss_box": x.abs()}
        if self.calls == self.nan_call:
            losses[self.term] = losses[self.term] * float("nan")
        return losses


def test_non_finite_loss_names_step_and_term(tmp_path):
    ds = SyntheticScenes(4, image_size=32, min_size=8, max_size=16, seed=0)
    model = NaNAtCall(nan_call=3)
    with pytest.raises(NonFiniteLossError, match=r"step 3\b.*loss_box=nan") as err:
        train(model, ds, iterations=10, batch_size=2, lr=0.01, warmup_iters=0, out_dir=tmp_path,
              log_every=1, progress=False)
    assert isinstance(err.value, ValueError)
    assert "loss_cls" not in str(err.value)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2]  # the bad step was not applied nor logged


def test_train_bad_arguments(tmp_path):
    ds = SyntheticScenes(4, image_size=32, min_size=8, max_size=16, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        train(NaNAtCall(0), ds, iterations=2, batch_size=0, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="amp"):
        train(NaNAtCall(0), ds, iterations=2, amp=True, device="cpu", out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        train(NaNAtCall(0), ds, iterations=2, eval_every=1, out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("bad", [dict(iterations=True), dict(batch_size=True), dict(warmup_iters=False),
                                 dict(lr=True), dict(lr=float("nan")), dict(momentum="0.9"), dict(seed=True),
                                 dict(steps=(0.5, True)), dict(steps=0.5), dict(clip_grad_norm=True),
                                 dict(keep_checkpoints=True), dict(amp=1), dict(log_every=2.0)])
def test_train_rejects_bools_and_non_numbers(tmp_path, bad):
    """``iterations: true`` used to train one step: a bool is never a count or a rate."""
    ds = SyntheticScenes(4, image_size=32, min_size=8, max_size=16, seed=0)
    kw = dict(iterations=2, warmup_iters=0, out_dir=tmp_path, progress=False)
    kw.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        train(NaNAtCall(0), ds, **kw)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_diverged_dir_head_raises_non_finite_loss_error(tmp_path, one_thread):
    """A diverging DIR detector used to fail inside the head with 'boxes contains NaN or inf'."""
    from locconf.experiment import build_model

    torch.manual_seed(0)
    model = build_model(arch="rcnn", quality="dir", num_classes=2, fpn_channels=16, min_size=64, max_size=64,
                        representation_size=32, quality_representation_size=32, box_batch_size_per_image=16,
                        rpn_batch_size_per_image=32)
    ds = SyntheticScenes(4, image_size=64, num_classes=2, min_size=8, max_size=24, seed=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite values in the forward pass at step \d+: .*NaN") as err:
        train(model, ds, iterations=6, batch_size=2, lr=1e3, warmup_iters=0, out_dir=tmp_path, log_every=1,
              progress=False, clip_grad_norm=None)  # the default clipping would keep it finite
    step = int(err.value.args[0].split("at step ")[1].split(":")[0])
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == list(range(1, step))


def test_nan_parameters_are_named_when_the_forward_pass_fails(tmp_path):
    class Validating(NaNAtCall):
        def forward(self, images, targets=None):
            if not torch.isfinite(self.conv.weight).all():
                raise ValueError("boxes contains NaN or inf")
            return super().forward(images, targets)

    model = Validating(nan_call=0)
    ds = SyntheticScenes(4, image_size=32, min_size=8, max_size=16, seed=0)
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"at step 1: parameters conv\.weight are NaN or infinite"):
        train(model, ds, iterations=3, batch_size=2, warmup_iters=0, out_dir=tmp_path, progress=False)


def test_other_forward_errors_pass_through(tmp_path):
    class Broken(NaNAtCall):
        def forward(self, images, targets=None):
            raise ValueError("targets[0] has no 'labels'")

    ds = SyntheticScenes(4, image_size=32, min_size=8, max_size=16, seed=0)
    with pytest.raises(ValueError, match="no 'labels'") as err:
        train(Broken(0), ds, iterations=2, warmup_iters=0, out_dir=tmp_path, progress=False)
    assert not isinstance(err.value, NonFiniteLossError)
