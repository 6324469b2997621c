"""Ground truth from any supported file, as a COCO instances dict (what the evaluation and training read).

:func:`read_annotations` reads a COCO instances JSON as it is (after checking that it is one: a
COCO *results* file given as ground truth is named as such), and converts a CSV
(:mod:`locconf.io.csvfile`) or a vector file (:mod:`locconf.io.vector`, with the rasters its
coordinates refer to) into COCO in memory: one image per distinct image key, one annotation per
box (see :func:`locconf.io.rows.instances` for the numbering).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from .csvfile import read_csv
from .formats import format_of
from .keys import ImageFinder

__all__ = ["read_annotations", "check_instances", "image_size"]

_RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def check_instances(data: Any, path: str | os.PathLike) -> dict:
    """``data`` (a parsed JSON file) if it is a COCO instances object, else a ``ValueError`` that says what it is."""
    if isinstance(data, list):
        looks = (" whose records look like COCO results (detections: image_id, category_id, bbox, score)"
                 if data and isinstance(data[0], dict) and all(k in data[0] for k in _RESULT_KEYS) else "")
        raise ValueError(f"{path}: not a COCO instances file (ground truth): it holds a JSON array of {len(data)} "
                         f"records{looks}. The ground truth is a JSON object with 'images', 'annotations' and "
                         "'categories' (or a CSV / shapefile / GeoJSON / GeoPackage of boxes)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a COCO instances file (ground truth): its top level is a "
                         f"{type(data).__name__}, not an object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file (ground truth): no list {', '.join(repr(k) for k in missing)} "
                         f"(top-level keys: {sorted(data)[:10]})")
    return data


def image_size(path: Path) -> Optional[tuple[int, int]]:
    """``(width, height)`` of an image file from its header (Pillow, else rasterio), None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, ValueError, Image.DecompressionBombError):
        pass
    try:
        from .geo import raster_info

        info = raster_info(path)
        return info.width, info.height
    except (ImportError, ValueError):
        return None


def read_annotations(path: str | os.PathLike, format: Optional[str] = None, *,
                     images: Optional[Iterable[str | os.PathLike]] = None, default_label: str = "Tree",
                     require_images: bool = False, categories: Optional[list[dict]] = None) -> dict:
    """A ground-truth file as a COCO instances dict.

    Args:
        path: COCO instances JSON, CSV, GeoJSON, GeoPackage or shapefile.
        format: its format (default: from the extension; :func:`locconf.io.format_of`).
        images: image files and folders: where the images that a CSV names are found (for their
            size), and the rasters of a vector file in map coordinates (:mod:`locconf.io.vector`).
            The file's own folder is also searched.
        default_label: the label of every box of a file without a ``label`` column / field.
        require_images: every image must be found (training needs the pixels): its ``file_name``
            is then the found file's absolute path. Otherwise ``file_name`` is the image key as the
            file writes it, and ``width`` / ``height`` are filled in where the image is found.
        categories: COCO categories (``id``, ``name``) the labels of a CSV or vector file must map
            to (e.g. the training split's, for the validation split); default: the file's own
            labels, names numbered 1..K in sorted order. Not used for COCO files.
    """
    from ..data.coco import read_json

    path = Path(path)
    fmt = format_of(path, format, "gt_format")
    if fmt == "json":
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        return check_instances(read_json(path), path)
    if fmt == "jsonl":
        raise ValueError(f"{path}: JSON Lines hold detections (COCO results), not a ground truth; give a COCO "
                         "instances JSON, a CSV or a vector file")
    finder = ImageFinder(images, base=path.parent)
    if fmt == "csv":
        rows, infos = read_csv(path, need_score=False, default_label=default_label), {}
    else:
        from .vector import read_vector_rows

        rows, infos = read_vector_rows(path, False, finder, default_label)

    def image_record(key: Any) -> dict:
        rec: dict[str, Any] = {}
        if isinstance(key, str):
            rec["file_name"] = key
        info = infos.get(key)
        file = info.path if info is not None else finder.find(key)
        size = (info.width, info.height) if info is not None else image_size(file) if file is not None else None
        if require_images:
            if file is None or size is None:
                raise ValueError(f"{path}: image {key!r} not found (or not readable) among "
                                 f"{[str(p) for p in finder.paths] + [str(path.parent)]}: give its file or folder")
            rec["file_name"] = str(Path(file).resolve())
        if size is not None:
            rec["width"], rec["height"] = size
        return rec

    from .rows import instances

    return instances(rows, image_record, str(path), categories)
