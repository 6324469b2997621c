"""Detections in files: reading CSV / vector files as COCO result records, and writing one image's detections.

:func:`detection_records` is what the file tools (:mod:`locconf.postprocess_files`) read a CSV or a
vector file of candidates through; COCO results files they read themselves (streamed).
:func:`write_detections` writes one image's detections in any format (``locconf predict``'s GIS
output: pixel boxes become polygons in map coordinates when the image is georeferenced).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..files import atomic_write
from .csvfile import COLUMNS, SIGNAL_COLUMNS, format_number, read_csv
from .formats import VECTOR_FORMATS, format_of
from .keys import Categories, ImageFinder, ImageKeys

__all__ = ["detection_records", "write_detections"]


def detection_records(path: str | os.PathLike, fmt: str, keys: ImageKeys, categories: Categories,
                      images: Optional[Iterable[str | os.PathLike]] = None,
                      default_label: str = "Tree") -> list[tuple[int, dict]]:
    """The ``(line or feature index, COCO result record)`` of every box of a CSV or vector file of detections.

    Image keys and labels go through the run's ``keys`` and ``categories``
    (:mod:`locconf.io.keys`); records keep the file's other columns / fields.
    """
    from .rows import result_records

    path = Path(path)
    if fmt == "csv":
        rows = read_csv(path, need_score=True, default_label=default_label)
    elif fmt in VECTOR_FORMATS:
        from .vector import read_vector_rows

        rows, _ = read_vector_rows(path, True, ImageFinder(images, base=path.parent), default_label)
    else:
        raise ValueError(f"{path}: format {fmt!r} is not a CSV or vector format")
    return result_records(rows, keys, categories)


def _array(v: Any, name: str, rows: Optional[int], cols: Optional[int] = None) -> np.ndarray:
    """``detections[name]`` as float64, checked: ``(rows,)`` or ``(rows, cols)`` (``rows`` None: any), finite."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
    a = np.asarray(v, dtype=np.float64)
    want = (rows,) if cols is None else (rows, cols)
    if a.ndim != len(want) or any(w is not None and s != w for s, w in zip(a.shape, want)):
        raise ValueError(f"detections[{name!r}] must have shape {tuple('N' if w is None else w for w in want)}"
                         f"{'' if rows is None else f' with N = {rows}'}, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"detections[{name!r}] must be finite (no NaN or inf)")
    return a


def _check(detections: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(detections, Mapping):
        raise ValueError(f"detections must be a dict of boxes, scores, labels (...), got {type(detections).__name__}")
    for key in ("boxes", "scores", "labels"):
        if key not in detections:
            raise ValueError(f"detections needs {key!r} (and has {sorted(detections)})")
    boxes = _array(detections["boxes"], "boxes", None, 4)
    n = boxes.shape[0]
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError("detections['boxes'] must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
    out = {"boxes": boxes, "scores": _array(detections["scores"], "scores", n),
           "labels": _array(detections["labels"], "labels", n)}
    if (out["labels"] != np.round(out["labels"])).any():
        raise ValueError("detections['labels'] must be integers")
    out["labels"] = out["labels"].astype(np.int64)
    if detections.get("quality") is not None:
        out["quality"] = _array(detections["quality"], "quality", n)
    if detections.get("variances") is not None:
        out["variances"] = _array(detections["variances"], "variances", n, 4)
    return out


def _labels(labels: np.ndarray, class_names: Optional[Sequence[str]]) -> list:
    if class_names is None:
        return labels.tolist()
    names = list(class_names)
    bad = [int(v) for v in labels if not 0 <= v < len(names)]
    if bad:
        raise ValueError(f"label {bad[0]} has no name in class_names (of length {len(names)}; class_names[label] names "
                         "label, class_names[0] being the background)")
    return [str(names[int(v)]) for v in labels]


def write_detections(path: str | os.PathLike, detections: Mapping[str, Any], *, image_path: Optional[str] = None,
                     transform: Optional[Sequence[float]] = None, crs: Any = None,
                     class_names: Optional[Sequence[str]] = None, format: Optional[str] = None,
                     image_id: Optional[int] = None, label_to_cat_id: Optional[Mapping[int, int]] = None) -> Path:
    """Write one image's detections as CSV, COCO results (JSON array / JSON Lines), GeoJSON, GeoPackage or shapefile.

    Args:
        path: the output file; its extension gives the format unless ``format`` names it
            (:data:`locconf.io.FORMATS`).
        detections: ``boxes`` (N, 4) ``x1, y1, x2, y2`` in the image's pixels, ``scores`` (N,),
            ``labels`` (N,) (1..K), optional ``quality`` (N,) and ``variances`` (N, 4): tensors or
            arrays (a :class:`locconf.candidates.Candidates` dict).
        image_path: the image's path or name: CSV column ``image_path``, vector field
            ``image_path``, COCO key ``image_path`` (omitted when None).
        transform: the image's geotransform ``(a, b, c, d, e, f)`` (a rasterio ``Affine`` too):
            vector formats then hold polygons in map coordinates (the four corners of each box
            mapped, :func:`locconf.io.geo.box_polygons`); without it, polygons in pixels. CSV and
            COCO are always in pixels.
        crs: the CRS of the map coordinates (rasterio ``CRS``, WKT or ``"EPSG:n"``), recorded in
            vector files.
        class_names: ``class_names[label]`` is written as the label (CSV, vector; ``class_names[0]``
            is the background, as ``CocoDetection.class_names``); default: the label number.
        image_id: the COCO ``image_id`` (default 1). label_to_cat_id: COCO ``category_id`` of each
            label (default: the label).

    Returns:
        ``path``. The file is written through a temporary file (folder, for a shapefile's side
        files) renamed only on success; the CSV has the columns :data:`locconf.io.csvfile.COLUMNS`
        (+ ``quality``, ``var_x1 .. var_y2`` where given), numbers in full.
    """
    fmt = format_of(path, format)
    dets = _check(detections)
    if transform is not None:
        transform = tuple(transform)[:6]
    if fmt in ("json", "jsonl"):
        return _write_coco(Path(path), fmt, dets, image_path, image_id, label_to_cat_id)
    labels = _labels(dets["labels"], class_names)
    if fmt == "csv":
        return _write_csv(Path(path), dets, image_path, labels)
    from .geo import box_polygons, write_vector

    n = dets["boxes"].shape[0]
    fields: dict[str, np.ndarray] = {}
    if image_path is not None:
        fields["image_path"] = np.array([str(image_path)] * n, dtype=object)
    fields["label"] = np.array(labels, dtype=object) if class_names is not None else np.asarray(labels, dtype=np.int64)
    fields["score"] = dets["scores"]
    if "quality" in dets:
        fields["quality"] = dets["quality"]
    if "variances" in dets:
        for k, name in enumerate(SIGNAL_COLUMNS[1:]):
            fields[name] = dets["variances"][:, k].copy()
    return write_vector(path, fmt, box_polygons(dets["boxes"], transform), fields, crs)


def _write_coco(path: Path, fmt: str, dets: dict, image_path: Optional[str], image_id: Optional[int],
                label_to_cat_id: Optional[Mapping[int, int]]) -> Path:
    if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, int)):
        raise ValueError(f"image_id must be an integer, got {image_id!r}")
    b = dets["boxes"]
    records = []
    for i in range(b.shape[0]):
        label = int(dets["labels"][i])
        if label_to_cat_id is not None and label not in label_to_cat_id:
            raise ValueError(f"label {label} is not a key of label_to_cat_id")
        rec = {"image_id": 1 if image_id is None else image_id,
               "category_id": int(label_to_cat_id[label]) if label_to_cat_id is not None else label,
               "bbox": [float(b[i, 0]), float(b[i, 1]), float(b[i, 2] - b[i, 0]), float(b[i, 3] - b[i, 1])],
               "score": float(dets["scores"][i])}
        if "quality" in dets:
            rec["quality"] = float(dets["quality"][i])
        if "variances" in dets:
            rec["variance"] = dets["variances"][i].tolist()
        if image_path is not None:
            rec["image_path"] = str(image_path)
        records.append(rec)
    if fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        text = "[" + ",\n".join(json.dumps(r) for r in records) + "]\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_csv(path: Path, dets: dict, image_path: Optional[str], labels: list) -> Path:
    import csv

    header = [c for c in COLUMNS if c != "image_path" or image_path is not None]
    header += [c for c in SIGNAL_COLUMNS if (c == "quality" and "quality" in dets) or (c != "quality" and "variances" in dets)]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(dets["boxes"].shape[0]):
                row = [str(image_path)] if image_path is not None else []
                row += [format_number(v) for v in dets["boxes"][i]] + [labels[i], format_number(dets["scores"][i])]
                if "quality" in dets:
                    row.append(format_number(dets["quality"][i]))
                if "variances" in dets:
                    row += [format_number(v) for v in dets["variances"][i]]
                w.writerow(row)

    return atomic_write(path, write)
