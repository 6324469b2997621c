"""Training and evaluation data from the annotation files users have: CSV, GeoJSON, GeoPackage, shapefile.

``data.source: annotations`` (:func:`locconf.experiment.build.build_datasets`) reads each split's
annotation file with :func:`locconf.io.read_annotations` (DeepForest's CSV columns, or crowns /
boxes in map coordinates with the GeoTIFFs they lie on) and writes it as a COCO instances file,
which :class:`locconf.data.CocoDetection` and the evaluation then read as any COCO data set. COCO
stays the one representation; the conversion is the only new step.

The converted file is named by a hash of its content (``<stem>-<sha256 prefix>.json``) in a cache
folder (``$LOCCONF_CACHE/annotations``, default ``~/.cache/locconf/annotations``): the same
annotations give the same file, written once; changed annotations give a new one. Image records
carry the absolute path of each image found (every image must be found among ``images``), so the
file does not depend on the working folder.

The images are read whole (:func:`locconf.data.load_image`, 8-bit RGB or 16-bit grey): tiles, as
DeepForest trains on, not whole orthomosaics (split those into tiles first).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from ..files import atomic_write_text

__all__ = ["coco_file", "cache_dir"]


def cache_dir() -> Path:
    """Where converted annotation files go: ``$LOCCONF_CACHE/annotations`` (default ``~/.cache/locconf``)."""
    root = os.environ.get("LOCCONF_CACHE") or Path.home() / ".cache" / "locconf"
    return Path(root) / "annotations"


def coco_file(path: str | os.PathLike, images: Optional[Iterable[str | os.PathLike]] = None,
              format: Optional[str] = None, categories: Optional[list[dict]] = None,
              default_label: str = "Tree") -> Path:
    """The COCO instances file of an annotation file: itself for COCO JSON, else its conversion (cached).

    Args:
        path: COCO instances JSON, CSV, GeoJSON, GeoPackage or shapefile.
        images: the image files / folders of its images (rasters, for map coordinates).
        format: the file's format (default: by extension, :func:`locconf.io.format_of`).
        categories: the categories its labels map to (another split's, so that labels agree).
        default_label: the label of boxes of a file without a ``label`` column / field.
    """
    from ..io import format_of, read_annotations

    path = Path(path)
    if format_of(path, format, "data.annotation_format") == "json":
        return path
    data = read_annotations(path, format, images=images, default_label=default_label, require_images=True,
                            categories=categories)
    if not data["categories"]:
        raise ValueError(f"{path}: no boxes, so no categories: a training or validation split needs boxes")
    text = json.dumps(data, sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    out = cache_dir() / f"{path.stem}-{digest}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    return out
