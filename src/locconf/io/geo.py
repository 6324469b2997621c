"""Rasters and vector files: the optional ``geo`` dependencies, and pixels <-> map coordinates.

Vector files (GeoJSON, GeoPackage, ESRI shapefile) are read and written with pyogrio (GDAL's
vector drivers, no geopandas needed) and shapely 2 (vectorised geometry arrays); rasters are
opened with rasterio for their size, affine geotransform and CRS. These three are the optional
extra ``pip install "locconf[geo]"``; :func:`require` imports them and says what to install when
one is missing (:class:`GeoDependencyError`, both an ``ImportError`` and a ``ValueError``, so the
command line prints it as one line).

Coordinates. A raster's geotransform ``(a, b, c, d, e, f)`` maps a pixel position ``(col, row)``
(continuous: ``(0, 0)`` is the top-left corner of the top-left pixel) to the map:
``X = a * col + b * row + c``, ``Y = d * col + e * row + f``.

* Pixel box -> map (:func:`box_polygons`): the polygon through the four mapped corners, exact for
  any affine (rotated rasters included).
* Map geometry -> pixel box (:func:`pixel_boxes`): every vertex is mapped through the inverse
  affine (after reprojection to the raster's CRS where the vector's differs) and the box is the
  bounds of the mapped vertices. A box written by :func:`box_polygons` reads back as itself (to
  float64 rounding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GeoDependencyError", "require", "RasterInfo", "raster_info", "box_polygons", "pixel_boxes",
           "read_vector", "write_vector", "same_crs"]

#: GDAL driver of each vector format.
DRIVERS = {"geojson": "GeoJSON", "gpkg": "GPKG", "shp": "ESRI Shapefile"}


class GeoDependencyError(ImportError, ValueError):
    """A geo dependency (rasterio, pyogrio, shapely) is missing: the message says what to install."""


def require(*modules: str, why: str = "this") -> list[Any]:
    """Import the named geo modules (``"rasterio"``, ``"pyogrio"``, ``"shapely"``) and return them.

    Raises:
        GeoDependencyError: one is not installed; the message names it, ``why`` needs it, and the
            command that installs the extra.
    """
    out = []
    for name in modules:
        try:
            out.append(__import__(name))
        except ImportError as e:
            raise GeoDependencyError(
                f"{why} needs the optional geo dependencies (rasterio, pyogrio, shapely); {name} is not "
                f"installed ({e}). Install them with: pip install \"locconf[geo]\"") from None
    if "pyogrio" in modules:
        import pyogrio.raw  # noqa: F401  (a submodule, not imported by ``import pyogrio`` on every version)
    if "rasterio" in modules:
        import rasterio.warp  # noqa: F401
    return out


@dataclass(frozen=True)
class RasterInfo:
    """What a raster's header says: its size in pixels, its geotransform and its CRS.

    ``transform`` is ``(a, b, c, d, e, f)`` (see the module docstring), None for an image that is
    not georeferenced (no CRS and an identity transform: PNG, JPEG, a plain TIFF); ``crs`` is
    rasterio's ``CRS`` or None.
    """

    path: Path
    width: int
    height: int
    transform: Optional[tuple[float, ...]]
    crs: Any


def raster_info(path: str | os.PathLike) -> RasterInfo:
    """The header of a raster (opened with rasterio; no pixels are read)."""
    import warnings

    (rasterio,) = require("rasterio", why=f"reading the georeferencing of {path}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"raster {path}: no such file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                transform = tuple(float(v) for v in tuple(src.transform)[:6])
                crs, width, height = src.crs, int(src.width), int(src.height)
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(f"raster {path}: cannot open it ({e})") from None
    if crs is None and transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
        transform = None
    return RasterInfo(path, width, height, transform, crs)


def _check_transform(transform: Sequence[float]) -> tuple[float, ...]:
    try:
        t = tuple(float(v) for v in transform)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 6 or not all(np.isfinite(t)):
        raise ValueError(f"transform must be six finite numbers (a, b, c, d, e, f), got {transform!r}")
    if t[0] * t[4] - t[1] * t[3] == 0:
        raise ValueError(f"transform {t} is singular (its pixels have no area)")
    return t


def box_polygons(boxes: np.ndarray, transform: Optional[Sequence[float]] = None) -> np.ndarray:
    """Boxes (N, 4) ``x1, y1, x2, y2`` in pixels -> N shapely polygons, in map coordinates when a
    ``transform`` is given (the four corners mapped), else in pixels."""
    (shapely,) = require("shapely", why="writing boxes as polygons")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cols = b[:, [0, 2, 2, 0, 0]]
    rows = b[:, [1, 1, 3, 3, 1]]
    if transform is not None:
        a, bb, c, d, e, f = _check_transform(transform)
        cols, rows = a * cols + bb * rows + c, d * cols + e * rows + f
    rings = np.stack([cols, rows], axis=-1)  # (N, 5, 2), closed rings
    return shapely.polygons(rings)


def same_crs(a: Any, b: Any) -> bool:
    """Whether two CRSs (rasterio ``CRS``, WKT, ``"EPSG:n"``) are the same."""
    (rasterio,) = require("rasterio", why="comparing coordinate reference systems")
    from rasterio.crs import CRS

    return CRS.from_user_input(a) == CRS.from_user_input(b)


def pixel_boxes(geoms: np.ndarray, raster: RasterInfo, crs: Any = None, name: str = "vector") -> np.ndarray:
    """Bounds (N, 4) ``x1, y1, x2, y2`` in the pixels of ``raster`` of N shapely geometries in map coordinates.

    ``crs``: the geometries' CRS (None: taken to be the raster's). Geometries in another CRS than
    the raster's are reprojected to it first (logged). A raster without georeferencing takes the
    geometries as pixel coordinates already (``crs`` must then be None).
    """
    shapely, rasterio = require("shapely", "rasterio", why=f"converting {name} to pixel boxes")
    geoms = np.asarray(geoms, dtype=object)
    if raster.transform is None:
        if crs is not None:
            raise ValueError(f"{name} is in map coordinates ({_crs_name(crs)}) but {raster.path} is not georeferenced "
                             "(no CRS and no geotransform): give the georeferenced raster (GeoTIFF) of these images")
        return _bounds(shapely, geoms)
    if crs is not None and raster.crs is not None and not same_crs(crs, raster.crs):
        logger.info("%s: reprojecting from %s to %s, the CRS of %s", name, _crs_name(crs), _crs_name(raster.crs),
                    raster.path)
        coords = shapely.get_coordinates(geoms)
        xs, ys = rasterio.warp.transform(crs, raster.crs, coords[:, 0], coords[:, 1])
        geoms = shapely.set_coordinates(geoms.copy(), np.stack([np.asarray(xs), np.asarray(ys)], axis=1))
    a, b, c, d, e, f = raster.transform
    det = a * e - b * d
    inv = np.array([[e, -b], [-d, a]]) / det

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        return (xy - np.array([c, f])) @ inv.T

    return _bounds(shapely, shapely.transform(geoms, to_pixels))


def _bounds(shapely: Any, geoms: np.ndarray) -> np.ndarray:
    return np.asarray(shapely.bounds(geoms), dtype=np.float64).reshape(-1, 4)


def _crs_name(crs: Any) -> str:
    try:
        from rasterio.crs import CRS

        c = CRS.from_user_input(crs)
        return c.to_string() or "a custom CRS"
    except Exception:  # noqa: BLE001  (only for a message)
        return str(crs)[:80]


def read_vector(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray], Optional[str]]:
    """Every feature of a vector file: ``(geometries, {field: values}, crs)``.

    ``geometries``: an object array of shapely geometries (None for a feature without one);
    ``crs``: the layer's CRS as pyogrio gives it (``"EPSG:n"`` or WKT), None when it has none. A
    GeoJSON file without a ``crs`` member states none (GDAL reports WGS 84 for it, RFC 7946's
    default): None here, so that pixel coordinates written without a CRS read back as such
    (:func:`locconf.io.vector.read_vector_rows` still takes lon/lat coordinates for WGS 84).
    """
    shapely, pyogrio = require("shapely", "pyogrio", why=f"reading {path}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    try:
        meta, _, wkb, values = pyogrio.raw.read(path)
    except Exception as e:  # pyogrio's DataSourceError and GDAL errors
        raise ValueError(f"{path}: cannot read it as a vector file ({type(e).__name__}: {e})") from None
    geoms = shapely.from_wkb(wkb) if wkb is not None else np.full(len(values[0]) if values else 0, None, object)
    fields = {str(name): np.asarray(v) for name, v in zip(meta["fields"], values)}
    crs = meta.get("crs")
    if path.suffix.lower() in (".geojson", ".json") and not _geojson_states_crs(path):
        crs = None
    return np.asarray(geoms, dtype=object), fields, crs


def _geojson_states_crs(path: Path) -> bool:
    """Whether a GeoJSON file has a top-level ``crs`` member (GDAL writes it before the features)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return b'"crs"' in head.split(b'"features"', 1)[0]


def write_vector(path: str | os.PathLike, fmt: str, geoms: np.ndarray, fields: dict[str, np.ndarray],
                 crs: Any = None) -> Path:
    """Write polygons with their attribute fields (one array each) as GeoJSON, GeoPackage or shapefile.

    Written into a temporary folder beside ``path`` and moved into place only when GDAL succeeded
    (a shapefile's side files ``.shx``, ``.dbf``, ``.prj``, ``.cpg`` move with it).
    """
    import shutil
    import tempfile

    shapely, pyogrio = require("shapely", "pyogrio", why=f"writing {path}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output folder {path.parent} does not exist")
    crs_text = None
    if crs is not None:
        crs_text = crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)
    import warnings

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        names = list(fields)
        with warnings.catch_warnings():  # pixel coordinates have no CRS: pyogrio's warning about it is expected
            warnings.filterwarnings("ignore", message=".*'crs' was not provided")
            pyogrio.raw.write(tmp, shapely.to_wkb(np.asarray(geoms, dtype=object)), [fields[n] for n in names], names,
                              geometry_type="Polygon", crs=crs_text, driver=DRIVERS[fmt])
        for f in sorted(tmp_dir.iterdir()):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
