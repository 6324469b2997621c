"""Writing detections: CSV (DeepForest's columns with ``image_path``), COCO results and a COCO file of
several images, an overview image, boxes in map units, and a set of files written as one."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

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


#: The CSV columns locconf writes, in order (pixel coordinates); ``quality``, ``var_x1, var_y1, var_x2,
#: var_y2`` follow where predicted, and ``map_xmin, map_ymin, map_xmax, map_ymax, crs`` (map units) where
#: an image has a geotransform.
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label", "score")
_VAR_COLUMNS = ("var_x1", "var_y1", "var_x2", "var_y2")
_MAP_COLUMNS = ("map_xmin", "map_ymin", "map_xmax", "map_ymax", "crs")


def write_csv(dets: Mapping[str, Tensor], path: str | os.PathLike, class_names: Optional[Sequence[str]] = None,
              transform: Optional[Sequence[float]] = None, crs: Optional[str] = None,
              image_path: Optional[str] = None) -> Path:
    """Write one image's detections as CSV (:func:`write_csv_images` with one image).

    Without ``image_path`` the ``image_path`` column is left out (DeepForest's columns from ``xmin``).
    """
    return write_csv_images([{"image_path": image_path, "dets": dets, "transform": transform, "crs": crs}], path,
                            class_names, image_column=image_path is not None)


def write_csv_images(images: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                     class_names: Optional[Sequence[str]] = None, image_column: bool = True) -> Path:
    """Write the detections of several images as one CSV: :data:`CSV_COLUMNS` and the optional columns.

    Args:
        images: one dict per image, in the order the rows are written: ``image_path`` (the string
            written in that column), ``dets`` (``boxes`` in pixels, ``scores``, ``labels``,
            optional ``quality`` and ``variances``), optional ``transform`` / ``crs`` (GDAL's
            geotransform: the map columns are filled for that image's rows).
        class_names: ``label`` is ``class_names[label]`` (else the label number).
        image_column: write the ``image_path`` column.

    ``quality`` / ``var_*`` columns are written when every image with detections has them; map
    columns when some image has a transform (empty for the others). Boxes with 2 decimals,
    scores with 5, map coordinates in full. Written through a temporary file.
    """
    checked = [(im.get("image_path"), _check_candidates(im["dets"], f"images[{i}]['dets']"), im.get("transform"),
                im.get("crs")) for i, im in enumerate(images)]
    with_rows = [d for _, d, _, _ in checked if d["boxes"].shape[0]] or [d for _, d, _, _ in checked]
    has_q = bool(with_rows) and all("quality" in d for d in with_rows)
    has_v = bool(with_rows) and all("variances" in d for d in with_rows)
    has_map = any(t is not None for _, _, t, _ in checked)
    header = list(CSV_COLUMNS if image_column else CSV_COLUMNS[1:])
    header += (["quality"] if has_q else []) + (list(_VAR_COLUMNS) if has_v else [])
    header += list(_MAP_COLUMNS) if has_map else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for image_path, dets, transform, crs in checked:
                boxes = dets["boxes"].double().tolist()
                mapped = map_boxes(dets["boxes"], transform).tolist() if transform is not None else None
                quality = dets["quality"].tolist() if has_q else None
                variances = dets["variances"].tolist() if has_v else None
                for i, (box, label, score) in enumerate(zip(boxes, dets["labels"].tolist(), dets["scores"].tolist())):
                    row = [str(image_path)] if image_column else []
                    row += [f"{v:.2f}" for v in box] + [_label_name(label, class_names), f"{score:.5f}"]
                    if has_q:
                        row.append(f"{quality[i]:.5f}")
                    if has_v:
                        row += [f"{v:.6g}" for v in variances[i]]
                    if has_map:
                        row += [repr(v) for v in mapped[i]] + [crs or ""] if mapped is not None else [""] * 5
                    w.writerow(row)

    return atomic_write(path, write)


def coco_records(dets: Mapping[str, Tensor], image_id: int = 1,
                 label_to_cat_id: Optional[Mapping[int, int]] = None) -> list[dict]:
    """One image's detections as COCO result records: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``
    in pixels, ``score``, and ``quality`` / ``variance`` where predicted (:func:`write_coco_results`)."""
    dets = _check_candidates(dets, "dets")
    _check_int(image_id, "image_id", 0)
    boxes = dets["boxes"].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    quality = dets["quality"].tolist() if "quality" in dets else None
    variances = dets["variances"].tolist() if "variances" in dets else None
    records = []
    for i, (box, label, score) in enumerate(zip(xywh, dets["labels"].tolist(), dets["scores"].tolist())):
        if label_to_cat_id is not None and label not in label_to_cat_id:
            raise ValueError(f"label {label} is not a key of label_to_cat_id")
        rec = {"image_id": image_id, "category_id": int(label_to_cat_id[label]) if label_to_cat_id else int(label),
               "bbox": box, "score": score}
        if quality is not None:
            rec["quality"] = quality[i]
        if variances is not None:
            rec["variance"] = variances[i]
        records.append(rec)
    return records


def records_to_dets(records: Sequence[Mapping[str, Any]], cat_id_to_label: Optional[Mapping[int, int]] = None
                    ) -> dict[str, Tensor]:
    """The inverse of :func:`coco_records` (boxes float64): ``boxes``, ``scores``, ``labels`` and
    ``quality`` / ``variances`` where every record has them."""
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    to_label = cat_id_to_label or {}
    out = {"boxes": boxes, "scores": torch.tensor([float(r["score"]) for r in records], dtype=torch.float64),
           "labels": torch.tensor([int(to_label.get(r["category_id"], r["category_id"])) for r in records],
                                  dtype=torch.int64)}
    if records and all("quality" in r for r in records):
        out["quality"] = torch.tensor([float(r["quality"]) for r in records], dtype=torch.float64)
    if records and all("variance" in r for r in records):
        out["variances"] = torch.tensor([r["variance"] for r in records], dtype=torch.float64).reshape(-1, 4)
    return out


def write_coco_results(dets: Mapping[str, Tensor], path: str | os.PathLike, image_id: int = 1,
                       label_to_cat_id: Optional[Mapping[int, int]] = None) -> Path:
    """Write detections as COCO results (a JSON array; ``bbox`` = ``[x, y, w, h]`` in pixels).

    Records carry ``quality`` / ``variance`` where predicted, so the file is also an input of
    ``locconf postprocess``. ``label_to_cat_id`` maps labels to category ids (default: the label).
    """
    records = coco_records(dets, image_id, label_to_cat_id)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(records), encoding="utf-8"))


def write_coco_images(images: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                      path: str | os.PathLike, categories: Optional[Sequence[Mapping[str, Any]]] = None) -> Path:
    """Write the detections of several images as one COCO file: ``{"images", "categories", "annotations"}``.

    ``images``: ``{"id", "file_name", "width", "height"}`` each; ``records``: COCO result records
    (:func:`coco_records`), which become ``annotations`` numbered from 1 in order (each keeps
    ``score``, ``quality`` and ``variance``); ``categories``: ``{"id", "name"}`` each (default: the
    category ids found, named by their number). Written through a temporary file.
    """
    annotations = [dict(r, id=k + 1) for k, r in enumerate(records)]
    if categories is None:
        categories = [{"id": c, "name": str(c)} for c in sorted({int(r["category_id"]) for r in records})]
    data = {"images": [dict(im) for im in images], "categories": [dict(c) for c in categories],
            "annotations": annotations}
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data), encoding="utf-8"))


def write_together(writers: Mapping[str | os.PathLike, Callable[[Path], object]]) -> list[Path]:
    """Write several files as one set: each ``writers[path](staged)`` writes a staged file beside its
    path, and only when every one succeeded are they renamed over their paths with SIGINT and
    SIGTERM held back (:class:`locconf.files.OutputSet`), so an interruption leaves either the old
    set or the new one, never a mix. On an error every staged file is removed. Returns the paths.
    """
    from ..files import OutputSet

    paths = {str(i): Path(path) for i, path in enumerate(writers)}
    with OutputSet(paths) as files:
        for name, write in zip(paths, writers.values()):
            write(files.temp(name))
    return list(paths.values())


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
