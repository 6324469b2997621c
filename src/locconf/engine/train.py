"""The training loop shared by every locconf detector.

One iteration-based loop: SGD with momentum, linear warm-up then step or cosine decay, optional
gradient clipping, AMP on CUDA, periodic evaluation, a JSONL metrics log, atomic checkpoints and
exact resumption. The model follows torchvision's detection API: in training mode
``model(images, targets)`` returns a dict of named scalar losses, which are summed.

Determinism and exact resumption. The data order and the augmentation of every sample are pure
functions of ``(seed, epoch, position)``, never of the global RNG state:

- :class:`InfiniteBatchSampler` draws epoch ``e``'s permutation from a generator seeded with
  ``(seed, e)`` and hands out global batches of ``batch_size * world_size`` consecutive entries,
  rank ``r`` taking the ``r``-th slice of each (so the union over ranks of one step's batches is
  the batch a single process would draw with ``batch_size * world_size``);
- every entry carries a per-sample seed derived from ``(seed, epoch, index)``, and
  :class:`SeededDataset` seeds torch/NumPy/Python RNGs with it while the sample is loaded and
  transformed (the caller's RNG states are restored afterwards). Transforms that draw from the
  global RNG (``generator=None``, the default of ``locconf.data``) are thereby reproducible in any
  worker, in any process and after a restart.

The loop itself uses the global RNGs (e.g. the RPN and RoI samplers of torchvision); their states
are seeded with ``seed + rank`` and saved per rank in every checkpoint together with the model,
optimizer, scheduler, GradScaler, step and sampler position. ``resume=True`` restores all of them,
so the losses after resuming are those of an uninterrupted run (on the same hardware and thread
count; on CUDA also set ``torch.use_deterministic_algorithms`` for bitwise equality).

Distributed: run the same script under ``torchrun --nproc_per_node N``; :func:`train` joins the
process group (NCCL on CUDA, gloo on CPU), wraps the model in DistributedDataParallel, shards the
batches, averages the logged losses over ranks and lets only rank 0 write logs and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from locconf.data import collate_fn
from locconf.engine import distributed as du
from locconf.engine.checkpoint import (
    CheckpointError,
    checkpoint_path,
    clean_temp_files,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from locconf.engine.sampler import InfiniteBatchSampler, SeededDataset, isolated_rng, sample_seed, seed_everything
from locconf.engine.schedule import build_lr_scheduler, check_schedule, is_int, is_number, lr_factor

logger = logging.getLogger(__name__)

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

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(ValueError):
    """A loss term became NaN or infinite; the message names the step and the terms.

    Also raised when the forward pass itself fails on non-finite values (a head refusing NaN boxes
    decoded from diverged weights), naming the step and the parameters that are no longer finite.
    """


_NON_FINITE = re.compile(r"\bnan\b|\binf\b|infinite|non-finite", re.IGNORECASE)


# -- helpers --------------------------------------------------------------------------------


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    """Move the tensors of every target to ``device``; other values (image_id, site) stay as they are."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (written by a run that was killed later)."""
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


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


#: Checkpoint keys that :func:`train` needs to resume.
_RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "sampler", "rng", "loader_generator")


def _load_for_resume(out_dir: Path, resume: bool | str | os.PathLike) -> tuple[Path | None, dict | None, list[Path]]:
    """The checkpoint to resume from: ``(path, state, unreadable newer checkpoints)``.

    ``resume=True`` takes the latest checkpoint of ``out_dir`` that can be read, warning about (and
    returning) the newer ones that cannot (truncated, corrupted); a path must be readable itself.
    ``(None, None, [])`` when ``out_dir`` holds no checkpoint.
    """
    candidates = [Path(resume)] if resume is not True else [p for _, p in reversed(list_checkpoints(out_dir))]
    unreadable: list[Path] = []
    reasons: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location="cpu")
            missing = [k for k in _RESUME_KEYS if k not in state]
            if missing:
                raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by locconf's train()")
        except CheckpointError as e:
            if resume is not True:
                raise
            unreadable.append(path)
            reasons.append(str(e))
            continue
        if unreadable:
            warnings.warn(f"resuming from {path}, the latest intact checkpoint, because {'; '.join(reasons)} "
                          "(renamed to *.corrupt)")
        return path, state, unreadable
    if unreadable:
        raise CheckpointError(f"no checkpoint in {out_dir} can be read: {'; '.join(reasons)}")
    return None, None, []


def _settings_differences(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every setting recorded in a checkpoint that differs from the current one."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(saved)
            if k in current and plain(saved[k]) != plain(current[k])]


def _non_finite_parameters(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def _check_losses(losses: Any) -> None:
    if not isinstance(losses, dict) or not losses:
        raise ValueError(
            "in training mode the model must return a non-empty dict of named losses, "
            f"got {type(losses).__name__}"
        )
    for k, v in losses.items():
        if not isinstance(v, Tensor) or v.numel() != 1:
            raise ValueError(f"loss {k!r} must be a scalar tensor, got {type(v).__name__}")


# -- the loop ---------------------------------------------------------------------------------


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
    clip_grad_norm: float | None = None,
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
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` for ``iterations`` SGD updates; return a summary dict.

    Args:
        model: a detector; ``model(images, targets)`` returns a dict of scalar losses in training.
        dataset: items ``(image, target)`` as in ``locconf.data``; random transforms should draw
            from the global RNG (``generator=None``) to be reproducible (see the module docstring).
        iterations: total number of updates (including those done before a resume).
        batch_size: images per process and step (the global batch is ``batch_size * world_size``).
        lr, momentum, weight_decay: SGD settings (``lr`` is the base rate of the global batch).
        warmup_iters, warmup_factor, schedule, steps, gamma: the schedule of :func:`lr_factor`.
        clip_grad_norm: clip the total gradient norm to this value (logged as ``grad_norm``).
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

    created_group = not du.is_distributed()
    rank, world_size, local_rank = du.init_distributed()
    created_group = created_group and du.is_distributed()
    main = rank == 0
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if amp is None:
        amp = device.type == "cuda"
    if amp and device.type != "cuda":
        raise ValueError(f"amp=True needs a CUDA device, got device={device}")
    out_dir = Path(out_dir)
    log_path = out_dir / METRICS_FILE

    # -- model, optimizer, schedule; state from a checkpoint ---------------------------------
    seed_everything(seed + rank)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = build_lr_scheduler(
        optimizer, iterations=iterations, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
        schedule=schedule, steps=steps, gamma=gamma,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loader_generator = torch.Generator()
    loader_generator.manual_seed(seed)

    settings = {
        "iterations": iterations, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "warmup_iters": warmup_iters, "warmup_factor": warmup_factor,
        "schedule": schedule, "steps": tuple(steps), "gamma": gamma, "clip_grad_norm": clip_grad_norm,
        "amp": amp, "seed": seed,
    }
    start_step, epoch, position, ckpt, unreadable = 0, 0, 0, None, []
    if resume:
        ckpt_file, ckpt, unreadable = _load_for_resume(out_dir, resume)
        if ckpt is not None:
            changed = _settings_differences(ckpt.get("config") or {}, settings)
            if changed:
                raise ValueError(
                    f"cannot resume from {ckpt_file}: it was trained with other settings ({'; '.join(changed)}); "
                    "resume with the same settings or train into another out_dir"
                )
            if ckpt["step"] > iterations:
                raise ValueError(f"the checkpoint is at step {ckpt['step']}, beyond iterations={iterations}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            loader_generator.set_state(ckpt["loader_generator"])
            start_step, epoch, position = ckpt["step"], ckpt["sampler"]["epoch"], ckpt["sampler"]["position"]
            if main:
                logger.info("resuming from %s (step %d)", ckpt_file, start_step)
        elif main:
            logger.info("resume=True but %s holds no checkpoint: starting afresh", out_dir)

    ddp_model = du.wrap_model(model, device=device, find_unused_parameters=find_unused_parameters)
    sampler = InfiniteBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size)
    position_max = sampler.batches_per_epoch
    if position >= position_max:  # resumed on more processes (a larger global batch): the old epoch is finished
        epoch, position = epoch + 1, 0
    sampler.epoch, sampler.position = epoch, position
    loader = DataLoader(
        SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        pin_memory=device.type == "cuda", generator=loader_generator, persistent_workers=num_workers > 0,
    )
    if ckpt is not None:
        states = ckpt["rng"]
        if len(states) == world_size:
            set_rng_state(states[rank])
        else:
            warnings.warn(
                f"checkpoint has RNG states of {len(states)} processes, this run has {world_size}: "
                "reseeding; the run continues but not exactly as it would have"
            )
            seed_everything(seed + rank + 1_000_003 * start_step)

    # -- every check has passed: from here on out_dir may be written ----------------------------
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if on_start is not None:
            on_start()
        for stale in clean_temp_files(out_dir) + sorted(out_dir.glob(f".{METRICS_FILE}.tmp.*")):
            stale.unlink(missing_ok=True)
            logger.info("removed %s, left by a run killed while writing", stale)
        for bad in unreadable:
            bad.rename(bad.with_name(bad.name + ".corrupt"))
        if ckpt is not None:
            _truncate_log(log_path, start_step)
        elif log_path.exists():
            log_path.unlink()
    log_file = open(log_path, "a", encoding="utf-8") if main else None

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record, default=_jsonable) + "\n")
            log_file.flush()

    def evaluate(step: int) -> dict:
        model.eval()
        try:
            with isolated_rng(cuda=True):
                metrics = eval_fn(model, step) or {}
        finally:
            model.train()
        log({"type": "eval", "step": step, **metrics})
        return metrics

    # -- iterate ------------------------------------------------------------------------------
    bar = tqdm(total=iterations, initial=start_step, desc="train", disable=not (progress and main), dynamic_ncols=True)
    losses_logged: dict[str, float] = {}
    last_eval: dict | None = None
    last_ckpt: Path | None = None
    t_start = time.perf_counter()
    data_iter = iter(loader)
    step = start_step
    try:
        for step in range(start_step + 1, iterations + 1):
            t0 = time.perf_counter()
            images, targets = next(data_iter)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _targets_to(targets, device)
            t_data = time.perf_counter() - t0

            try:
                with torch.autocast(device.type, enabled=amp):
                    losses = ddp_model(images, targets)
            except ValueError as e:  # e.g. a head validating boxes decoded from diverged weights
                bad = _non_finite_parameters(model)
                if not bad and not _NON_FINITE.search(str(e)):
                    raise
                where = (f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are NaN or infinite "
                         f"after the update of step {step - 1}; " if bad else "")
                raise NonFiniteLossError(f"non-finite values in the forward pass at step {step}: {where}{e}") from e
            _check_losses(losses)
            total = sum(losses.values())
            reduced = du.reduce_dict({**{k: v.float() for k, v in losses.items()}, "total": total.float()})
            values = dict(zip(reduced, torch.stack(list(reduced.values())).tolist()))
            bad = [k for k, v in values.items() if k != "total" and not math.isfinite(v)]
            if bad or not math.isfinite(values["total"]):
                terms = ", ".join(f"{k}={values[k]}" for k in (bad or ["total"]))
                raise NonFiniteLossError(f"non-finite loss at step {step}: {terms}")

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            grad_norm = None
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
            step_lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            position += 1
            if position == position_max:
                epoch, position = epoch + 1, 0

            losses_logged = values
            if step % log_every == 0 or step == iterations:
                record = {"type": "train", "step": step, "epoch": epoch, "lr": step_lr, **values}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                record.update(time=time.perf_counter() - t0, data_time=t_data)
                log(record)
                bar.set_postfix(loss=f"{values['total']:.4f}", lr=f"{step_lr:.2e}")
            bar.update(1)

            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == iterations):
                last_eval = evaluate(step)

            if (checkpoint_every and step % checkpoint_every == 0) or step == iterations:
                rng_states = du.all_gather_object(get_rng_state())
                if main:
                    state = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "sampler": {"epoch": epoch, "position": position},
                        "rng": rng_states,
                        "loader_generator": loader_generator.get_state(),
                        "world_size": world_size,
                        "config": settings,
                    }
                    last_ckpt = save_checkpoint(state, checkpoint_path(out_dir, step))
                    if keep_checkpoints is not None:
                        for _, old in list_checkpoints(out_dir)[:-keep_checkpoints]:
                            old.unlink(missing_ok=True)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        del data_iter
        if created_group:
            du.cleanup_distributed()

    return {
        "step": step,
        "start_step": start_step,
        "epoch": epoch,
        "losses": losses_logged,
        "lr": optimizer.param_groups[0]["lr"],
        "eval": last_eval,
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "metrics_file": str(log_path),
        "seconds": time.perf_counter() - t_start,
        "world_size": world_size,
    }
