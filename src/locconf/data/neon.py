"""NEON tree crowns: the hand-labelled aerial RGB images shipped in the ``deepforest`` wheel, as COCO.

Three steps, each usable on its own:

1. :func:`fetch_deepforest_data` downloads the wheel with ``pip download`` into a cache (once) and
   extracts the annotated images (Pascal VOC XML + PNG) from it as a zip; nothing is installed.
2. :func:`convert_voc_to_coco` is a pure function of a folder of VOC XMLs and images: it tiles the
   large images, splits them spatially and writes ``train.json`` / ``val.json`` + tile PNGs.
3. :func:`neon_trees` does both (what ``locconf data neon-trees --out DIR`` runs).

The split leaves no pixel in both train and val. An image larger than ``tile_size`` in either side
(the two YELL images) loses a horizontal band of ``val_height`` pixels at its bottom to val; the band
is cut into non-overlapping tiles of about ``tile_size`` (equal widths) and the region above it into
``tile_size`` tiles with ``overlap``, the last row and column pushed back to end at the region's
edge, so no train tile reaches into the band. Images no larger than ``tile_size`` (OSBS_029,
SOAP_061, from other sites) go to val whole. Every image record carries its ``site`` (the NEON
site code in the file name), ``source`` (original file) and ``window`` ``[x1, y1, x2, y2]`` (its
pixels in the source image).

Boxes: a VOC box ``xmin..xmax`` becomes ``x1 = xmin, x2 = xmax`` (continuous coordinates, as the
deepforest tools read them; area ``(xmax - xmin) * (ymax - ymin)``). A box is clipped to its tile
and kept when at least ``min_visible`` (default one half) of its area lies inside the tile. All
labels ("Tree", "Alive", "Dead") become the single category ``tree`` (id 1).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from ..progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "neon_trees",
    "fetch_deepforest_data",
    "convert_voc_to_coco",
    "read_voc",
    "tile_starts",
    "crop_boxes_to_window",
    "site_of",
    "VocImage",
]

DEEPFOREST_VERSION = "2.1.0"
CATEGORIES = [{"id": 1, "name": "tree"}]
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class VocImage:
    """One annotated source image: ``boxes`` ``(N, 4)`` float64 xyxy, ``names`` its N labels."""

    image_path: Path
    width: int
    height: int
    boxes: np.ndarray
    names: list[str]


def default_cache_dir() -> Path:
    """``$LOCCONF_CACHE`` if set, else ``~/.cache/locconf``."""
    return Path(os.environ.get("LOCCONF_CACHE", Path.home() / ".cache" / "locconf"))


def site_of(name: str) -> str:
    """NEON site code (four capitals between underscores) in a file name, e.g. ``2019_YELL_2_...`` -> ``YELL``.

    Falls back to the file stem when there is none.
    """
    stem = Path(name).stem
    m = re.search(r"(?:^|_)([A-Z]{4})(?=_|$)", stem)
    return m.group(1) if m else stem


def read_voc(xml_path: str | os.PathLike) -> VocImage:
    """Parse a Pascal VOC annotation; the image is the file next to it with the XML's stem.

    (The OSBS_029 XML names a ``.tif`` but the wheel also has the PNG, which is preferred; the
    ``<filename>`` entry is used only when no image has the XML's stem.)
    Raises ValueError naming the file and object on malformed content.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not valid XML ({e})") from e

    def number(node: ET.Element, tag: str, where: str) -> float:
        child = node.find(tag)
        try:
            return float(child.text)  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{xml_path}: {where} needs a numeric <{tag}>") from None

    width = int(number(root, "size/width", "<annotation>"))
    height = int(number(root, "size/height", "<annotation>"))
    boxes, names = [], []
    for k, obj in enumerate(root.iter("object")):
        where = f"object {k}"
        name = obj.findtext("name")
        if not name:
            raise ValueError(f"{xml_path}: {where} has no <name>")
        box = [number(obj, f"bndbox/{t}", where) for t in ("xmin", "ymin", "xmax", "ymax")]
        if not all(np.isfinite(box)):
            raise ValueError(f"{xml_path}: {where} has a non-finite box {box}")
        boxes.append(box)
        names.append(name.strip())

    candidates = [xml_path.with_suffix(s) for s in _IMAGE_SUFFIXES]
    filename = root.findtext("filename")
    if filename:
        candidates.append(xml_path.parent / Path(filename).name)
    image_path = next((p for p in candidates if p.is_file()), None)
    if image_path is None:
        raise FileNotFoundError(f"{xml_path}: no image found (tried {[p.name for p in candidates]})")
    return VocImage(image_path, width, height, np.array(boxes, dtype=np.float64).reshape(-1, 4), names)


def tile_starts(start: int, stop: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[start, stop)`` with at least ``overlap``.

    Stride ``tile - overlap``; the last tile is pushed back to end exactly at ``stop``, so no tile
    leaves the range. A range shorter than ``tile`` gets a single start (the tile is cut short).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile_size), got overlap={overlap}, tile_size={tile}")
    if stop - start <= tile:
        return [start]
    starts = list(range(start, stop - tile, tile - overlap))
    starts.append(stop - tile)
    return starts


def _even_cuts(start: int, stop: int, tile: int) -> list[int]:
    """Edges of ``round(length / tile)`` (at least one) equal, non-overlapping pieces of ``[start, stop)``."""
    n = max(1, round((stop - start) / tile))
    return [start + round(k * (stop - start) / n) for k in range(n + 1)]


def crop_boxes_to_window(boxes: np.ndarray, window: tuple[int, int, int, int], min_visible: float = 0.5
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a tile: clip ``boxes`` ``(N, 4)`` to ``window`` ``(x1, y1, x2, y2)``, shift to its origin.

    Returns ``(tile_boxes (M, 4), keep (N,) bool)``: a box is kept when the clipped area is at least
    ``min_visible`` of its own area (and positive). (Not :func:`locconf.boxes.clip_boxes`, which
    clips tensors to an image and neither shifts nor drops boxes.)
    """
    x1, y1, x2, y2 = window
    c = boxes.copy()
    c[:, [0, 2]] = c[:, [0, 2]].clip(x1, x2)
    c[:, [1, 3]] = c[:, [1, 3]].clip(y1, y2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = (inside > 0) & (inside >= min_visible * area)
    return c[keep] - np.array([x1, y1, x1, y1], dtype=c.dtype), keep


def _windows(voc: VocImage, tile_size: int, overlap: int, val_height: int) -> list[tuple[str, tuple]]:
    """``(split, (x1, y1, x2, y2))`` windows of one source image."""
    w, h = voc.width, voc.height
    if w <= tile_size and h <= tile_size:
        return [("val", (0, 0, w, h))]
    if not 0 < val_height < h:
        raise ValueError(f"val_height must be in (0, {h}) for {voc.image_path.name}, got {val_height}")
    split_y = h - val_height
    out = [
        ("train", (x, y, min(x + tile_size, w), min(y + tile_size, split_y)))
        for y in tile_starts(0, split_y, tile_size, overlap)
        for x in tile_starts(0, w, tile_size, overlap)
    ]
    ys, xs = _even_cuts(split_y, h, tile_size), _even_cuts(0, w, tile_size)
    out += [("val", (xs[i], ys[j], xs[i + 1], ys[j + 1])) for j in range(len(ys) - 1) for i in range(len(xs) - 1)]
    return out


def _read_pixels(voc: VocImage) -> np.ndarray:
    """The (H, W, 3) uint8 RGB pixels of ``voc``'s image, checked against the size its XML gives."""
    with Image.open(voc.image_path) as im:
        pixels = np.asarray(im.convert("RGB"))
    if pixels.shape[:2] != (voc.height, voc.width):
        raise ValueError(
            f"{voc.image_path}: image is {pixels.shape[1]}x{pixels.shape[0]} but its XML says "
            f"{voc.width}x{voc.height}"
        )
    return pixels


def _add_tile(coco: dict, counts: dict, image: dict, boxes: np.ndarray) -> None:
    """Append one tile's image record and its boxes (M, 4) xyxy, as COCO annotations, to one split's
    ``coco`` dict, and count them in the split's ``counts`` (in total and for the image's site)."""
    coco["images"].append(image)
    anns = coco["annotations"]
    for b in boxes.tolist():
        bw, bh = b[2] - b[0], b[3] - b[1]
        anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": 1,
                     "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": 0})
    per_site = counts["sites"].setdefault(image["site"], {"images": 0, "boxes": 0})
    for c in (counts, per_site):
        c["images"] += 1
        c["boxes"] += len(boxes)


def _convert_image(voc: VocImage, windows: list[tuple[str, tuple]], min_visible: float, out_dir: Path,
                   coco: dict, counts: dict, bar) -> np.ndarray:
    """Write the tiles of one source image (PNGs under ``out_dir``, records into ``coco`` and
    ``counts`` per split; ``bar`` advances by one a tile). Returns (N,) bool: which of its boxes
    some tile kept."""
    pixels = _read_pixels(voc)
    site = site_of(voc.image_path.name)
    used = np.zeros(len(voc.boxes), dtype=bool)
    for split, (x1, y1, x2, y2) in windows:
        boxes, keep = crop_boxes_to_window(voc.boxes, (x1, y1, x2, y2), min_visible)
        used |= keep
        whole = (x1, y1, x2, y2) == (0, 0, voc.width, voc.height)
        name = f"{split}/{voc.image_path.stem}" + ("" if whole else f"_x{x1}_y{y1}") + ".png"
        Image.fromarray(pixels[y1:y2, x1:x2]).save(out_dir / name, compress_level=1)
        image_id = len(coco["train"]["images"]) + len(coco["val"]["images"]) + 1
        image = {"id": image_id, "file_name": name, "width": x2 - x1, "height": y2 - y1,
                 "site": site, "source": voc.image_path.name, "window": [x1, y1, x2, y2]}
        _add_tile(coco[split], counts[split], image, boxes)
        bar.update(1)
    return used


def _summary(counts: dict, vocs: list[VocImage], dropped: int, out_dir: Path) -> dict:
    """``counts`` completed with the source totals, ``dropped``, ``val_fraction`` and the paths."""
    total = sum(len(v.boxes) for v in vocs)
    labels = Counter(name for v in vocs for name in v.names)
    counts["source"] = {"images": len(vocs), "boxes": total, "labels": dict(labels)}
    counts["dropped"] = dropped
    counts["val_fraction"] = counts["val"]["boxes"] / total if total else 0.0
    counts.update(train_json=str(out_dir / "train.json"), val_json=str(out_dir / "val.json"), root=str(out_dir))
    if total and counts["val_fraction"] < 0.25:
        logger.warning("val holds only %.1f%% of the crowns; increase val_height", 100 * counts["val_fraction"])
    return counts


def convert_voc_to_coco(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile_size: int = 400,
    overlap: int = 100,
    val_height: int = 400,
    min_visible: float = 0.5,
    progress: bool = True,
) -> dict:
    """Tile, split and convert every ``*.xml`` (+ image) in ``src_dir`` to COCO under ``out_dir``.

    Writes ``out_dir/train.json``, ``out_dir/val.json`` and ``out_dir/{train,val}/*.png`` (read back
    with ``CocoDetection(out_dir, out_dir / "train.json")``). Empty tiles are kept (valid negatives).

    Returns counts: ``{"train": {"images", "boxes", "sites": {site: {"images", "boxes"}}}, "val": ...,
    "source": {"images", "boxes", "labels": {name: n}}, "dropped": n, "val_fraction": f}``, where
    ``dropped`` counts source boxes kept in no tile of either split and ``val_fraction`` is val boxes /
    source boxes (val tiles do not overlap, so each val box is one crown). Also ``train_json``,
    ``val_json``, ``root``.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if tile_size < 16:
        raise ValueError(f"tile_size must be >= 16, got {tile_size}")
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    xmls = sorted(src_dir.glob("*.xml"))
    if not xmls:
        raise FileNotFoundError(f"no VOC *.xml annotation files in {src_dir}")
    vocs = [read_voc(p) for p in xmls]

    coco = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    counts: dict = {s: {"images": 0, "boxes": 0, "sites": {}} for s in ("train", "val")}
    for s in coco:
        (out_dir / s).mkdir(parents=True, exist_ok=True)
    jobs = [(voc, _windows(voc, tile_size, overlap, val_height)) for voc in vocs]
    dropped = 0
    bar = progress_bar(total=sum(len(w) for _, w in jobs), desc="neon tiles", progress=progress)
    for voc, windows in jobs:
        dropped += int((~_convert_image(voc, windows, min_visible, out_dir, coco, counts, bar)).sum())
    bar.close()

    description = f"tiles {tile_size} px, overlap {overlap}, val band {val_height} px"
    for split, data in coco.items():
        data.update(info={"description": f"NEON tree crowns ({split}), from the deepforest wheel, {description}"},
                    licenses=[], categories=CATEGORIES)
        with open(out_dir / f"{split}.json", "w", encoding="utf-8") as f:
            json.dump(data, f)
    return _summary(counts, vocs, dropped, out_dir)


def fetch_deepforest_data(
    cache_dir: str | os.PathLike | None = None,
    version: str = DEEPFOREST_VERSION,
    timeout_s: float | None = None,
) -> Path:
    """Download the ``deepforest`` wheel once (``pip download --no-deps``) and extract its annotated data.

    Returns ``<cache_dir>/deepforest-<version>/`` holding each ``deepforest/data/*.xml`` and the image
    with the same stem (``cache_dir`` defaults to :func:`default_cache_dir`). Both the wheel and the
    extraction are cached. Raises RuntimeError when pip cannot fetch the wheel (or takes longer
    than ``timeout_s``).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / f"deepforest-{version}"
    done = dest / ".complete"
    if done.is_file():
        return dest
    wheels = cache / "wheels"
    wheel = wheels / f"deepforest-{version}-py3-none-any.whl"
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", f"deepforest=={version}", "--no-deps",
                   "--only-binary", ":all:", "--disable-pip-version-check", "-q", "-d", tmp]
            logger.info("fetching the deepforest %s wheel: %s", version, " ".join(cmd))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"pip download deepforest=={version} took longer than {timeout_s} s") from None
            found = list(Path(tmp).glob("deepforest-*.whl"))
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"pip could not download deepforest=={version}:\n{proc.stderr.strip()[-2000:]}")
            shutil.move(str(found[0]), wheel)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        xmls = sorted(n for n in names if n.startswith("deepforest/data/") and n.endswith(".xml"))
        if not xmls:
            raise RuntimeError(f"{wheel}: no deepforest/data/*.xml annotations inside")
        for x in xmls:
            stem = x[: -len(".xml")]
            members = [x] + [stem + s for s in _IMAGE_SUFFIXES if stem + s in names][:1]
            for m in members:
                with z.open(m) as fsrc, open(dest / Path(m).name, "wb") as fdst:
                    shutil.copyfileobj(fsrc, fdst)
    done.touch()
    return dest


def neon_trees(
    out_dir: str | os.PathLike,
    tile_size: int = 400,
    overlap: int = 100,
    val_height: int = 400,
    cache_dir: str | os.PathLike | None = None,
    min_visible: float = 0.5,
    version: str = DEEPFOREST_VERSION,
    progress: bool = True,
) -> dict:
    """Fetch (cached) and convert the NEON tree-crown data to COCO under ``out_dir``.

    See :func:`convert_voc_to_coco` for the layout and the returned counts (plus ``seconds``).
    """
    t0 = time.perf_counter()
    src = fetch_deepforest_data(cache_dir, version)
    counts = convert_voc_to_coco(src, out_dir, tile_size=tile_size, overlap=overlap, val_height=val_height,
                                 min_visible=min_visible, progress=progress)
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts
