"""Reading images tile by tile: :func:`open_raster` and its two readers (Pillow, rasterio).

PNG and JPEG files have no random access: they are decoded whole, once, in their own pixel format
(3 bytes a pixel for 8-bit RGB), with :func:`locconf.data.load_image`'s conversion applied to each
tile (8-bit / 255, 16-bit grey / 65535); Pillow's decompression-bomb limit is lifted for this file
only (orthomosaics are legitimately huge). GeoTIFFs are read tile by tile (windowed reads) with
rasterio when it is installed (an optional dependency), which also gives the geotransform: boxes
are then written in map coordinates as well. Without rasterio a TIFF is read whole with Pillow and
has no geotransform. Only the tiles of one batch are held as float tensors.

Checks before any pixel is decoded or any tile runs:

* **Size.** An image of more than ``max_pixels`` pixels (width x height, read from the file's
  header) is refused: :data:`DEFAULT_MAX_PIXELS` is one gigapixel (31,623 px square, about 3 GB
  decoded for an 8-bit RGB PNG; about 11,000 tiles of 400 px with 100 px overlap); pass a larger
  number (``locconf predict --max-pixels``) or 0 for no limit. Pillow's own decompression-bomb
  limit (89 megapixels) is lifted for the file, since this one replaces it.
* **Short or corrupt pixel data.** Pillow accepts a PNG whose compressed pixel data ends early
  (a 661-byte file that declares 20000 x 20000 pixels decodes to black), so a PNG's data is
  inflated once, in bounded memory, and its length checked against the size its header declares
  (and zlib's checksum verified); a truncated JPEG or TIFF is Pillow's error
  (``LOAD_TRUNCATED_IMAGES`` stays off). rasterio reads a GeoTIFF window by window, so a corrupt
  block is found when its tile is read; every such error is a ``ValueError`` naming the file.
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

#: The largest image, in pixels (width x height), that :func:`open_raster` opens unless told otherwise.
DEFAULT_MAX_PIXELS = 1_000_000_000


def _check_max_pixels(path: Path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if max_pixels is None or max_pixels == 0:
        return
    if width * height > max_pixels:
        raise ValueError(f"{path}: {width} x {height} = {width * height:,} pixels is more than the limit of "
                         f"{max_pixels:,} (max_pixels; locconf predict --max-pixels N raises it, 0 removes it)")


# PNG: channels per color type, and the Adam7 passes (x0, y0, dx, dy).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_expected_bytes(width: int, height: int, bit_depth: int, color_type: int, interlace: int) -> int:
    """Bytes of the filtered scanlines (one filter byte each) that a PNG of this header must inflate to."""
    bits = _PNG_CHANNELS[color_type] * bit_depth
    if not interlace:
        return height * (1 + (width * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        w, h = (width - x0 + dx - 1) // dx if width > x0 else 0, (height - y0 + dy - 1) // dy if height > y0 else 0
        if w and h:
            total += h * (1 + (w * bits + 7) // 8)
    return total


def check_png_data(path: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming ``path`` when a PNG's pixel data is short, corrupt or missing.

    Walks the chunks and inflates the ``IDAT`` data in blocks (memory bounded whatever the image
    size), comparing the inflated length with what the ``IHDR`` header declares; zlib checks the
    data's Adler-32 checksum at its end. Pillow decodes such files without an error when the
    compressed stream is complete but too short.
    """
    import struct
    import zlib

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{path}: not a PNG file (no PNG signature)")
        header = None
        inflate = zlib.decompressobj()
        got, finished = 0, False
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: the PNG file is truncated (it ends before its IEND chunk)")
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IHDR":
                data = f.read(length)
                if len(data) < 13:
                    raise ValueError(f"{path}: the PNG header (IHDR) is truncated")
                width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[:13])
                if color_type not in _PNG_CHANNELS:
                    raise ValueError(f"{path}: PNG color type {color_type} is not valid")
                header = (width, height, bit_depth, color_type, interlace)
                f.seek(4, 1)
            elif kind == b"IDAT":
                left = length
                while left:
                    block = f.read(min(left, 1 << 20))
                    if not block:
                        raise ValueError(f"{path}: the PNG file is truncated inside its pixel data")
                    left -= len(block)
                    try:
                        while block and not finished:
                            got += len(inflate.decompress(block, 1 << 22))
                            block = inflate.unconsumed_tail
                            finished = inflate.eof
                    except zlib.error as e:
                        raise ValueError(f"{path}: the PNG's pixel data is corrupt ({e})") from None
                f.seek(4, 1)
            elif kind == b"IEND":
                break
            else:
                f.seek(length + 4, 1)
    if header is None:
        raise ValueError(f"{path}: the PNG file has no header (IHDR chunk)")
    expected = _png_expected_bytes(*header)
    if not finished or got < expected:
        raise ValueError(f"{path}: the PNG's pixel data is short or truncated: {got:,} of the {expected:,} bytes "
                         f"that {header[0]} x {header[1]} pixels need (the file is damaged or incomplete)")


class _PillowRaster:
    """An image Pillow decodes whole (PNG, JPEG, ...); tiles are cropped from the decoded pixels."""

    def __init__(self, path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        from PIL import Image

        from ..data.coco import _image_tensor

        self.path, self._to_tensor = path, _image_tensor
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # orthomosaics are legitimately huge: max_pixels is the limit here
        im = None
        try:
            im = Image.open(path)
            _check_max_pixels(path, im.size[0], im.size[1], max_pixels)  # before decoding anything
            if im.format == "PNG":
                check_png_data(path)
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            if im is not None:
                im.close()
            if isinstance(e, ValueError) and str(e).startswith(str(path)):
                raise
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

    def __init__(self, path: Path, rasterio: Any, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.path, self._rio = path, rasterio
        try:
            self._ds = rasterio.open(path)
        except Exception as e:  # rasterio raises its own RasterioIOError
            raise ValueError(f"{path}: cannot read the raster ({type(e).__name__}: {e})") from e
        ds = self._ds
        self.width, self.height = ds.width, ds.height
        try:
            _check_max_pixels(path, self.width, self.height, max_pixels)
        except ValueError:
            ds.close()
            raise
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
        try:
            pixels = self._ds.read(self._bands, window=Window(x1, y1, x2 - x1, y2 - y1))
        except Exception as e:  # a corrupt or missing block: rasterio's RasterioIOError (or GDAL's CPLE_*)
            raise ValueError(f"{self.path}: cannot read the pixels of window x {x1}..{x2}, y {y1}..{y2}: the file "
                             f"is damaged or incomplete ({type(e).__name__}: {e})") from e
        return self._tensor(pixels)

    def overview(self, max_side: int) -> tuple[Tensor, float]:
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.width, self.height, 1))
        shape = (3, max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        try:
            pixels = self._ds.read(self._bands, out_shape=shape, resampling=Resampling.average)
        except Exception as e:
            raise ValueError(f"{self.path}: cannot read the overview: the file is damaged or incomplete "
                             f"({type(e).__name__}: {e})") from e
        return self._tensor(pixels), scale

    def close(self) -> None:
        self._ds.close()


@contextlib.contextmanager
def open_raster(path: str | os.PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
    """Open an image for tiled reading: ``with open_raster(p) as r: r.read((x1, y1, x2, y2))``.

    ``max_pixels``: refuse an image of more pixels (None or 0: no limit); see the module docstring,
    which also says how short or corrupt pixel data is found.

    The raster has ``width``, ``height``, ``transform`` (GDAL's six geotransform numbers
    ``(a, b, c, d, e, f)``: ``X = a * col + b * row + c``, ``Y = d * col + e * row + f``, or None),
    ``crs`` (a string or None), ``read(window) -> (3, h, w)`` float in [0, 1] and
    ``overview(max_side) -> (image, scale)``. TIFFs go through rasterio when it is installed
    (windowed reads), everything else (and TIFFs without rasterio) through Pillow (decoded whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 0):
        raise ValueError(f"max_pixels must be a non-negative integer (0: no limit), got {max_pixels!r}")
    raster: Any = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import rasterio
        except ImportError:
            logger.warning("%s: rasterio is not installed; reading the TIFF whole with Pillow, without its "
                           "geotransform (pip install rasterio for windowed reads and map coordinates)", path)
        else:
            raster = _RasterioRaster(path, rasterio, max_pixels)
    if raster is None:
        raster = _PillowRaster(path, max_pixels)
    try:
        yield raster
    finally:
        raster.close()
