"""One training step of :func:`locconf.engine.train.train`: the next batch, forward, loss checks, update.

The model follows torchvision's detection API: in training mode ``model(images, targets)`` returns
a dict of named scalar losses, which are summed. A loss term that is NaN or infinite on any
process, or a forward pass that fails on non-finite values, raises :class:`NonFiniteLossError`
naming the step (and the terms or parameters) before the update.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from locconf.engine import distributed as du
from locconf.engine.run_state import TrainingRun

__all__ = ["NonFiniteLossError", "divergence_advice", "train_step"]


class NonFiniteLossError(ValueError):
    """A loss term became NaN or infinite; the message names the step and the terms, and what to change.

    Also raised when the forward pass itself fails on non-finite values (a head refusing NaN boxes
    decoded from diverged weights), naming the step and the parameters that are no longer finite.
    Both messages end with :func:`divergence_advice`.
    """


def divergence_advice(settings: dict[str, Any], lr: float) -> str:
    """What to change when training diverged: the learning rate used, clipping, warm-up (``train.<key>`` names)."""
    clip = settings.get("clip_grad_norm")
    clipping = (f"lower train.clip_grad_norm (now {clip:g})" if clip is not None
                else "set train.clip_grad_norm (e.g. 10; now off)")
    return (f"The learning rate of this step was {lr:.3g}. To train stably, lower train.lr (now "
            f"{settings['lr']:g}), {clipping} or lengthen the warm-up, train.warmup_iters (now "
            f"{settings['warmup_iters']}).")


_NON_FINITE = re.compile(r"\bnan\b|\binf\b|infinite|non-finite", re.IGNORECASE)


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    """Move the tensors of every target to ``device``; other values (image_id, site) stay as they are."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


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


def _forward(run: TrainingRun, images: list[Tensor], targets: list[dict], step: int) -> dict[str, Tensor]:
    """The model's dict of losses; a forward pass failing on non-finite values is a :class:`NonFiniteLossError`."""
    try:
        with torch.autocast(run.device.type, enabled=run.settings["amp"]):
            losses = run.ddp_model(images, targets)
    except ValueError as e:  # e.g. a head validating boxes decoded from diverged weights
        bad = _non_finite_parameters(run.model)
        if not bad and not _NON_FINITE.search(str(e)):
            raise
        where = (f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are NaN or infinite "
                 f"after the update of step {step - 1}; " if bad else "")
        raise NonFiniteLossError(f"non-finite values in the forward pass at step {step}: {where}{e}. "
                                 + divergence_advice(run.settings, run.optimizer.param_groups[0]["lr"])) from e
    _check_losses(losses)
    return losses


def _averaged_losses(run: TrainingRun, losses: dict[str, Tensor], total: Tensor, step: int) -> dict[str, float]:
    """Every loss term and ``total``, averaged over processes; non-finite ones raise :class:`NonFiniteLossError`."""
    reduced = du.reduce_dict({**{k: v.float() for k, v in losses.items()}, "total": total.float()})
    values = dict(zip(reduced, torch.stack(list(reduced.values())).tolist()))
    bad = [k for k, v in values.items() if k != "total" and not math.isfinite(v)]
    if bad or not math.isfinite(values["total"]):
        terms = ", ".join(f"{k}={values[k]}" for k in (bad or ["total"]))
        raise NonFiniteLossError(f"non-finite loss at step {step}: {terms}; the training diverged. "
                                 + divergence_advice(run.settings, run.optimizer.param_groups[0]["lr"]))
    return values


def _update(run: TrainingRun, total: Tensor) -> tuple[float | None, float]:
    """Backward, optional clipping, optimizer, scaler and scheduler steps: ``(grad_norm or None, lr used)``."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    grad_norm = None
    if run.settings["clip_grad_norm"] is not None:
        run.scaler.unscale_(run.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.settings["clip_grad_norm"]))
    step_lr = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.advance_sampler()
    return grad_norm, step_lr


def train_step(run: TrainingRun, data_iter: Iterator, step: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Update ``run`` on the next batch of ``data_iter``: ``(averaged losses, the step's train record)``.

    The record is the ``type="train"`` line of the metrics log: ``step``, ``epoch``, ``lr`` (the
    rate of this update), every loss term, ``total``, ``grad_norm`` (with clipping), ``time`` and
    ``data_time``.
    """
    t0 = time.perf_counter()
    images, targets = next(data_iter)
    images = [im.to(run.device, non_blocking=True) for im in images]
    targets = _targets_to(targets, run.device)
    t_data = time.perf_counter() - t0

    losses = _forward(run, images, targets, step)
    total = sum(losses.values())
    values = _averaged_losses(run, losses, total, step)
    grad_norm, step_lr = _update(run, total)

    record = {"type": "train", "step": step, "epoch": run.epoch, "lr": step_lr, **values}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    record.update(time=time.perf_counter() - t0, data_time=t_data)
    return values, record
