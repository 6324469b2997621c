"""The training loop shared by every locconf detector.

One iteration-based loop: SGD with momentum, linear warm-up then step or cosine decay
(:mod:`locconf.engine.schedule`), gradient clipping (on by default), AMP on CUDA, periodic evaluation, a
JSONL metrics log (:mod:`locconf.engine.metrics_log`), atomic checkpoints and exact resumption
(:mod:`locconf.engine.run_state`). The model follows torchvision's detection API: in training mode
``model(images, targets)`` returns a dict of named scalar losses, which are summed
(:mod:`locconf.engine.step`).

Determinism and exact resumption. The data order and the augmentation of every sample are pure
functions of ``(seed, epoch, position)``, never of the global RNG state
(:mod:`locconf.engine.sampler`). The loop itself uses the global RNGs (e.g. the RPN and RoI
samplers of torchvision); their states are seeded with ``seed + rank`` and saved per rank in every
checkpoint together with the model, optimizer, scheduler, GradScaler, step and sampler position.
``resume=True`` restores all of them, so the losses after resuming are those of an uninterrupted
run (on the same hardware and thread count; on CUDA also set
``torch.use_deterministic_algorithms`` for bitwise equality).

Distributed: run the same script under ``torchrun --nproc_per_node N``; :func:`train` joins the
process group (NCCL on CUDA, gloo on CPU), wraps the model in DistributedDataParallel, shards the
batches, averages the logged losses over ranks and lets only rank 0 write logs and checkpoints.

:func:`train` checks its arguments, sets the run up (:func:`_set_up`), resumes it
(:func:`_resume`), builds the data loader (:func:`_make_loader`) and prepares ``out_dir``
(:func:`_prepare_out_dir`); :func:`_iterate` then runs :func:`~locconf.engine.step.train_step`
and logs, evaluates (:func:`_evaluate`) and checkpoints (:func:`~locconf.engine.run_state.save_run`)
when due.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from ..progress import progress_bar

from locconf.data import collate_fn
from locconf.engine import distributed as du
from locconf.engine.checkpoint import clean_temp_files, describe_meta_difference, first_keys, list_checkpoints
from locconf.engine.metrics_log import METRICS_FILE, MetricsLog, temp_files, truncate_log
from locconf.engine.run_state import TrainingRun, load_for_resume, load_into, restore_rng, save_run
from locconf.engine.sampler import InfiniteBatchSampler, SeededDataset, isolated_rng, sample_seed, seed_everything
from locconf.engine.schedule import build_lr_scheduler, check_schedule, is_int, is_number, lr_factor
from locconf.engine.step import NonFiniteLossError, train_step

logger = logging.getLogger(__name__)

# Names defined in the modules above and imported from here by other code stay importable here.
__all__ = [
    "NonFiniteLossError",
    "lr_factor",
    "build_lr_scheduler",
    "sample_seed",
    "InfiniteBatchSampler",
    "SeededDataset",
    "seed_everything",
    "train",
    "METRICS_FILE",
]


# -- set-up -----------------------------------------------------------------------------------


def _check_train_arguments(
    *, batch_size: Any, log_every: Any, checkpoint_every: Any, num_workers: Any, lr: Any, momentum: Any,
    weight_decay: Any, clip_grad_norm: Any, amp: Any, keep_checkpoints: Any, eval_every: Any, eval_fn: Any, seed: Any,
) -> None:
    """The value checks of :func:`train` other than the schedule's; bools are never numbers."""
    for name, value, low in (("batch_size", batch_size, 1), ("log_every", log_every, 1),
                             ("checkpoint_every", checkpoint_every, 0), ("num_workers", num_workers, 0),
                             ("seed", seed, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value, low in (("keep_checkpoints", keep_checkpoints, 1), ("eval_every", eval_every, 1)):
        if value is not None and (not is_int(value) or value < low):
            raise ValueError(f"{name} must be an int >= {low} or None, got {value!r}")
    if not is_number(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not is_number(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if clip_grad_norm is not None and (not is_number(clip_grad_norm) or clip_grad_norm <= 0):
        raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    if amp is not None and not isinstance(amp, bool):
        raise ValueError(f"amp must be true, false or None, got {amp!r}")
    if eval_every is not None and eval_fn is None:
        raise ValueError(f"eval_every must be >= 1 and needs an eval_fn, got eval_every={eval_every}, eval_fn={eval_fn}")


def _freeze(model: nn.Module, freeze: Any) -> None:
    """``train.freeze``: freeze the part it names (see :func:`train`), or a ``ValueError`` saying what fits."""
    from locconf.models.posthoc import PosthocQuality, freeze_detector

    if freeze != "detector":
        raise ValueError(f"freeze must be None or 'detector', got {freeze!r}")
    if not isinstance(model, PosthocQuality):
        raise ValueError(f"freeze 'detector' trains a quality head on a frozen detector: it needs model.arch "
                         f"'posthoc' (locconf.models.posthoc.PosthocQuality), got a {type(model).__name__}")
    freeze_detector(model.detector)


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` this machine has; else a ``ValueError`` naming ``name`` and the choices."""
    if isinstance(device, torch.device):
        parsed = device
    else:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"{name} {device!r} is not a device: use cpu, cuda, cuda:1, ... "
                             "(or leave it out: cuda where available, else cpu)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: this machine has no usable CUDA device (torch {torch.__version__}"
                             f"{', built without CUDA' if torch.version.cuda is None else ''}): use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {device!r}: MPS is not available on this machine: use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ValueError(f"{name} {device!r} is not supported: use cpu or cuda")
    return parsed


def _resolve_device(device: str | torch.device | None, amp: bool | None, local_rank: int) -> tuple[torch.device, bool]:
    """The device (``cuda:<local_rank>`` when CUDA is available, else CPU) and whether to use AMP."""
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    if amp is None:
        amp = device.type == "cuda"
    if amp and device.type != "cuda":
        raise ValueError(f"amp=True needs a CUDA device, got device={device}")
    return device, amp


def _set_up(
    model: nn.Module, settings: dict[str, Any], device: torch.device, rank: int, world_size: int, out_dir: Path
) -> TrainingRun:
    """Seed the global RNGs with ``seed + rank``; move ``model`` to ``device``; build optimizer, schedule, scaler."""
    seed_everything(settings["seed"] + rank)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.SGD(
        params, lr=settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"]
    )
    schedule = ("iterations", "warmup_iters", "warmup_factor", "schedule", "steps", "gamma")
    scheduler = build_lr_scheduler(optimizer, **{k: settings[k] for k in schedule})
    scaler = torch.amp.GradScaler(device.type, enabled=settings["amp"])
    loader_generator = torch.Generator()
    loader_generator.manual_seed(settings["seed"])
    return TrainingRun(
        model=model, params=params, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        loader_generator=loader_generator, settings=settings, device=device, rank=rank, world_size=world_size,
        out_dir=out_dir,
    )


def _resume(run: TrainingRun, resume: bool | str | os.PathLike) -> tuple[dict | None, list[Path]]:
    """Restore ``run`` from the checkpoint ``resume`` names: ``(checkpoint or None, unreadable newer ones)``."""
    ckpt_file, ckpt, unreadable = load_for_resume(run.out_dir, resume)
    if ckpt is not None:
        try:
            load_into(run, ckpt_file, ckpt, run.settings["iterations"])
        except RuntimeError as e:  # load_state_dict: the weights of another model
            raise ValueError(f"cannot resume from {ckpt_file}: its weights do not fit this model: "
                             f"{describe_meta_difference(ckpt.get('meta') or {}, run.meta or {})}; resume with the "
                             f"configuration it was trained with, or train into another out_dir "
                             f"({first_keys(e)})") from None
        if run.main:
            logger.info("resuming from %s (step %d)", ckpt_file, run.start_step)
    elif run.main:
        logger.info("resume=True but %s holds no checkpoint: starting afresh", run.out_dir)
    return ckpt, unreadable


def _make_loader(run: TrainingRun, dataset: Dataset, num_workers: int) -> DataLoader:
    """This rank's endless batches, starting at ``run``'s sampler place."""
    sampler = InfiniteBatchSampler(
        len(dataset), run.settings["batch_size"], seed=run.settings["seed"], rank=run.rank, world_size=run.world_size
    )
    run.batches_per_epoch = sampler.batches_per_epoch
    if run.position >= run.batches_per_epoch:  # resumed on more processes (a larger global batch): epoch done
        run.epoch, run.position = run.epoch + 1, 0
    sampler.epoch, sampler.position = run.epoch, run.position
    return DataLoader(
        SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        pin_memory=run.device.type == "cuda", generator=run.loader_generator, persistent_workers=num_workers > 0,
    )


def _prepare_out_dir(
    run: TrainingRun, on_start: Callable[[], None] | None, unreadable: list[Path], resumed: bool
) -> None:
    """Rank 0, once every check has passed: the first writes into ``out_dir``.

    Create it, call ``on_start``, remove the temporary files of a run killed while writing, rename
    unreadable checkpoints to ``*.corrupt``, and cut the metrics log back to the checkpoint's step
    (resumed) or remove it (a fresh run).
    """
    out_dir = run.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    for stale in clean_temp_files(out_dir) + temp_files(out_dir):
        stale.unlink(missing_ok=True)
        logger.info("removed %s, left by a run killed while writing", stale)
    for bad in unreadable:
        bad.rename(bad.with_name(bad.name + ".corrupt"))
    log_path = out_dir / METRICS_FILE
    if resumed:
        truncate_log(log_path, run.start_step)
    elif log_path.exists():
        log_path.unlink()


# -- the loop ---------------------------------------------------------------------------------


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module, int], dict], step: int, log: MetricsLog) -> dict:
    """``eval_fn(model, step)`` in eval mode with the training RNG states preserved; logged as ``type="eval"``."""
    model.eval()
    try:
        with isolated_rng(cuda=True):
            metrics = eval_fn(model, step) or {}
    finally:
        model.train()
    log.write({"type": "eval", "step": step, **metrics})
    return metrics


def _iterate(
    run: TrainingRun, batches: Iterable, log: MetricsLog, bar, *, iterations: int, log_every: int,
    eval_fn: Callable[[nn.Module, int], dict] | None, eval_every: int | None, checkpoint_every: int,
    keep_checkpoints: int | None,
) -> dict[str, Any]:
    """Train from ``run.start_step`` to ``iterations``, logging, evaluating and saving when due; the summary."""
    losses: dict[str, float] = {}
    last_eval: dict | None = None
    last_ckpt: Path | None = None
    t_start = time.perf_counter()
    data_iter = iter(batches)
    step = run.start_step
    try:
        for step in range(run.start_step + 1, iterations + 1):
            losses, record = train_step(run, data_iter, step)
            if step % log_every == 0 or step == iterations:
                log.write(record)
                bar.set_postfix(loss=f"{losses['total']:.4f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == iterations):
                last_eval = _evaluate(run.model, eval_fn, step, log)
            if (checkpoint_every and step % checkpoint_every == 0) or step == iterations:
                last_ckpt = save_run(run, step, keep_checkpoints)
    finally:
        del data_iter  # stops the loader's workers now, also when an exception propagates
    return {
        "step": step,
        "start_step": run.start_step,
        "epoch": run.epoch,
        "losses": losses,
        "lr": run.optimizer.param_groups[0]["lr"],
        "eval": last_eval,
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "metrics_file": str(run.out_dir / METRICS_FILE),
        "seconds": time.perf_counter() - t_start,
        "world_size": run.world_size,
    }


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    iterations: int,
    batch_size: int = 2,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_iters: int = 100,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    steps: Sequence[float] = (0.7, 0.9),
    gamma: float = 0.1,
    clip_grad_norm: float | None = 10.0,
    amp: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
    out_dir: str | os.PathLike,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    eval_every: int | None = None,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    log_every: int = 20,
    resume: bool | str | os.PathLike = False,
    device: str | torch.device | None = None,
    find_unused_parameters: bool = False,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
    meta: dict[str, Any] | None = None,
    freeze: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` for ``iterations`` SGD updates; return a summary dict.

    Args:
        model: a detector; ``model(images, targets)`` returns a dict of scalar losses in training.
        dataset: items ``(image, target)`` as in ``locconf.data``; random transforms should draw
            from the global RNG (``generator=None``) to be reproducible (see the module docstring).
        iterations: total number of updates (including those done before a resume).
        batch_size: images per process and step (the global batch is ``batch_size * world_size``).
        lr: SGD's base learning rate, for the global batch (lower it if the loss diverges).
        momentum: SGD's momentum.
        weight_decay: SGD's L2 weight decay.
        warmup_iters: iterations of the linear warm-up from ``warmup_factor * lr`` to ``lr``
            (:func:`lr_factor`); 0 for none.
        warmup_factor: the warm-up's first learning rate, as a fraction of ``lr``, in (0, 1].
        schedule: the decay after the warm-up: ``"step"`` (multiply by ``gamma`` at each of
            ``steps``) or ``"cosine"`` (to 0 at ``iterations``).
        steps: the step decay's milestones, as increasing fractions of ``iterations`` in (0, 1).
        gamma: the step decay's factor, in (0, 1].
        clip_grad_norm: clip the total gradient norm to this value (logged as ``grad_norm``);
            None for no clipping. On by default (10, the value of every NEON recipe): the
            pretrained NEON recipe at lr 0.02 with a 10-iteration warm-up reached an infinite loss
            at step 14 without clipping and trained on with it (``benchmarks/divergence.py``,
            ``benchmarks/results/divergence.md``); the first trial of that recipe (warm-up 100)
            ended in NaN at step 101. ``tests/test_config_divergence.py`` shows the mechanism on
            a quadratic. The papers' COCO configs set null, as the papers do not clip.
        amp: mixed precision (autocast + GradScaler); ``None`` means on for CUDA, off on CPU.
        seed: seeds the data order, the augmentations and the global RNGs (``seed + rank``).
        num_workers: DataLoader worker processes (results do not depend on it).
        out_dir: folder of ``metrics.jsonl`` and ``checkpoint_<step>.pth``.
        checkpoint_every: save every this many steps (and at the end); 0 saves only at the end.
        keep_checkpoints: keep only the newest this many checkpoints (``None`` keeps all).
        eval_every, eval_fn: call ``eval_fn(model, step)`` every ``eval_every`` steps and at the end
            with the unwrapped model in eval mode; it runs on every process (so it may shard its
            work) with the training RNG states preserved, and rank 0's dict is logged.
        log_every: write a JSONL record every this many steps (and at the last step).
        resume: ``True`` continues from the latest checkpoint in ``out_dir`` (starting afresh when
            there is none; a checkpoint that cannot be read, e.g. truncated, is renamed to
            ``*.corrupt`` with a warning and the previous one is used); a path continues from that
            checkpoint. The settings recorded in the checkpoint (schedule, batch size, SGD
            settings, clipping, AMP, seed) must equal the given ones: a difference is refused.
        device: default ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.
        find_unused_parameters: passed to DistributedDataParallel.
        progress: show a tqdm bar (rank 0 only).
        on_start: called once (rank 0) when every check has passed and the checkpoint is loaded,
            after ``out_dir`` is created and before anything is written into it (``run_train``
            saves its config.yaml there).
        meta: what the weights are, stored in every checkpoint as ``meta`` (``run_train`` records the
            locconf version, the resolved configuration and the categories; see
            :func:`locconf.experiment.checkpoint_meta`). Tensors are not allowed; it is not compared
            on resume.
        freeze: ``"detector"``: train only the quality head added to a trained detector (the
            ``posthoc`` architecture, :class:`~locconf.models.posthoc.PosthocQuality`): the detector's
            parameters get ``requires_grad=False`` (the optimizer never sees them) and it stays in
            evaluation mode, its BatchNorm statistics included. None: every parameter that requires
            a gradient trains (a ``PosthocQuality`` freezes its detector itself in any case).

    Nothing is written before the checks pass. At the start, temporary files that a kill during a
    save left in ``out_dir`` are removed.

    Each training record of ``metrics.jsonl`` has ``type="train"``, ``step`` (1-based, updates
    done), ``epoch``, ``lr`` (the rate of that update), every loss term, ``total``, ``time``
    (seconds of the iteration), ``data_time`` and, with clipping, ``grad_norm``; loss values are
    averaged over processes. Evaluation records have ``type="eval"``, ``step`` and the metrics.

    Raises:
        NonFiniteLossError: a loss term is NaN or infinite (on any process), or the forward pass
            fails on non-finite values.
        ValueError: a bad argument; a fresh run into an ``out_dir`` holding checkpoints; a resume
            with other settings (naming them) or from a checkpoint beyond ``iterations``.
        CheckpointError: no checkpoint of ``out_dir`` (or the given one) can be read.
        OSError: e.g. no space left on device for a checkpoint (naming it).
    """
    check_schedule(iterations, warmup_iters, warmup_factor, schedule, steps, gamma)
    _check_train_arguments(
        batch_size=batch_size, log_every=log_every, checkpoint_every=checkpoint_every, num_workers=num_workers,
        lr=lr, momentum=momentum, weight_decay=weight_decay, clip_grad_norm=clip_grad_norm, amp=amp,
        keep_checkpoints=keep_checkpoints, eval_every=eval_every, eval_fn=eval_fn, seed=seed,
    )
    if not resume and list_checkpoints(out_dir):
        raise ValueError(f"out_dir {out_dir} already holds checkpoints; pass resume=True or use another out_dir")
    if freeze is not None:
        _freeze(model, freeze)

    created_group = not du.is_distributed()
    rank, world_size, local_rank = du.init_distributed()
    created_group = created_group and du.is_distributed()
    device, amp = _resolve_device(device, amp, local_rank)
    settings = {
        "iterations": iterations, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "warmup_iters": warmup_iters, "warmup_factor": warmup_factor,
        "schedule": schedule, "steps": tuple(steps), "gamma": gamma, "clip_grad_norm": clip_grad_norm,
        "amp": amp, "seed": seed,
    }
    run = _set_up(model, settings, device, rank, world_size, Path(out_dir))
    run.meta = meta
    ckpt, unreadable = _resume(run, resume) if resume else (None, [])
    run.ddp_model = du.wrap_model(model, device=device, find_unused_parameters=find_unused_parameters)
    loader = _make_loader(run, dataset, num_workers)
    if ckpt is not None:
        restore_rng(run, ckpt["rng"])

    # every check has passed: from here on out_dir may be written
    if run.main:
        _prepare_out_dir(run, on_start, unreadable, resumed=ckpt is not None)
    log = MetricsLog(run.out_dir / METRICS_FILE if run.main else None)
    bar = progress_bar(total=iterations, initial=run.start_step, desc="train", progress=progress and run.main,
               dynamic_ncols=True)
    try:
        return _iterate(run, loader, log, bar, iterations=iterations, log_every=log_every, eval_fn=eval_fn,
                        eval_every=eval_every, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
    finally:
        bar.close()
        log.close()
        if created_group:
            du.cleanup_distributed()
