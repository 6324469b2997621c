"""Which format a file is in: by its extension, unless a flag says otherwise.

=========  ======================================  ==========================================
format     extensions                              holds
=========  ======================================  ==========================================
json       ``.json``                               COCO (results: a JSON array; ground truth:
                                                   an object with images, annotations,
                                                   categories)
jsonl      ``.jsonl``, ``.ndjson``                 COCO results, one record per line
csv        ``.csv``                                DeepForest's columns (:mod:`.csvfile`)
geojson    ``.geojson``                            polygons or boxes (:mod:`.vector`)
gpkg       ``.gpkg``                               polygons or boxes (GeoPackage)
shp        ``.shp``                                polygons or boxes (ESRI shapefile)
=========  ======================================  ==========================================

A COCO results file is told apart as an array or as JSON Lines by its first character whatever its
name, so ``json`` and ``jsonl`` read the same; they differ when writing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["FORMATS", "VECTOR_FORMATS", "SUFFIXES", "format_of"]

#: Every format a file may be read or written in (``--format`` values).
FORMATS = ("json", "jsonl", "csv", "geojson", "gpkg", "shp")

#: The formats that hold geometries (read and written with the ``geo`` extra).
VECTOR_FORMATS = ("geojson", "gpkg", "shp")

#: File extension -> format.
SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".geojson": "geojson",
            ".gpkg": "gpkg", ".shp": "shp"}


def format_of(path: str | os.PathLike, format: Optional[str] = None, flag: str = "format") -> str:
    """The format of ``path``: ``format`` when given (one of :data:`FORMATS`), else its extension's.

    ``flag`` names the option that overrides it in error messages (``format``, ``gt_format``, ...).
    """
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"{flag} must be one of {', '.join(FORMATS)}, got {format!r}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; use "
                         f"{', '.join(SUFFIXES)} or name the format with {flag} ({', '.join(FORMATS)})")
    return SUFFIXES[suffix]
