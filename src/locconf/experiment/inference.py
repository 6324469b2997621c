"""Detecting objects in an image of any size with a trained detector (``locconf predict``).

:func:`predict` tiles the image, merges the tiles' candidates and writes a drawing, a CSV and COCO
results; :func:`categories_of` names a configuration's labels for those files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .build import device_of

logger = logging.getLogger(__name__)

def predict(model: nn.Module, image_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "nms",
            score_threshold: float = 0.3, device: str | None = None, tile_size: int = 400, overlap: int = 100,
            batch_size: int = 4, border: str = "drop", params: dict | None = None, calibration: Any = None,
            csv_path: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
            class_names: Sequence[str] | None = None, label_to_cat_id: dict[int, int] | None = None,
            max_side: int = 2000, progress: bool = False, **merge_args: Any) -> dict:
    """Detect objects in an image of any size, tile by tile (:mod:`locconf.tiling`), and write them.

    Writes the drawing ``out_path`` (PNG, downscaled so that its longer side is at most
    ``max_side``; boxes with a score below ``score_threshold`` are not drawn), a DeepForest CSV
    (``csv_path``, default ``out_path`` with ``.csv``; map coordinates for GeoTIFFs read with
    rasterio) and COCO results (``json_path``, default ``.json``). Everything is checked before
    the model runs, and each file is written through a temporary file.

    Args:
        tile_size, overlap, batch_size, border, **merge_args: :func:`locconf.tiling.predict_tiled`
            (``max_detections``, ``candidates_per_tile``, ``margin``, ``cover``, ...).
        method, params: the post-processing method that merges the tiles, and its keywords.
        calibration: a :class:`locconf.evaluation.calibration.Calibration` (or its JSON file) applied to
            each tile's quality before merging.
        class_names, label_to_cat_id: name the labels in the CSV and map them to category ids in
            the JSON (default: the label numbers).

    Returns:
        The detections in image coordinates (``boxes``, ``scores``, ``labels``, ...), best first.
    """
    from ..evaluation.calibration import Calibration
    from ..tiling import TileMerger, draw_overview, open_raster, predict_tiled, tile_grid, write_coco_results, write_csv

    image_path, out_path = Path(image_path), Path(out_path)
    csv_path = Path(csv_path) if csv_path is not None else out_path.with_suffix(".csv")
    json_path = Path(json_path) if json_path is not None else out_path.with_suffix(".json")
    outputs = {"out": out_path, "csv": csv_path, "json": json_path}
    for name, path in outputs.items():
        if path.resolve() == image_path.resolve():
            raise ValueError(f"the {name} file {path} is the input image; write to another file")
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise ValueError(f"the drawing, CSV and JSON files must differ, got {out_path}, {csv_path}, {json_path}")
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    with open_raster(image_path) as raster:
        windows = tile_grid(raster.height, raster.width, tile_size, overlap)  # checks the grid arguments
        TileMerger(windows, (raster.height, raster.width), method, params, border, **merge_args)  # and the rest
        dets = predict_tiled(model, raster, tile_size, overlap, batch_size, method, params, border,
                             device=device_of(device), progress=progress, calibration=calibration, **merge_args)
        write_csv(dets, csv_path, class_names, raster.transform, raster.crs)
        write_coco_results(dets, json_path, label_to_cat_id=label_to_cat_id)
        draw_overview(raster, dets, out_path, max_side=max_side, score_threshold=score_threshold,
                      class_names=class_names)
    return dets


def categories_of(cfg: dict[str, dict] | None = None, categories: Sequence[dict] | None = None
                  ) -> tuple[list[str] | None, dict[int, int] | None]:
    """``(class_names, label_to_cat_id)``: from ``categories`` (a checkpoint's, in label order), else
    from the category list of the configuration's data file.

    Labels number the categories sorted by id from 1, as :class:`locconf.data.CocoDetection` does
    (``class_names[0]`` is the background). A checkpoint written by ``locconf train`` records its
    categories (``model.categories`` after :func:`locconf.experiment.load_trained`), so the names do
    not depend on the folder a command runs in. Without them, the data's JSON file is read relative
    to the current folder; ``(None, None)`` (labels written as numbers, with a warning) when it is not
    there: nothing is fetched or generated.
    """
    from ..data.coco import read_json

    if categories:
        ordered = [(int(c["id"]), str(c.get("name", c["id"]))) for c in categories]
    else:
        data = (cfg or {}).get("data") or {}
        root = Path(data.get("root", "data/neon"))
        source = data.get("source", "neon-trees")
        name = data.get("val_json") or data.get("train_json") if source == "coco" else "val.json"
        if not name or not (root / name).is_file():
            logger.warning("the checkpoint records no categories and %s is not there: labels are written as "
                           "numbers and category ids as label numbers", root / (name or "val.json"))
            return None, None
        cats = read_json(root / name).get("categories") or []
        ordered = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in cats
                         if isinstance(c, dict) and "id" in c)
    if not ordered:
        return None, None
    return ["__background__"] + [n for _, n in ordered], {k + 1: cid for k, (cid, _) in enumerate(ordered)}
