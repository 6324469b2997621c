"""Running a detector once over a data set and keeping every image's candidates.

"A detector stops at candidates" (``docs/design.md``): :func:`collect_candidates` runs the model's
``candidates`` over a data loader once and keeps, per image, everything it predicts, a
:class:`locconf.candidates.Candidates` dict with its ``image_id``. The scoring
(:func:`locconf.evaluation.coco.evaluate_methods`) and the analyses then work on these same
candidates, without running the network again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from ..progress import progress_bar

from ..candidates import Candidates

__all__ = ["collect_candidates"]


def _image_id(target: Any, index: int) -> int:
    if not isinstance(target, Mapping) or "image_id" not in target:
        raise ValueError(f"targets[{index}] must be a dict with an 'image_id'")
    image_id = target["image_id"]
    if isinstance(image_id, Tensor):
        if image_id.numel() != 1:
            raise ValueError(f"targets[{index}]['image_id'] must hold one id, got shape {tuple(image_id.shape)}")
        image_id = image_id.item()
    if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
        raise ValueError(f"targets[{index}]['image_id'] must be an int, got {image_id!r}")
    return int(image_id)


@torch.no_grad()
def collect_candidates(
    model: torch.nn.Module,
    data_loader: Any,
    device: torch.device | str,
    progress: bool = True,
) -> list[Candidates]:
    """Run ``model`` once over ``data_loader`` and keep every image's candidates on the CPU.

    Args:
        model: a locconf detector: ``model.candidates(images)`` takes a list of (3, H, W) tensors
            and returns one dict of candidates per image (:class:`locconf.candidates.Candidates`).
            A torchvision detector works once wrapped by :func:`locconf.models.from_torchvision`.
            Its training mode is restored afterwards.
        data_loader: iterable of ``(images, targets)`` batches (e.g. a ``DataLoader`` with
            :func:`locconf.data.collate_fn`); every target has an ``image_id``.
        device: where the model runs.
        progress: show a tqdm progress bar.

    Returns:
        One dict per image, in loader order: every tensor the model returned (detached, on the CPU)
        plus ``image_id`` (int).
    """
    if not callable(getattr(model, "candidates", None)):
        raise ValueError(f"model ({type(model).__name__}) has no candidates(images) method: use a locconf detector, "
                         f"or wrap a torchvision one with locconf.models.from_torchvision(model)")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    candidates: list[dict] = []
    try:
        for batch in progress_bar(data_loader, desc="candidates", progress=progress):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError("data_loader must yield (images, targets) batches (use locconf.data.collate_fn)")
            images, targets = batch
            images = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
            if len(images) != len(targets):
                raise ValueError(f"data_loader gave {len(images)} images but {len(targets)} targets in a batch")
            outputs = model.candidates([image.to(device, non_blocking=True) for image in images])
            if len(outputs) != len(images):
                raise ValueError(f"model returned {len(outputs)} outputs for {len(images)} images")
            for i, (output, target) in enumerate(zip(outputs, targets)):
                cand = {k: v.detach().cpu() for k, v in output.items() if isinstance(v, Tensor)}
                cand["image_id"] = _image_id(target, i)
                candidates.append(cand)
    finally:
        model.train(was_training)
    return candidates
