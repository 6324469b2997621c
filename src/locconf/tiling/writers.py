"""Writing detections: DeepForest's CSV, COCO results, an overview image, and boxes in map units."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..boxes import check_boxes
from ..files import atomic_write
from .checks import _check_candidates, _check_int, _is_num


def map_boxes(boxes: Tensor, transform: Sequence[float]) -> Tensor:
    """Boxes (N, 4) in pixels -> (N, 4) ``(xmin, ymin, xmax, ymax)`` in map units (float64).

    ``transform`` is ``(a, b, c, d, e, f)``: ``X = a * col + b * row + c``, ``Y = d * col + e * row + f``.
    Each output box bounds the four mapped corners (exact for north-up rasters).
    """
    if len(transform) != 6 or not all(_is_num(v) for v in transform):
        raise ValueError(f"transform must be six numbers (a, b, c, d, e, f), got {transform!r}")
    a, b, c, d, e, f = (float(v) for v in transform)
    bx = check_boxes(boxes, "boxes").double()
    cols = bx[:, [0, 2, 0, 2]]
    rows = bx[:, [1, 1, 3, 3]]
    x, y = a * cols + b * rows + c, d * cols + e * rows + f
    return torch.stack([x.amin(1), y.amin(1), x.amax(1), y.amax(1)], dim=1)


def _label_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def write_csv(dets: Mapping[str, Tensor], path: str | os.PathLike, class_names: Optional[Sequence[str]] = None,
              transform: Optional[Sequence[float]] = None, crs: Optional[str] = None) -> Path:
    """Write detections as DeepForest's CSV: ``xmin, ymin, xmax, ymax, label, score`` (+ ``quality``).

    Pixel boxes; ``label`` is ``class_names[label]`` where given (else the label number). With a
    geotransform, the columns ``map_xmin, map_ymin, map_xmax, map_ymax`` (map units) and ``crs``
    follow. Written through a temporary file.
    """
    dets = _check_candidates(dets, "dets")
    boxes = dets["boxes"].double()
    header = ["xmin", "ymin", "xmax", "ymax", "label", "score"]
    quality = dets.get("quality")
    if quality is not None:
        header.append("quality")
    mapped = map_boxes(dets["boxes"], transform) if transform is not None else None
    if mapped is not None:
        header += ["map_xmin", "map_ymin", "map_xmax", "map_ymax", "crs"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, (box, label, score) in enumerate(zip(boxes.tolist(), dets["labels"].tolist(),
                                                        dets["scores"].tolist())):
                row = [f"{v:.2f}" for v in box] + [_label_name(label, class_names), f"{score:.5f}"]
                if quality is not None:
                    row.append(f"{float(quality[i]):.5f}")
                if mapped is not None:
                    row += [repr(v) for v in mapped[i].tolist()] + [crs or ""]
                w.writerow(row)

    return atomic_write(path, write)


def write_coco_results(dets: Mapping[str, Tensor], path: str | os.PathLike, image_id: int = 1,
                       label_to_cat_id: Optional[Mapping[int, int]] = None) -> Path:
    """Write detections as COCO results (a JSON array; ``bbox`` = ``[x, y, w, h]`` in pixels).

    Records carry ``quality`` / ``variance`` where predicted, so the file is also an input of
    ``locconf postprocess``. ``label_to_cat_id`` maps labels to category ids (default: the label).
    """
    dets = _check_candidates(dets, "dets")
    _check_int(image_id, "image_id", 0)
    boxes = dets["boxes"].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    quality, variances = dets.get("quality"), dets.get("variances")
    records = []
    for i, (box, label, score) in enumerate(zip(xywh, dets["labels"].tolist(), dets["scores"].tolist())):
        if label_to_cat_id is not None and label not in label_to_cat_id:
            raise ValueError(f"label {label} is not a key of label_to_cat_id")
        rec = {"image_id": image_id, "category_id": int(label_to_cat_id[label]) if label_to_cat_id else int(label),
               "bbox": box, "score": score}
        if quality is not None:
            rec["quality"] = float(quality[i])
        if variances is not None:
            rec["variance"] = variances[i].tolist()
        records.append(rec)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(records), encoding="utf-8"))


def draw_overview(raster: Any, dets: Mapping[str, Tensor], path: str | os.PathLike, max_side: int = 2000,
                  score_threshold: float = 0.3, class_names: Optional[Sequence[str]] = None,
                  label_threshold: float = 0.5, max_labels: int = 50) -> Path:
    """Draw the detections on the image, downscaled so that its longer side is at most ``max_side``.

    Readable at any density (:func:`locconf.evaluation.plots.draw_detections`): every box scoring at
    least ``score_threshold`` is outlined in its class's colour, text labels go only on boxes scoring
    at least ``label_threshold`` (at most ``max_labels``, never over one another), and a legend
    under the image names the colours and counts the boxes drawn and labelled.
    """
    from ..evaluation.plots import draw_detections

    _check_int(max_side, "max_side", 16)
    image, scale = raster.overview(max_side)
    shown = {k: v for k, v in dets.items() if k in ("scores", "labels", "quality")}
    shown["boxes"] = dets["boxes"] * scale
    return atomic_write(path, lambda tmp: draw_detections(image, shown, tmp, score_threshold=score_threshold,
                                                     class_names=class_names, label_threshold=label_threshold,
                                                     max_labels=max_labels))
