"""Vector files of boxes or polygons (GeoJSON, GeoPackage, ESRI shapefile) as rows of pixel boxes.

Each feature's geometry (a polygon, a multipolygon, a box: any geometry with an area) becomes the
bounding box of its vertices in the pixels of the raster it belongs to (:func:`locconf.io.geo.pixel_boxes`:
reprojected to the raster's CRS where the file's differs, then through the inverse geotransform).
DeepForest's ``shapefile_to_annotations`` does this job; here it happens as the file is read.

Which raster a feature belongs to:

* a feature with an ``image_path`` field belongs to that image, found among ``images`` (files or
  folders, then the vector file's own folder);
* otherwise every raster given in ``images`` (files, and the ``.tif`` / ``.tiff`` files of folders)
  receives the features that overlap it: one crowns file of a site against its tiles;
* with no raster at all, a file without a CRS holds pixel coordinates of one image.

Where features are dealt out to the rasters they overlap (no ``image_path`` field), each box is
clipped to its raster and a feature that does not overlap a raster is left out of it (both counted
in the log); a feature that names its image keeps its box as it is.

A file that states no CRS, read against a georeferenced raster, is read the way that puts most of
its features on the raster: in the raster's CRS (preferred among equals), in its pixels (a file
locconf wrote in pixel coordinates), or, for a GeoJSON of longitudes / latitudes, in WGS 84
(GeoJSON's default); a warning says which. Point geometries have no box (buffer them into polygons first);
features without a geometry are skipped (counted). Fields are read like CSV columns
(:mod:`locconf.io.csvfile`): ``label`` (missing: ``default_label``), ``score`` / ``scores``,
``quality``, ``var_x1`` ... ``var_y2``; others are kept.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .geo import RasterInfo, pixel_boxes, raster_info, read_vector, require
from .keys import ImageFinder
from .rows import BoxRow

logger = logging.getLogger(__name__)

__all__ = ["read_vector_rows"]

_VAR = ("var_x1", "var_y1", "var_x2", "var_y2")
_KNOWN = {"image_path", "label", "score", "scores", "quality", *_VAR}


def _value(v: Any) -> Any:
    """A field value as a plain Python value (numpy scalars unwrapped; NaN and None are None)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _number(v: Any, where: str, name: str) -> float:
    v = _value(v)
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: field {name!r} must be a finite number, got {v!r}")
    return float(v)


def _fields(path: Path, fields: dict[str, np.ndarray], need_score: bool) -> dict[str, str]:
    """Known field -> the file's field name (names compared without case)."""
    found: dict[str, str] = {}
    for name in fields:
        key = name.strip().lower()
        if key in _KNOWN:
            if key in found:
                raise ValueError(f"{path}: fields {found[key]!r} and {name!r} are the same field {key!r}")
            found[key] = name
    if "score" in found and "scores" in found:
        raise ValueError(f"{path}: both 'score' and 'scores' fields; keep one")
    if need_score and "score" not in found and "scores" not in found:
        raise ValueError(f"{path}: no 'score' (or 'scores') field among {list(fields)}: detections need a score")
    var = [v for v in _VAR if v in found]
    if var and len(var) != 4:
        raise ValueError(f"{path}: variance fields {var} without the others: give var_x1, var_y1, var_x2, var_y2 or none")
    return found


def _check_geometries(shapely: Any, path: Path, geoms: np.ndarray) -> np.ndarray:
    """Indices of the features with a geometry; points and lines are refused."""
    present = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
    skipped = len(geoms) - len(present)
    if skipped:
        logger.warning("%s: %d features without a geometry skipped", path, skipped)
    if present.size:
        kinds = shapely.get_type_id(geoms[present])
        bad = np.flatnonzero(~np.isin(kinds, (3, 6)))  # Polygon, MultiPolygon
        if bad.size:
            i = int(present[bad[0]])
            raise ValueError(f"{path}: feature {i} is a {geoms[i].geom_type}, "
                             "not a polygon: give crowns or boxes as polygons (buffer points into polygons first)")
    return present


def _clip(boxes: np.ndarray, raster: RasterInfo) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the raster, and which of them keep a positive area there."""
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, raster.width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, raster.height)
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, inside


def read_vector_rows(path: str | os.PathLike, need_score: bool, finder: ImageFinder,
                     default_label: str = "Tree") -> tuple[list[BoxRow], dict[Any, RasterInfo]]:
    """Every feature of a vector file as pixel-box rows (see the module docstring).

    Returns the rows and the raster of each image key (absent for pixel-coordinate files).
    """
    (shapely,) = require("shapely", why=f"reading {path}")
    path = Path(path)
    geoms, fields, crs = read_vector(path)
    names = _fields(path, fields, need_score and len(geoms) > 0)  # an empty layer may keep no field definitions
    present = _check_geometries(shapely, path, geoms)
    extras = [n for n in fields if n.strip().lower() not in _KNOWN]
    if "image_path" in names:
        values = np.array([str(_value(v)) for v in fields[names["image_path"]][present]], dtype=object)
        unique, inverse = np.unique(values.astype(str), return_inverse=True) if present.size else ([], [])
        groups: dict[Any, np.ndarray] = {str(k): present[np.asarray(inverse) == n] for n, k in enumerate(unique)}
        rasters = {key: finder.find(key) for key in groups}
        missing = [k for k, r in rasters.items() if r is None]
        if missing and crs is not None:
            raise ValueError(f"{path}: the raster of image_path {missing[0]!r} is not among the images given "
                             f"({[str(p) for p in finder.paths] or 'none'}) nor beside the file: map coordinates "
                             "need it (pass it, or its folder, as images / --images)")
        infos = {k: raster_info(r) for k, r in rasters.items() if r is not None}
    else:
        files = finder.rasters()
        if not files:
            if crs is not None:
                raise ValueError(f"{path}: the features are in map coordinates ({crs if len(str(crs)) < 60 else 'a CRS'}) "
                                 "and no raster was given to convert them to pixels: pass the GeoTIFF(s) they belong to "
                                 "as images / --images (or an image_path field naming each feature's raster)")
            groups, infos = {None: present}, {}
        else:
            groups = {str(f): present for f in files}
            infos = {str(f): raster_info(f) for f in files}
    rows: list[BoxRow] = []
    kept = outside = clipped_count = 0
    for key, idx in groups.items():
        raster = infos.get(key)
        if raster is None:
            boxes = np.asarray(shapely.bounds(geoms[idx]), dtype=np.float64).reshape(-1, 4)
            inside = np.ones(len(idx), dtype=bool)
        else:
            if crs is None:
                raw = _boxes_without_crs(shapely, path, geoms[idx], raster)
            else:
                raw = pixel_boxes(geoms[idx], raster, crs, name=str(path))
            if "image_path" in names:
                boxes, inside = raw, np.ones(len(idx), dtype=bool)
            else:
                boxes, inside = _clip(raw, raster)
                clipped_count += int(((boxes != raw).any(1) & inside).sum())
                outside += int((~inside).sum())
        for j in np.flatnonzero(inside):
            i = int(idx[j])
            rows.append(_row(path, i, key, boxes[j], fields, names, extras, default_label, need_score))
        kept += int(inside.sum())
    if present.size and not kept:
        raise ValueError(f"{path}: none of its {present.size} features overlaps the raster(s) "
                         f"{[str(r.path) for r in infos.values()]}: are they in another place, another CRS, or in pixels?")
    if outside or clipped_count:
        logger.info("%s: %d boxes clipped to their raster, %d feature placements outside a raster left out", path,
                    clipped_count, outside)
    return rows, infos


def _overlapping(boxes: np.ndarray, raster: RasterInfo) -> int:
    """How many boxes overlap the raster's pixel extent."""
    return int(((boxes[:, 2] > 0) & (boxes[:, 0] < raster.width) & (boxes[:, 3] > 0) & (boxes[:, 1] < raster.height)).sum())


def _boxes_without_crs(shapely: Any, path: Path, geoms: np.ndarray, raster: RasterInfo) -> np.ndarray:
    """Pixel boxes of geometries whose file states no CRS, against a georeferenced raster.

    The coordinates are read the way that puts most features on the raster: in the raster's CRS
    (first among equals), in its pixels, or, for a GeoJSON file of longitudes / latitudes against
    a projected raster, in WGS 84 (GeoJSON's default); a warning says which.
    """
    readings = [(f"the CRS of {raster.path.name}", pixel_boxes(geoms, raster, None, name=str(path))),
                ("pixel coordinates", np.asarray(shapely.bounds(geoms), dtype=np.float64).reshape(-1, 4))]
    xy = shapely.get_coordinates(geoms)
    lonlat = xy.size and (np.abs(xy[:, 0]) <= 180).all() and (np.abs(xy[:, 1]) <= 90).all()
    if path.suffix.lower() in (".geojson", ".json") and lonlat and raster.crs is not None and raster.crs.is_projected:
        readings.append(("WGS 84 (GeoJSON's default)", pixel_boxes(geoms, raster, "EPSG:4326", name=str(path))))
    counts = [_overlapping(boxes, raster) for _, boxes in readings]
    best = int(np.argmax(counts))
    logger.warning("%s states no CRS: its coordinates are read as %s (%d of %d features on %s)", path,
                   readings[best][0], counts[best], len(geoms), raster.path.name)
    return readings[best][1]


def _row(path: Path, i: int, key: Any, box: np.ndarray, fields: dict, names: dict, extras: list, default_label: str,
         need_score: bool) -> BoxRow:
    where = f"{path}: feature {i}"
    label = _value(fields[names["label"]][i]) if "label" in names else default_label
    if label is None or (isinstance(label, str) and not label.strip()):
        raise ValueError(f"{where}: empty 'label'")
    row = BoxRow(where, i, key, [float(v) for v in box], label.strip() if isinstance(label, str) else label)
    score_field = names.get("score", names.get("scores"))
    if score_field is not None and (need_score or _value(fields[score_field][i]) is not None):
        row.score = _number(fields[score_field][i], where, score_field)
    if "quality" in names:
        row.quality = _number(fields[names["quality"]][i], where, names["quality"])
    if "var_x1" in names:
        row.variance = [_number(fields[names[v]][i], where, names[v]) for v in _VAR]
        if min(row.variance) <= 0:
            raise ValueError(f"{where}: variances must be positive, got {row.variance}")
    row.extra = {n: v for n in extras if (v := _value(fields[n][i])) is not None}
    return row
