"""Tiled prediction: the detector over the tiles in batches, and the whole pipeline (:func:`predict_tiled`).

An orthomosaic thousands of pixels wide is cut into square tiles that overlap; the detector runs on
batches of tiles and returns its raw candidates (before any NMS); :class:`locconf.tiling.TileMerger`
shifts them to image coordinates, handles the boxes cut by tile borders and merges them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import Tensor
from ..progress import progress_bar

from .checks import _FIELDS, _check_int, _check_windows
from .grid import tile_grid
from .merge import TileMerger


def tile_candidates(model: torch.nn.Module, raster: Any, windows: Tensor, batch_size: int = 4,
                    device: torch.device | str = "cpu", progress: bool = True,
                    calibration: Any = None) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Run ``model`` over the tiles of ``raster`` in batches; yield ``(tile index, candidates)`` in order.

    Candidates are in tile coordinates, on the CPU, with the fields of :data:`_FIELDS` the model
    returns; with ``calibration`` (:class:`locconf.evaluation.calibration.Calibration`) their quality is
    calibrated. Only one batch of tiles is held at a time. The model's training mode is restored.
    """
    _check_int(batch_size, "batch_size", 1)
    windows = _check_windows(windows)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=windows.shape[0], desc="tiles", unit="tile", progress=progress)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].tolist()
            images = [raster.read(w).to(device) for w in batch]
            with torch.no_grad():
                outputs = model.candidates(images)
            if len(outputs) != len(images):
                raise ValueError(f"model returned {len(outputs)} outputs for {len(images)} tiles")
            for i, out in enumerate(outputs):
                cands = {k: out[k].detach().cpu() for k in _FIELDS if isinstance(out.get(k), Tensor)}
                if calibration is not None:
                    cands = calibration.apply(cands)
                yield start + i, cands
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)


def predict_tiled(model: torch.nn.Module, raster: Any, tile_size: int = 400, overlap: int = 100,
                  batch_size: int = 4, method: str = "nms", params: Optional[Mapping] = None,
                  border: str = "drop", device: torch.device | str = "cpu", progress: bool = True,
                  calibration: Any = None, **merger_args: Any) -> dict[str, Tensor]:
    """Detect objects in a whole image: tiles, the model, border handling and progressive merging.

    Args:
        model: a detector returning raw candidates (``model(images)`` in eval mode, a list of
            dicts with ``boxes``, ``scores``, ``labels`` and optional ``quality`` / ``variances``).
        raster: from :func:`open_raster`.
        tile_size, overlap: the grid (:func:`tile_grid`). batch_size: tiles per model call.
        method, params, border, **merger_args: as :class:`TileMerger` (``margin``, ``cover``,
            ``score_ratio``, ``cut_weight``, ``context``, ``max_detections``, ``candidates_per_tile``).
        calibration: optional :class:`locconf.evaluation.calibration.Calibration` applied to each tile's quality.

    Returns:
        Detections in image coordinates (``boxes``, ``scores``, ``labels``, ``quality`` /
        ``variances`` where predicted, ``tile``), best first.
    """
    windows = tile_grid(raster.height, raster.width, tile_size, overlap)
    merger = TileMerger(windows, (raster.height, raster.width), method, params, border, **merger_args)
    for index, cands in tile_candidates(model, raster, windows, batch_size, device, progress, calibration):
        merger.add(index, cands)
    return merger.finish()
