"""COCO-format detection dataset and batch collation.

The annotation file is validated eagerly at construction (structure, references, finiteness,
existence of the image files), so a broken data set fails before training starts with an error
that names the file and the record. Per-box problems are repaired or skipped and counted instead:
boxes reaching outside the image are clipped to it (``dataset.clipped``), boxes with zero or
negative area after clipping are dropped (``dataset.skipped``), and both are logged once.

Crowd annotations (``iscrowd = 1``: one box around a group of objects, e.g. a crowd of people) are
not objects to detect: COCO's evaluation ignores detections matched to them, and the detectors'
reference implementations (Detectron, MMDetection, torchvision's references) keep them out of the
training targets. They are dropped here too and counted in ``dataset.crowd``; ``keep_crowd=True``
keeps them as ordinary targets (with ``iscrowd`` 1). Evaluation reads the annotation file itself,
so this changes training only.

Boxes: COCO ``bbox = [x, y, w, h]`` becomes ``(x, y, x + w, y + h)``, absolute continuous pixel
coordinates, area ``w * h`` (no ``+1``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["CocoDetection", "collate_fn", "load_image", "read_json", "check_ground_truth", "area_problem"]

#: The upper end of COCO's "all" area range: COCO's evaluation ignores a ground truth whose
#: ``area`` lies outside ``[0, MAX_AREA]`` (it stops counting in AP without a word).
MAX_AREA = 1e10


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as an RGB float tensor ``(3, H, W)`` in ``[0, 1]``.

    8-bit images (any Pillow mode that converts to RGB) are divided by 255, 16-bit grey images
    (PNG ``I;16``) by 65535 and repeated over the three channels. Other high-bit-depth modes
    (32-bit integer or float) are refused, as is a file that is not an image or is truncated:
    ``ValueError`` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image, the file is truncated or not an image "
                         f"({type(e).__name__}: {e})") from e
    with im:
        return _image_tensor(im, path)


def _image_tensor(im: Image.Image, path: Path) -> Tensor:
    """``(3, H, W)`` float tensor in ``[0, 1]`` of a loaded Pillow image, scaled by its bit depth."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # 16-bit grey ("I": older Pillow)
        grey = torch.from_numpy(np.asarray(im).astype(np.float32)).div_(65535.0)
        if grey.numel() and not 0.0 <= float(grey.min()) <= float(grey.max()) <= 1.0:
            raise ValueError(f"{path}: 16-bit image with values outside 0..65535")
        return grey.unsqueeze(0).expand(3, -1, -1).contiguous()
    if im.mode in ("I", "F") or im.mode.startswith(("I;", "F;")):
        raise ValueError(f"{path}: Pillow mode {im.mode!r} (32-bit integer or float pixels) is not supported; "
                         "save the image as 8-bit RGB or 16-bit grey PNG")
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a UTF-8 JSON file; a file that is not UTF-8 or not JSON is a ``ValueError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "JSON files must be saved as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def area_problem(area: Any) -> str | None:
    """What is wrong with a COCO annotation's ``area`` (None: nothing).

    COCO's evaluation ignores a ground truth whose ``area`` lies outside ``[0, 1e10]``, and compares
    NaN with nothing: such an object silently stops counting in AP. ``area`` is the object's area in
    pixels (a segmentation's, else ``w * h``); left out, locconf uses ``w * h``.
    """
    if isinstance(area, bool) or not isinstance(area, (int, float)):
        return (f"has 'area' {area!r}, not a number: give the object's area in pixels, or leave 'area' out to "
                "have w * h used")
    if not math.isfinite(area) or not 0 <= area <= MAX_AREA:
        return (f"has 'area' {area!r}: it must be a finite number of pixels in [0, {MAX_AREA:g}] (COCO's evaluation "
                "would ignore the object); fix it, or leave 'area' out to have w * h used")
    return None


def check_ground_truth(data: Any, source: Any) -> None:
    """Check a COCO ground truth (``images``, ``annotations``, ``categories``) before COCO's evaluation reads it.

    What the evaluation needs of each record: integer ids, ``image_id`` and ``category_id`` that
    exist, a ``bbox`` of 4 finite numbers with ``w, h >= 0``, and an ``area`` (where given) that
    :func:`area_problem` accepts. Raises a ``ValueError`` naming ``source`` and the record. (A
    training data set is checked more strictly by :class:`CocoDetection`.)
    """
    def fail(what: str, index: int, record: Any, problem: str) -> ValueError:
        text = json.dumps(record)[:200] if isinstance(record, (dict, list)) else repr(record)
        return ValueError(f"{source}: {what}[{index}] {problem}: {text}")

    if not isinstance(data, dict):
        raise ValueError(f"{source}: a COCO ground truth is a JSON object with 'images', 'annotations' and "
                         f"'categories', got a {type(data).__name__}"
                         + (" (a results file of detections?)" if isinstance(data, list) else ""))
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{source}: needs a list '{key}' (a COCO ground truth has 'images', 'annotations' "
                             f"and 'categories'), got {type(data.get(key)).__name__ if key in data else 'none'}")
    ids = {}
    for what, key in (("images", "image"), ("categories", "category")):
        ids[key] = set()
        for i, rec in enumerate(data[what]):
            if not isinstance(rec, dict) or not _is_int(rec.get("id")):
                raise fail(what, i, rec, "needs an integer 'id'")
            ids[key].add(rec["id"])
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise fail("annotations", i, a, "is not an object")
        for key in ("image", "category"):
            if not _is_int(a.get(f"{key}_id")):
                raise fail("annotations", i, a, f"needs an integer '{key}_id'")
            if a[f"{key}_id"] not in ids[key]:
                raise fail("annotations", i, a, f"refers to unknown {key} id {a[f'{key}_id']}")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox) or min(bbox[2:]) < 0:
            raise fail("annotations", i, a, "needs 'bbox' [x, y, w, h]: 4 finite numbers, w and h >= 0")
        if "area" in a and area_problem(a["area"]):
            raise fail("annotations", i, a, area_problem(a["area"]))


def collate_fn(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection batches keep images of different sizes apart: ``(list of images, list of targets)``."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _box_in_image(bbox: list, area: float | None, width: int, height: int
                  ) -> tuple[list[float] | None, float, str]:
    """A COCO ``bbox`` ``[x, y, w, h]`` as ``[x1, y1, x2, y2]`` clipped to a ``width x height`` image.

    Returns ``(box, area, status)``: ``status`` is ``"kept"`` (``area`` is the given one, else
    ``w * h``), ``"clipped"`` (``area`` is the clipped box's), or the reason the box is skipped,
    ``"zero_or_negative_size"`` or ``"outside_image"`` (``box`` None).
    """
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, 0.0, "zero_or_negative_size"
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if (x1, y1, x2, y2) == (x, y, x + w, y + h):
        return [x1, y1, x2, y2], float(w * h if area is None else area), "kept"
    if x2 <= x1 or y2 <= y1:
        return None, 0.0, "outside_image"
    return [x1, y1, x2, y2], (x2 - x1) * (y2 - y1), "clipped"


def _target_tensors(rows: list[tuple[list[float], int, float, int]]) -> dict[str, Tensor]:
    """One image's kept annotations ``(box, label, area, iscrowd)`` as its target tensors:
    ``boxes`` (N, 4) float32, ``labels`` (N,) int64, ``area`` (N,) float32, ``iscrowd`` (N,) int64."""
    boxes, labels, areas, crowd = ([list(c) for c in zip(*rows)] if rows else ([], [], [], []))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "area": torch.tensor(areas, dtype=torch.float32),
        "iscrowd": torch.tensor(crowd, dtype=torch.int64),
    }


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection data set: an annotation JSON file and a folder of images.

    Args:
        root: folder the image records' ``file_name`` entries are relative to.
        ann_file: COCO JSON with ``images``, ``annotations`` and ``categories`` lists.
        transforms: callable ``(image, target) -> (image, target)`` (see ``data.transforms``).
        check_files: check at construction that every image file exists (one ``stat`` each).
        keep_crowd: keep crowd annotations as targets (default: dropped and counted, see above).

    Item ``i`` is ``(image, target)``: ``image`` float ``(3, H, W)`` in ``[0, 1]``; ``target`` has
    ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` in ``1..num_classes`` (0 is the
    background, torchvision's convention: a torchvision model needs ``num_classes + 1`` outputs),
    ``area`` float32 ``(N,)``, ``iscrowd`` int64 ``(N,)`` (all 0 unless ``keep_crowd``),
    ``image_id`` (int, the COCO id) and
    ``site`` (str) when the image record has one. Images without objects give ``boxes`` ``(0, 4)``.

    Category mapping: labels are the categories sorted by COCO id, numbered from 1.
    ``label_to_cat_id`` / ``cat_id_to_label`` map between them, ``class_names[label]`` names them
    (``class_names[0] == "__background__"``) and :meth:`category_ids` maps a label tensor.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        check_files: bool = True,
        keep_crowd: bool = False,
    ) -> None:
        if not isinstance(keep_crowd, bool):
            raise ValueError(f"keep_crowd must be a bool, got {keep_crowd!r}")
        self.keep_crowd = keep_crowd
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        if self.ann_file.is_dir():
            raise IsADirectoryError(f"annotation file {self.ann_file} is a folder: give the COCO JSON file")
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        data = read_json(self.ann_file)
        if not isinstance(data, dict):
            raise ValueError(f"{self.ann_file}: top level must be a JSON object, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.ann_file}: missing top-level key '{key}'")
            if not isinstance(data[key], list):
                raise ValueError(f"{self.ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")

        self._parse_categories(data["categories"])
        self._parse_images(data["images"], check_files)
        self._parse_annotations(data["annotations"])

    # -- construction ------------------------------------------------------------------------

    def _error(self, what: str, index: int, record: Any, problem: str) -> ValueError:
        text = json.dumps(record)[:200] if isinstance(record, (dict, list)) else repr(record)
        return ValueError(f"{self.ann_file}: {what}[{index}] {problem}: {text}")

    def _parse_categories(self, cats: list) -> None:
        ids: dict[int, str] = {}
        for i, c in enumerate(cats):
            if not isinstance(c, dict):
                raise self._error("categories", i, c, "is not an object")
            if not _is_int(c.get("id")):
                raise self._error("categories", i, c, "needs an integer 'id'")
            if not isinstance(c.get("name"), str):
                raise self._error("categories", i, c, "needs a string 'name'")
            if c["id"] in ids:
                raise self._error("categories", i, c, f"repeats category id {c['id']}")
            ids[c["id"]] = c["name"]
        if not ids:
            raise ValueError(f"{self.ann_file}: 'categories' is empty")
        self.label_to_cat_id: dict[int, int] = {k + 1: cid for k, cid in enumerate(sorted(ids))}
        self.cat_id_to_label: dict[int, int] = {cid: k for k, cid in self.label_to_cat_id.items()}
        self.class_names: list[str] = ["__background__"] + [ids[c] for c in sorted(ids)]
        self.num_classes: int = len(ids)
        self._cat_ids = torch.tensor([0] + sorted(ids), dtype=torch.int64)

    def _parse_images(self, images: list, check_files: bool) -> None:
        self.images: list[dict] = []
        self._index: dict[int, int] = {}
        for i, im in enumerate(images):
            if not isinstance(im, dict):
                raise self._error("images", i, im, "is not an object")
            if not _is_int(im.get("id")):
                raise self._error("images", i, im, "needs an integer 'id'")
            if not isinstance(im.get("file_name"), str) or not im["file_name"]:
                raise self._error("images", i, im, "needs a string 'file_name'")
            for key in ("width", "height"):
                if not _is_int(im.get(key)) or im[key] <= 0:
                    raise self._error("images", i, im, f"needs a positive integer '{key}'")
            if "site" in im and not isinstance(im["site"], str):
                raise self._error("images", i, im, "has a non-string 'site'")
            if im["id"] in self._index:
                raise self._error("images", i, im, f"repeats image id {im['id']}")
            if check_files:
                path = self.root / im["file_name"]
                if not path.is_file():
                    what = "a folder, not an image file" if path.is_dir() else "a missing file"
                    error = IsADirectoryError if path.is_dir() else FileNotFoundError
                    raise error(f"{self.ann_file}: images[{i}] (id {im['id']}) points at {what}: {path}")
            self._index[im["id"]] = len(self.images)
            self.images.append(im)

    def _check_annotation(self, i: int, a: Any, ann_ids: set[int]) -> None:
        """Raise a ``ValueError`` naming ``annotations[i]`` if it is malformed; record its id in ``ann_ids``."""
        if not isinstance(a, dict):
            raise self._error("annotations", i, a, "is not an object")
        if not _is_int(a.get("image_id")):
            raise self._error("annotations", i, a, "needs an integer 'image_id'")
        if a["image_id"] not in self._index:
            raise self._error("annotations", i, a, f"refers to unknown image id {a['image_id']}")
        if not _is_int(a.get("category_id")):
            raise self._error("annotations", i, a, "needs an integer 'category_id'")
        if a["category_id"] not in self.cat_id_to_label:
            raise self._error("annotations", i, a, f"refers to unknown category id {a['category_id']}")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
            raise self._error("annotations", i, a, "needs 'bbox' as a list of 4 finite numbers")
        iscrowd = a.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            raise self._error("annotations", i, a, "has 'iscrowd' other than 0 or 1")
        if "area" in a and area_problem(a["area"]):
            raise self._error("annotations", i, a, area_problem(a["area"]))
        if "id" in a:
            if not _is_int(a["id"]):
                raise self._error("annotations", i, a, "has a non-integer 'id'")
            if a["id"] in ann_ids:
                raise self._error("annotations", i, a, f"repeats annotation id {a['id']} "
                                  "(COCO evaluation needs unique ids: duplicates corrupt AP)")
            ann_ids.add(a["id"])

    def _parse_annotations(self, anns: list) -> None:
        rows: list[list[tuple[list[float], int, float, int]]] = [[] for _ in self.images]
        self.skipped: Counter = Counter()
        self.clipped = 0
        self.crowd = 0
        ann_ids: set[int] = set()
        for i, a in enumerate(anns):
            self._check_annotation(i, a, ann_ids)
            iscrowd = a.get("iscrowd", 0)
            if iscrowd == 1 and not self.keep_crowd:
                self.crowd += 1
                continue
            k = self._index[a["image_id"]]
            box, area, status = _box_in_image(a["bbox"], a.get("area"), self.images[k]["width"],
                                              self.images[k]["height"])
            if box is None:
                self.skipped[status] += 1
                continue
            if status == "clipped":
                self.clipped += 1
            rows[k].append((box, self.cat_id_to_label[a["category_id"]], area, int(iscrowd)))
        if self.clipped or self.skipped:
            logger.warning(
                "%s: clipped %d boxes to their image, skipped %s", self.ann_file, self.clipped, dict(self.skipped)
            )
        if self.crowd:
            logger.info("%s: %d crowd annotations (iscrowd=1) are not training targets", self.ann_file, self.crowd)
        self._targets = [_target_tensors(r) for r in rows]

    # -- access ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [im["id"] for im in self.images]

    def num_boxes(self) -> int:
        """Total number of (kept) boxes."""
        return sum(len(t["boxes"]) for t in self._targets)

    def category_ids(self, labels: Tensor) -> Tensor:
        """Map contiguous labels ``(N,)`` (1..num_classes) to COCO category ids ``(N,)``."""
        if labels.numel() and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"labels must be in 1..{self.num_classes}, got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return self._cat_ids.to(labels.device)[labels.long()]

    def target(self, index: int) -> dict:
        """The untransformed target of item ``index`` without loading the image."""
        im = self.images[index]
        t = {k: v.clone() for k, v in self._targets[index].items()}
        t["image_id"] = im["id"]
        if "site" in im:
            t["site"] = im["site"]
        return t

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        im = self.images[index]
        path = self.root / im["file_name"]
        if not path.is_file():
            what = "a folder, not an image file" if path.is_dir() else "a missing file"
            error = IsADirectoryError if path.is_dir() else FileNotFoundError
            raise error(f"{self.ann_file}: image id {im['id']} points at {what}: {path}")
        try:
            image = load_image(path)
        except ValueError as e:
            raise ValueError(f"{self.ann_file}: image id {im['id']}: {e}") from e
        if tuple(image.shape[-2:]) != (im["height"], im["width"]):
            raise ValueError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} (WxH) but its record "
                f"(id {im['id']}) in {self.ann_file} says {im['width']}x{im['height']}"
            )
        target = self.target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.ann_file}, images={len(self)}, boxes={self.num_boxes()}, "
            f"num_classes={self.num_classes})"
        )
