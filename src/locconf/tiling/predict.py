"""Tiled prediction: the detector over the tiles in batches, and the whole pipeline (:func:`predict_tiled`).

An orthomosaic thousands of pixels wide is cut into square tiles that overlap; the detector runs on
batches of tiles and returns its raw candidates (before any NMS); :class:`locconf.tiling.TileMerger`
shifts them to image coordinates, handles the boxes cut by tile borders and merges them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from ..candidates import candidates_of
from ..progress import progress_bar
from .checks import _FIELDS, _check_int, _check_windows
from .grid import tile_grid
from .merge import TileMerger

logger = logging.getLogger(__package__)

#: The smallest tile side :func:`predict_tiled` accepts, in pixels: a detector resizes each tile to
#: its input size (400 px for the NEON recipe), so smaller tiles only multiply the model calls.
MIN_TILE_SIZE = 32


def check_tile_size(tile_size: Any, model: Optional[torch.nn.Module] = None) -> None:
    """Refuse a tile side below :data:`MIN_TILE_SIZE`; warn when ``model`` upsamples each tile more than 2x.

    The model's input size is the ``min_size`` of its resize step (``model.transform.min_size``,
    torchvision's ``GeneralizedRCNNTransform``), where it has one.
    """
    _check_int(tile_size, "tile_size", 1)
    if tile_size < MIN_TILE_SIZE:
        raise ValueError(f"tile_size must be at least {MIN_TILE_SIZE} pixels, got {tile_size}: the detector resizes "
                         f"every tile to its input size, so tiny tiles only multiply the tiles (use the tile size "
                         f"the detector was trained on, e.g. 400 for the NEON recipe)")
    sizes = getattr(getattr(model, "transform", None), "min_size", None)
    input_size = min(sizes) if isinstance(sizes, (tuple, list)) and sizes else sizes
    if isinstance(input_size, int) and tile_size * 2 < input_size:
        logger.warning("tile_size %d is less than half the detector's input size %d: every tile is upsampled "
                       "%.1fx, so objects look larger than in training", tile_size, input_size,
                       input_size / tile_size)


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
    bar = progress_bar(total=windows.shape[0], desc="tiles", unit="tile", progress=progress, leave=False)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].tolist()
            images = [raster.read(w).to(device) for w in batch]
            with torch.no_grad():
                outputs = candidates_of(model, images)
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
                  calibration: Any = None, log_size: Optional[bool] = True, **merger_args: Any) -> dict[str, Tensor]:
    """Detect objects in a whole image: tiles, the model, border handling and progressive merging.

    Args:
        model: a detector returning raw candidates (:func:`locconf.candidates.candidates_of`: a
            list of dicts with ``boxes``, ``scores``, ``labels`` and optional ``quality`` /
            ``variances``), or one under test-time augmentation (:class:`locconf.tta.TestTimeAugmentation`).
        raster: from :func:`open_raster`.
        tile_size, overlap: the grid (:func:`tile_grid`). batch_size: tiles per model call.
        method, params, border, **merger_args: as :class:`TileMerger` (``margin``, ``cover``,
            ``score_ratio``, ``cut_weight``, ``context``, ``max_detections``, ``candidates_per_tile``).
        calibration: optional :class:`locconf.evaluation.calibration.Calibration` applied to each tile's quality.
        log_size: log the image's size and tile count before the first tile at INFO (False: at DEBUG;
            None: at INFO when the image has more than one tile).

    Returns:
        Detections in image coordinates (``boxes``, ``scores``, ``labels``, ``quality`` /
        ``variances`` where predicted, ``tile``), best first.
    """
    check_tile_size(tile_size)
    windows = tile_grid(raster.height, raster.width, tile_size, overlap)
    merger = TileMerger(windows, (raster.height, raster.width), method, params, border, **merger_args)
    many = windows.shape[0] > 1
    logger.log(logging.INFO if log_size or (log_size is None and many) else logging.DEBUG,
               "%s: %d x %d pixels, %d tile%s of %d px",
               getattr(raster, "path", "image"), raster.width, raster.height, windows.shape[0],
               "" if windows.shape[0] == 1 else "s", tile_size)
    for index, cands in tile_candidates(model, raster, windows, batch_size, device, progress and many, calibration):
        merger.add(index, cands)
    return merger.finish()
