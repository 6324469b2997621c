"""Synthetic detection scenes for tests and fast experiments.

A scene is a smooth-noise background with distractor blobs (clutter, drawn first) and objects of
``num_classes`` classes drawn on top of each other (later objects occlude earlier ones). Class ``c``
(1-based) has the shape ``SHAPES[(c - 1) % 3]``, its own mean colour and its own texture (stripe
period and noise level), and objects vary in scale (log-uniform in ``[min_size, max_size]``),
aspect ratio (``[0.5, 2]``) and colour. An object is placed only if every object keeps at least
``min_visible`` of its pixels visible, so every ground-truth object is clearly visible.

Ground truth is exact: the box of an object is the tight box of its *visible* pixels (pixel ``j``
covers ``[j, j + 1)``, so visible columns ``a..b`` give ``x1 = a, x2 = b + 1``).

Scene ``i`` of seed ``s`` depends only on ``(s, i)`` (its RNG is ``numpy.random.default_rng([s, i])``),
so it is the same whatever the access order, worker split or process.
"""

from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from ..progress import progress_bar

__all__ = ["SyntheticScenes", "write_synthetic_coco", "SHAPES"]

SHAPES = ("rectangle", "ellipse", "triangle")


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of ``grid`` ``(gh, gw, C)`` to ``(h, w, C)`` (corners aligned)."""
    gh, gw = grid.shape[:2]
    ys = np.linspace(0.0, gh - 1.0, h)
    xs = np.linspace(0.0, gw - 1.0, w)
    y0 = np.minimum(ys.astype(np.int64), gh - 2)
    x0 = np.minimum(xs.astype(np.int64), gw - 2)
    wy = (ys - y0)[:, None, None].astype(np.float32)
    wx = (xs - x0)[None, :, None].astype(np.float32)
    rows = grid[y0] * (1 - wy) + grid[y0 + 1] * wy  # (h, gw, C)
    return rows[:, x0] * (1 - wx) + rows[:, x0 + 1] * wx


def _shape_mask(shape: str, x0: float, y0: float, w: float, h: float, apex: float,
                ix0: int, iy0: int, ix1: int, iy1: int) -> np.ndarray:
    """Boolean mask over the pixel window ``[iy0, iy1) x [ix0, ix1)``; pixels tested at their centres."""
    xc = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
    yc = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
    if shape == "rectangle":
        return (xc >= x0) & (xc < x0 + w) & (yc >= y0) & (yc < y0 + h)
    if shape == "ellipse":
        return ((xc - (x0 + w / 2)) / (w / 2)) ** 2 + ((yc - (y0 + h / 2)) / (h / 2)) ** 2 <= 1.0
    # triangle: apex on the top edge, base along the bottom edge
    (ax, ay), (bx, by), (cx, cy) = (x0 + apex * w, y0), (x0, y0 + h), (x0 + w, y0 + h)
    d1 = (xc - bx) * (ay - by) - (ax - bx) * (yc - by)
    d2 = (xc - cx) * (by - cy) - (bx - cx) * (yc - cy)
    d3 = (xc - ax) * (cy - ay) - (cx - ax) * (yc - ay)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


class SyntheticScenes(torch.utils.data.Dataset):
    """Deterministic synthetic detection scenes with the output form of ``CocoDetection``.

    Args:
        num_images: length of the data set.
        image_size: ``(H, W)`` or one int for square images.
        num_classes: number of object classes; labels are ``1..num_classes``.
        min_objects, max_objects: objects per image, uniform in ``[min_objects, max_objects]``
            (fewer when no placement keeps every object ``min_visible``; ``0`` gives empty images).
        min_size, max_size: object scale ``sqrt(w * h)`` in pixels, log-uniform.
        seed: data set seed.
        transforms: callable ``(image, target) -> (image, target)``.
        clutter: maximum number of distractor blobs per image.
        min_visible: fraction of its own pixels that every object keeps visible.

    Item ``i``: image float32 ``(3, H, W)`` in ``[0, 1]``; target with ``boxes`` float32 ``(N, 4)``
    xyxy, ``labels`` int64 ``(N,)``, ``area`` float32 ``(N,)`` (box area), ``iscrowd`` int64
    ``(N,)`` zeros and ``image_id = i + 1`` (COCO ids start at 1).
    """

    def __init__(
        self,
        num_images: int,
        image_size: int | tuple[int, int] = 256,
        num_classes: int = 3,
        min_objects: int = 1,
        max_objects: int = 8,
        min_size: float = 16.0,
        max_size: float = 96.0,
        seed: int = 0,
        transforms: Callable | None = None,
        clutter: int = 4,
        min_visible: float = 0.5,
    ) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h < 8 or w < 8:
            raise ValueError(f"image_size must be at least 8x8, got {image_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= min_objects <= max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 4 <= min_size <= max_size:
            raise ValueError(f"need 4 <= min_size <= max_size, got {min_size}, {max_size}")
        if max_size > min(h, w):
            raise ValueError(f"max_size ({max_size}) must fit in the image ({h}x{w})")
        if not 0.0 < min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
        if seed < 0 or clutter < 0:
            raise ValueError(f"seed and clutter must be >= 0, got {seed}, {clutter}")
        self.num_images, self.image_size, self.num_classes = num_images, (h, w), num_classes
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_size, self.max_size = float(min_size), float(max_size)
        self.seed, self.transforms, self.clutter, self.min_visible = seed, transforms, clutter, min_visible
        self.class_names = ["__background__"] + [
            f"{SHAPES[(c - 1) % 3]}_{c}" for c in range(1, num_classes + 1)
        ]
        # class appearance: evenly spaced hues, per-class texture
        self._colors = np.array(
            [colorsys.hsv_to_rgb((c - 1) / num_classes, 0.75, 0.85) for c in range(1, num_classes + 1)],
            dtype=np.float32,
        )
        self._stripe_period = np.array([3 + 2 * ((c - 1) % 4) for c in range(1, num_classes + 1)], dtype=np.float32)
        self._noise_level = np.array([0.02 + 0.03 * ((c - 1) % 3) for c in range(1, num_classes + 1)], dtype=np.float32)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target = self.scene(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    # -- generation --------------------------------------------------------------------------

    def scene(self, index: int, return_masks: bool = False) -> tuple[Tensor, dict]:
        """Untransformed scene ``index`` (deterministic in ``(seed, index)``).

        With ``return_masks`` the target also has ``masks`` bool ``(N, H, W)``: the visible pixels
        of each object (their tight boxes are ``boxes``).
        """
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index = index % self.num_images
        rng = np.random.default_rng([self.seed, index])
        h, w = self.image_size
        img = self._background(rng, h, w)
        for _ in range(int(rng.integers(0, self.clutter + 1))):
            self._blob(rng, img)

        owner = np.zeros((h, w), dtype=np.int32)  # 0: background, k: object k - 1
        objects: list[tuple[int, tuple[int, int, int, int], int]] = []  # (label, window, area)
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            self._place(rng, img, owner, objects)

        boxes, labels = [], []
        for k, (label, (ix0, iy0, ix1, iy1), _) in enumerate(objects):
            vis = owner[iy0:iy1, ix0:ix1] == k + 1
            rows, cols = np.flatnonzero(vis.any(1)), np.flatnonzero(vis.any(0))
            boxes.append([ix0 + cols[0], iy0 + rows[0], ix0 + cols[-1] + 1, iy0 + rows[-1] + 1])
            labels.append(label)
        boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes_t,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "image_id": index + 1,
        }
        if return_masks:
            target["masks"] = torch.stack(
                [torch.from_numpy(owner == k + 1) for k in range(len(objects))]
            ) if objects else torch.zeros((0, h, w), dtype=torch.bool)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return image, target

    def _background(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        base = rng.uniform(0.25, 0.6, size=3).astype(np.float32)
        coarse = rng.normal(0.0, 0.12, size=(5, 5, 3)).astype(np.float32)
        fine = rng.normal(0.0, 0.05, size=(max(2, h // 12), max(2, w // 12), 1)).astype(np.float32)
        img = base + _upsample(coarse, h, w) + _upsample(fine, h, w)
        return np.clip(img, 0.0, 1.0)

    def _blob(self, rng: np.random.Generator, img: np.ndarray) -> None:
        """An irregular distractor: thresholded smooth noise inside an ellipse, random colour."""
        h, w = img.shape[:2]
        size = int(rng.uniform(self.min_size, self.max_size))
        size = min(size, h, w)
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        noise = _upsample(rng.normal(size=(4, 4, 1)).astype(np.float32), size, size)[..., 0]
        r = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
        falloff = 1.0 - (r[:, None] ** 2 + r[None, :] ** 2)
        mask = noise * 0.5 + falloff > 0.5
        color = rng.uniform(0.1, 0.9, size=3).astype(np.float32) * 0.6 + img[y0, x0] * 0.4
        img[y0:y0 + size, x0:x0 + size][mask] = color

    def _place(self, rng: np.random.Generator, img: np.ndarray, owner: np.ndarray, objects: list) -> None:
        """Try a few placements of one new object; keep the first that hides no object too much."""
        h, w = img.shape[:2]
        label = int(rng.integers(1, self.num_classes + 1))
        shape = SHAPES[(label - 1) % 3]
        areas = np.array([0] + [o[2] for o in objects], dtype=np.int64)
        visible = np.bincount(owner.ravel(), minlength=len(objects) + 1)
        for _ in range(10):
            s = float(np.exp(rng.uniform(np.log(self.min_size), np.log(self.max_size))))
            ar = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            bw, bh = min(s * ar**0.5, w), min(s / ar**0.5, h)
            x0, y0 = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            apex = float(rng.uniform(0.0, 1.0))
            ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
            ix1, iy1 = min(int(np.ceil(x0 + bw)), w), min(int(np.ceil(y0 + bh)), h)
            mask = _shape_mask(shape, x0, y0, bw, bh, apex, ix0, iy0, ix1, iy1)
            area = int(mask.sum())
            if area < 4:
                continue
            covered = np.bincount(owner[iy0:iy1, ix0:ix1][mask], minlength=len(objects) + 1)
            if np.all((visible - covered)[1:] >= self.min_visible * areas[1:]):
                break
        else:
            return
        color = self._colors[label - 1] + rng.uniform(-0.08, 0.08, size=3).astype(np.float32)
        period = self._stripe_period[label - 1]
        yy, xx = np.nonzero(mask)
        phase = (xx + yy) if label % 2 else (xx - yy)
        stripes = 0.06 * np.sin(2 * np.pi * phase / period)[:, None]
        noise = rng.normal(0.0, self._noise_level[label - 1], size=(len(yy), 1))
        pixels = np.clip(color + stripes + noise, 0.0, 1.0).astype(np.float32)
        img[iy0 + yy, ix0 + xx] = pixels
        owner[iy0 + yy, ix0 + xx] = len(objects) + 1
        objects.append((label, (ix0, iy0, ix1, iy1), area))


def write_synthetic_coco(
    dataset: SyntheticScenes,
    out_dir: str | os.PathLike,
    split: str = "train",
    progress: bool = True,
) -> Path:
    """Write ``dataset``'s (untransformed) scenes as ``out_dir/<split>/*.png`` + ``out_dir/<split>.json``.

    The JSON is standard COCO (``bbox = [x, y, w, h]``, ids from 1, category ids ``1..num_classes``
    equal to the labels); read it back with ``CocoDetection(out_dir, out_dir / f"{split}.json")``.
    Returns the path of the JSON file.
    """
    if not split or "/" in split or "\\" in split:
        raise ValueError(f"split must be a plain name, got {split!r}")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in progress_bar(range(len(dataset)), desc=f"synthetic {split}", progress=progress):
        image, target = dataset.scene(i)
        name = f"{split}/{i:06d}.png"
        arr = (image.permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(out_dir / name, compress_level=1)
        images.append({"id": target["image_id"], "file_name": name, "height": arr.shape[0], "width": arr.shape[1]})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": target["image_id"],
                "category_id": label,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"locconf synthetic scenes, seed {dataset.seed}, split {split}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": dataset.class_names[c]} for c in range(1, dataset.num_classes + 1)],
    }
    path = out_dir / f"{split}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    return path
