"""The state of a training run: what it carries from step to step, saves and resumes from.

Every checkpoint of :func:`locconf.engine.train.train` holds the model, optimizer, scheduler and
GradScaler states, the step, the sampler position (``epoch``, ``position``), every rank's global
RNG states, the DataLoader generator's state, the world size and the settings of the run
(``config``). Resuming restores all of them, refusing a checkpoint trained with other settings.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locconf.engine import distributed as du
from locconf.engine.checkpoint import (
    CheckpointError,
    checkpoint_path,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from locconf.engine.sampler import seed_everything

__all__ = ["RESUME_KEYS", "TrainingRun", "load_for_resume", "settings_differences", "load_into", "restore_rng",
           "save_run"]

#: Checkpoint keys that :func:`~locconf.engine.train.train` needs to resume.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "sampler", "rng", "loader_generator")


@dataclass(eq=False)
class TrainingRun:
    """The objects and counters of one training run on one process."""

    model: nn.Module
    params: list[nn.Parameter]  # the trainable parameters (optimized and clipped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader_generator: torch.Generator
    settings: dict[str, Any]  # recorded in every checkpoint as ``config``; a resume must match them
    device: torch.device
    rank: int
    world_size: int
    out_dir: Path
    ddp_model: nn.Module | None = None  # ``model`` wrapped in DistributedDataParallel (itself in one process)
    start_step: int = 0  # updates done before this run started (those of the checkpoint)
    epoch: int = 0  # the sampler's place after the updates done so far
    position: int = 0
    batches_per_epoch: int = 0
    meta: dict[str, Any] | None = None  # recorded in every checkpoint as ``meta`` (what the weights are)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs and checkpoints."""
        return self.rank == 0

    def advance_sampler(self) -> None:
        """Count one batch drawn from the sampler."""
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0


def load_for_resume(out_dir: Path, resume: bool | str | os.PathLike) -> tuple[Path | None, dict | None, list[Path]]:
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
            missing = [k for k in RESUME_KEYS if k not in state]
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


def settings_differences(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every setting recorded in a checkpoint that differs from the current one."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(saved)
            if k in current and plain(saved[k]) != plain(current[k])]


def load_into(run: TrainingRun, ckpt_file: Path, ckpt: dict, iterations: int) -> None:
    """Restore ``run``'s model, optimizer, scheduler, scaler, loader generator, step and sampler place.

    Raises ``ValueError`` when the checkpoint was trained with other settings (naming them) or is
    beyond ``iterations``. The global RNG states are restored later, by :func:`restore_rng`.
    """
    changed = settings_differences(ckpt.get("config") or {}, run.settings)
    if changed:
        raise ValueError(
            f"cannot resume from {ckpt_file}: it was trained with other settings ({'; '.join(changed)}); "
            "resume with the same settings or train into another out_dir"
        )
    if ckpt["step"] > iterations:
        raise ValueError(f"the checkpoint is at step {ckpt['step']}, beyond iterations={iterations}")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.loader_generator.set_state(ckpt["loader_generator"])
    run.start_step, run.epoch, run.position = ckpt["step"], ckpt["sampler"]["epoch"], ckpt["sampler"]["position"]


def restore_rng(run: TrainingRun, states: list[dict]) -> None:
    """Set this rank's global RNG states from a checkpoint's per-rank ``states``.

    A checkpoint of another number of processes has no state for this rank: the RNGs are reseeded
    from the seed, rank and step instead, with a warning.
    """
    if len(states) == run.world_size:
        set_rng_state(states[run.rank])
        return
    warnings.warn(
        f"checkpoint has RNG states of {len(states)} processes, this run has {run.world_size}: "
        "reseeding; the run continues but not exactly as it would have"
    )
    seed_everything(run.settings["seed"] + run.rank + 1_000_003 * run.start_step)


def save_run(run: TrainingRun, step: int, keep_checkpoints: int | None) -> Path | None:
    """Checkpoint ``run`` after ``step`` updates; rank 0's path (``None`` on the other ranks).

    Every rank takes part (the RNG states are gathered); rank 0 writes the file atomically and
    then deletes all but the newest ``keep_checkpoints`` checkpoints (``None`` keeps all).
    """
    rng_states = du.all_gather_object(get_rng_state())
    if not run.main:
        return None
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": step,
        "sampler": {"epoch": run.epoch, "position": run.position},
        "rng": rng_states,
        "loader_generator": run.loader_generator.get_state(),
        "world_size": run.world_size,
        "config": run.settings,
    }
    if run.meta is not None:
        state["meta"] = run.meta
    path = save_checkpoint(state, checkpoint_path(run.out_dir, step))
    if keep_checkpoints is not None:
        for _, old in list_checkpoints(run.out_dir)[:-keep_checkpoints]:
            old.unlink(missing_ok=True)
    return path
