"""Detecting objects in an image of any size with a trained detector (``locconf predict``).

:func:`predict` tiles one image, merges the tiles' candidates and writes a drawing, a CSV and COCO
results; :func:`write_image_outputs` is the one place that writes an image's outputs (as one set:
all new or all old, never a mix); :func:`categories_of` names a configuration's labels for those
files. Many images per call, resumable and sharded over ``torchrun`` processes, are
:mod:`locconf.experiment.batch`'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from .build import device_of

logger = logging.getLogger(__name__)


def write_image_outputs(raster: Any, dets: Mapping[str, Tensor], *, image_path: str, image_id: int,
                        drawing: str | os.PathLike, detections: str | os.PathLike,
                        csv: str | os.PathLike | None = None, class_names: Sequence[str] | None = None,
                        label_to_cat_id: dict[int, int] | None = None, score_threshold: float = 0.3,
                        max_side: int = 2000, vector: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write one image's outputs as one set (:func:`locconf.tiling.write_together`).

    * ``drawing``: the image with its detections (PNG, longer side at most ``max_side``; boxes
      scored below ``score_threshold`` are not drawn);
    * ``detections``: COCO results of the image (a JSON array, ``image_id`` on every record,
      ``quality`` / ``variance`` where predicted: an input of ``locconf postprocess``);
    * ``csv`` (optional): the CSV (``image_path`` = ``image_path``, pixel boxes; map columns for
      a georeferenced raster);
    * ``vector`` (optional): GeoJSON polygons in the raster's map coordinates and CRS
      (:func:`locconf.io.write_detections`), written only when the raster is georeferenced and
      the geo extra is installed (else logged once).

    Each file is staged beside its path and the set is renamed into place only when all are
    written, so an interruption leaves the previous set or the new one. This is the one function
    that writes an image's outputs: a new per-image output (e.g. a vector file in the raster's
    CRS) belongs here. Returns ``{kind: path}`` of the files written.
    """
    from ..io import write_detections
    from ..tiling import draw_overview, write_coco_results, write_csv, write_together

    outputs: dict[str, Path] = {"drawing": Path(drawing), "detections": Path(detections)}
    writers = {
        outputs["drawing"]: lambda tmp: draw_overview(raster, dets, tmp, max_side=max_side,
                                                      score_threshold=score_threshold, class_names=class_names),
        outputs["detections"]: lambda tmp: write_coco_results(dets, tmp, image_id=image_id,
                                                              label_to_cat_id=label_to_cat_id),
    }
    if csv is not None:
        outputs["csv"] = Path(csv)
        writers[outputs["csv"]] = lambda tmp: write_csv(dets, tmp, class_names, raster.transform, raster.crs,
                                                        image_path=image_path)
    if vector is not None and raster.transform is not None and _geo_available():
        outputs["vector"] = Path(vector)
        writers[outputs["vector"]] = lambda tmp: write_detections(tmp, dets, image_path=image_path, format="geojson",
                                                                  transform=raster.transform, crs=raster.crs,
                                                                  class_names=class_names)
    if len(writers) < len(outputs):
        raise ValueError(f"the outputs of {image_path} must be distinct files, got {sorted(map(str, outputs.values()))}")
    write_together(writers)
    return outputs


def _geo_available() -> bool:
    """Whether shapely and pyogrio import (the geo extra); says once what to install when they do not."""
    global _GEO_NOTED
    try:
        import pyogrio  # noqa: F401
        import shapely  # noqa: F401
        return True
    except ImportError:
        if not _GEO_NOTED:
            logger.info('GeoJSON outputs of georeferenced images need the geo extra: pip install "locconf[geo]"')
            _GEO_NOTED = True
        return False


_GEO_NOTED = False


def check_settings(tile_size: int = 400, overlap: int = 100, method: str = "nms", params: dict | None = None,
                   border: str = "drop", tta: str = "none", tta_merge: str = "concat",
                   model: Optional[nn.Module] = None, **merge_args: Any) -> None:
    """Check the tiling, merging and test-time augmentation arguments of :func:`predict` before any
    image is read (a ``ValueError`` names the bad one); with ``model``, warn where its input size makes
    the tiles too small."""
    from ..tiling import TileMerger, check_tile_size, tile_grid
    from ..tta import MERGES, check_transforms

    check_tile_size(tile_size, model)
    windows = tile_grid(tile_size, tile_size, tile_size, overlap)  # checks overlap
    TileMerger(windows, (tile_size, tile_size), method, params, border, **merge_args)  # and the rest
    check_transforms(tta)
    if tta_merge not in MERGES:
        raise ValueError(f"tta_merge must be one of {', '.join(MERGES)}, got {tta_merge!r}")


def predict(model: nn.Module, image_path: str | os.PathLike, out_path: str | os.PathLike, method: str = "nms",
            score_threshold: float = 0.3, device: str | None = None, tile_size: int = 400, overlap: int = 100,
            batch_size: int = 4, border: str = "drop", params: dict | None = None, calibration: Any = None,
            csv_path: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
            class_names: Sequence[str] | None = None, label_to_cat_id: dict[int, int] | None = None,
            max_side: int = 2000, progress: bool = False, tta: str = "none", tta_merge: str = "concat",
            max_pixels: Optional[int] = None, image_name: Optional[str] = None, **merge_args: Any) -> dict:
    """Detect objects in an image of any size, tile by tile (:mod:`locconf.tiling`), and write them.

    Writes the drawing ``out_path`` (PNG, downscaled so that its longer side is at most
    ``max_side``; boxes with a score below ``score_threshold`` are not drawn), a CSV
    (``csv_path``, default ``out_path`` with ``.csv``: ``image_path, xmin, ymin, xmax, ymax,
    label, score`` in pixels, ``quality`` and ``var_x1 .. var_y2`` where predicted, and map
    coordinates for GeoTIFFs read with rasterio) and COCO results (``json_path``, default
    ``.json``, ``image_id`` 1), as one set (:func:`write_image_outputs`). Everything is checked
    before the model runs.

    Args:
        tile_size, overlap, batch_size, border, **merge_args: :func:`locconf.tiling.predict_tiled`
            (``max_detections``, ``candidates_per_tile``, ``margin``, ``cover``, ...).
        method, params: the post-processing method that merges the tiles, and its keywords.
        calibration: a :class:`locconf.evaluation.calibration.Calibration` (or its JSON file) applied to
            each tile's quality before merging.
        class_names, label_to_cat_id: name the labels in the CSV and map them to category ids in
            the JSON (default: the label numbers).
        tta, tta_merge: test-time augmentation of every tile (:mod:`locconf.tta`: ``none``,
            ``flips`` or ``all``; the passes pooled for ``method``, or fused).
        max_pixels: refuse a larger image (default :data:`locconf.tiling.DEFAULT_MAX_PIXELS`; 0: no limit).
        image_name: the CSV's ``image_path`` (default: ``image_path`` as given).

    Returns:
        The detections in image coordinates (``boxes``, ``scores``, ``labels``, ...), best first.
    """
    from ..evaluation.calibration import Calibration
    from ..files import check_outputs
    from ..tiling import DEFAULT_MAX_PIXELS, open_raster, predict_tiled
    from ..tta import tta_model

    image_path, out_path = Path(image_path), Path(out_path)
    csv_path = Path(csv_path) if csv_path is not None else out_path.with_suffix(".csv")
    json_path = Path(json_path) if json_path is not None else out_path.with_suffix(".json")
    check_outputs({"the drawing": out_path, "the CSV": csv_path, "the JSON": json_path,
                   "the GeoJSON": out_path.with_suffix(".geojson")}, {"input image": image_path})
    check_settings(tile_size, overlap, method, params, border, tta, tta_merge, model, **merge_args)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Calibration.load(calibration)
    runner = tta_model(model, tta, tta_merge, method, params)
    with open_raster(image_path, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels) as raster:
        dets = predict_tiled(runner, raster, tile_size, overlap, batch_size, method, params, border,
                             device=device_of(device), progress=progress, calibration=calibration, **merge_args)
        write_image_outputs(raster, dets, image_path=image_name if image_name is not None else str(image_path),
                            image_id=1, drawing=out_path, detections=json_path, csv=csv_path, class_names=class_names,
                            label_to_cat_id=label_to_cat_id, score_threshold=score_threshold, max_side=max_side,
                            vector=out_path.with_suffix(".geojson"))
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
