"""Reading images tile by tile: :func:`open_raster` and its two readers (Pillow, rasterio).

PNG and JPEG files have no random access: they are decoded whole, once, in their own pixel format
(3 bytes a pixel for 8-bit RGB), with :func:`locconf.data.load_image`'s conversion applied to each
tile (8-bit / 255, 16-bit grey / 65535); Pillow's decompression-bomb limit is lifted for this file
only (orthomosaics are legitimately huge). GeoTIFFs are read tile by tile (windowed reads) with
rasterio when it is installed (an optional dependency), which also gives the geotransform: boxes
are then written in map coordinates as well. Without rasterio a TIFF is read whole with Pillow and
has no geotransform. Only the tiles of one batch are held as float tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__package__)  # "locconf.tiling", as before the package split


class _PillowRaster:
    """An image Pillow decodes whole (PNG, JPEG, ...); tiles are cropped from the decoded pixels."""

    def __init__(self, path: Path):
        from PIL import Image

        from ..data.coco import _image_tensor

        self.path, self._to_tensor = path, _image_tensor
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # orthomosaics are legitimately huge
        try:
            im = Image.open(path)
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the image, the file is truncated or not an image "
                             f"({type(e).__name__}: {e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        self._im = im
        self.width, self.height = im.size
        self.transform: Optional[tuple[float, ...]] = None
        self.crs: Optional[str] = None
        self._to_tensor(im.crop((0, 0, min(1, self.width), min(1, self.height))), path)  # unsupported modes fail now

    def read(self, window: Sequence[int]) -> Tensor:
        x1, y1, x2, y2 = (int(v) for v in window)
        return self._to_tensor(self._im.crop((x1, y1, x2, y2)), self.path)

    def overview(self, max_side: int) -> tuple[Tensor, float]:
        scale = min(1.0, max_side / max(self.width, self.height, 1))
        im = self._im
        if scale < 1.0:
            size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
            if not (im.mode in ("RGB", "L") or im.mode.startswith("I;16")):  # 16-bit grey keeps its depth
                im = im.convert("RGB")
            im = im.resize(size, resample=3)  # bicubic
        return self._to_tensor(im, self.path), scale

    def close(self) -> None:
        self._im.close()


class _RasterioRaster:
    """A raster rasterio reads window by window (GeoTIFF), with its geotransform and CRS."""

    def __init__(self, path: Path, rasterio: Any):
        self.path, self._rio = path, rasterio
        try:
            self._ds = rasterio.open(path)
        except Exception as e:  # rasterio raises its own RasterioIOError
            raise ValueError(f"{path}: cannot read the raster ({type(e).__name__}: {e})") from e
        ds = self._ds
        self.width, self.height = ds.width, ds.height
        if ds.count >= 3:
            self._bands = [1, 2, 3]
        elif ds.count == 1:
            self._bands = [1, 1, 1]
        else:
            ds.close()
            raise ValueError(f"{path}: {ds.count} bands; expected 1 (grey) or at least 3 (RGB first)")
        dtype = ds.dtypes[0]
        if dtype not in ("uint8", "uint16"):
            ds.close()
            raise ValueError(f"{path}: pixel type {dtype} is not supported; expected uint8 or uint16")
        self._scale = 255.0 if dtype == "uint8" else 65535.0
        t = ds.transform
        self.transform = (t.a, t.b, t.c, t.d, t.e, t.f)
        self.crs = ds.crs.to_string() if ds.crs else None

    def _tensor(self, arr: Any) -> Tensor:
        return torch.from_numpy(arr.astype("float32")).div_(self._scale)

    def read(self, window: Sequence[int]) -> Tensor:
        from rasterio.windows import Window

        x1, y1, x2, y2 = (int(v) for v in window)
        return self._tensor(self._ds.read(self._bands, window=Window(x1, y1, x2 - x1, y2 - y1)))

    def overview(self, max_side: int) -> tuple[Tensor, float]:
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.width, self.height, 1))
        shape = (3, max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        return self._tensor(self._ds.read(self._bands, out_shape=shape, resampling=Resampling.average)), scale

    def close(self) -> None:
        self._ds.close()


@contextlib.contextmanager
def open_raster(path: str | os.PathLike):
    """Open an image for tiled reading: ``with open_raster(p) as r: r.read((x1, y1, x2, y2))``.

    The raster has ``width``, ``height``, ``transform`` (GDAL's six geotransform numbers
    ``(a, b, c, d, e, f)``: ``X = a * col + b * row + c``, ``Y = d * col + e * row + f``, or None),
    ``crs`` (a string or None), ``read(window) -> (3, h, w)`` float in [0, 1] and
    ``overview(max_side) -> (image, scale)``. TIFFs go through rasterio when it is installed
    (windowed reads), everything else (and TIFFs without rasterio) through Pillow (decoded whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    raster: Any = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import rasterio
        except ImportError:
            logger.warning("%s: rasterio is not installed; reading the TIFF whole with Pillow, without its "
                           "geotransform (pip install rasterio for windowed reads and map coordinates)", path)
        else:
            raster = _RasterioRaster(path, rasterio)
    if raster is None:
        raster = _PillowRaster(path)
    try:
        yield raster
    finally:
        raster.close()
