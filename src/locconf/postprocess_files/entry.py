"""The entry points: post-process one file (:func:`postprocess_file`), fuse several (:func:`fuse_files`), read one.

Each image's candidates go through :func:`locconf.postprocess.postprocess` (or, with several
inputs, :func:`locconf.fusion.fuse`) and are written at once (:mod:`.write`); with a ground truth,
the output and the inputs are scored (:mod:`.scoring`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from ..progress import progress_bar

from ..fusion import CONF_TYPES, WEIGHTS, fuse
from ..io import format_of, read_annotations
from ..postprocess import METHODS
from .method import _apply, _check_method, _check_signals, _empty_candidates, _load_calibration
from .scoring import _Scorer
from .source import _Source
from ..io.keys import Categories, ImageKeys
from .write import _record, _records, open_writer

logger = logging.getLogger(__name__)


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _score_input(scorer: _Scorer, name: str, image_id: int, cand: dict, max_detections: int,
                 score_threshold: float, class_agnostic: bool) -> None:
    """Score one input's candidates of an image: under plain NMS (row ``"{name} (nms)"``) and, above
    the score threshold, the correlation of their signals with the true IoU (``"{name} candidates"``)."""
    ref = _apply(cand, "nms", {}, max_detections, score_threshold, class_agnostic)
    scorer.add(f"{name} (nms)", image_id, _records(image_id, ref, cand["bbox"]))
    above = torch.nonzero(cand["scores"] >= score_threshold).flatten()
    scorer.correlate(f"{name} candidates", image_id, {k: v[above] for k, v in cand.items() if isinstance(v, Tensor)})


def _write_image(out: Any, scorer: Optional[_Scorer], row: str, image_id: int, records: list[dict],
                 det: dict) -> None:
    """Write one image's output records, and score them (row ``row``) where there is a ground truth."""
    for rec in records:
        out.write(rec)
    if scorer is not None:
        scorer.add(row, image_id, records)
        scorer.correlate(row, image_id, det)


def _result(images: int, records: int, out: Any, output: Path, scorer: Optional[_Scorer]) -> dict:
    result = {"images": images, "records": records, "detections": out.count, "output": str(output)}
    if scorer is not None:
        result.update(scorer.report())
    return result


def _mappings(gt: Any, gt_format: Optional[str], images: Any, pr_iou_threshold: float,
              pr_score_threshold: float) -> tuple[Optional[_Scorer], ImageKeys, Categories]:
    """The scorer (with a ground truth) and the run's one mapping of image keys and labels."""
    if gt is None:
        return None, ImageKeys(), Categories()
    scorer = _Scorer(gt, gt_format, images, pr_iou_threshold, pr_score_threshold)
    return scorer, scorer.keys, scorer.labels


def _writer(output: Path, out_format: Optional[str], sources: Sequence[_Source], keys: ImageKeys,
            categories: Categories, images: Any, extra: bool = True):
    """The output's writer, with the columns every input calls for."""
    image_ids = sorted(set().union(*(s.image_ids for s in sources)))
    extra_keys = list(dict.fromkeys(k for s in sources for k in s.extra_keys)) if extra else []
    return open_writer(output, out_format, keys, categories, image_ids,
                       quality=all(s.has_quality for s in sources), variance=all(s.has_variance for s in sources),
                       extra_keys=extra_keys, images=images, base=sources[0].path.parent)


def postprocess_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    method: str = "nms",
    params: Optional[Mapping[str, Any]] = None,
    max_detections: int = 100,
    score_threshold: float = 0.0,
    class_agnostic: bool = False,
    gt: str | os.PathLike | None = None,
    progress: bool = True,
    calibration: Any = None,
    *,
    format: Optional[str] = None,
    gt_format: Optional[str] = None,
    out_format: Optional[str] = None,
    images: Any = None,
    pr_iou_threshold: float = 0.4,
    pr_score_threshold: float = 0.1,
) -> dict:
    """Post-process a file of candidates into a file of detections.

    Args:
        input: candidates: COCO results (a JSON array or JSON Lines), CSV, GeoJSON, GeoPackage or
            shapefile (see :mod:`locconf.postprocess_files.source`).
        output: where the detections go, in the format of its extension (``.json``, ``.jsonl``,
            ``.csv``, ``.geojson``, ``.gpkg``, ``.shp``; :mod:`locconf.postprocess_files.write`).
        method: one of :data:`FILE_METHODS`. params: its keyword arguments (e.g. ``sigma``).
        max_detections: detections kept per image. score_threshold: candidates with a lower
            score are dropped before post-processing.
        class_agnostic: suppress across categories (each detection keeps its category).
        gt: the ground truth: a COCO instances JSON, a CSV or a vector file
            (:func:`locconf.io.read_annotations`). Image keys and labels of the input are mapped
            to its images and categories; the output (and the input under plain NMS) is scored
            with COCO metrics, DeepForest's box precision and recall and the correlation of each
            signal with the true IoU.
        progress: a tqdm progress bar over images.
        calibration: a :class:`locconf.evaluation.Calibration` or its JSON file (``locconf eval``
            writes one): each image's ``quality`` is calibrated before anything else, and the
            output records carry the calibrated quality.
        format, gt_format, out_format: the formats of the input, the ground truth and the output
            (:data:`locconf.io.FORMATS`), where their extensions do not tell them.
        images: image files and folders: the rasters of vector files in map coordinates (input,
            ground truth, and a vector output then written in map coordinates) and the images a
            CSV names (:mod:`locconf.io.keys`).
        pr_iou_threshold, pr_score_threshold: of the box precision and recall
            (:func:`locconf.evaluation.box_precision_recall`).

    Returns:
        ``{"images", "records", "detections"}`` counts, and with ``gt`` also ``"metrics"``
        (``{row: {metric: value}}``, ``box_precision`` and ``box_recall`` included),
        ``"precision_recall"`` (``{row: ...}``, per site and per image), ``"correlation"`` and
        ``"table"`` (markdown).
    """
    params = _check_method(method, params or {}, max_detections, score_threshold)
    output = Path(output)
    format_of(output, out_format, "out_format")
    scorer, keys, categories = _mappings(gt, gt_format, images, pr_iou_threshold, pr_score_threshold)
    src = _Source(input, keys, categories, format=format, images=images)
    if _same_file(src.path, output):
        raise ValueError(f"output {output} is the input file; write to another file")
    _check_signals(src, method)
    calibration = _load_calibration(calibration, [src])
    cats = scorer.categories if scorer else None
    moves_boxes = method in METHODS and METHODS[method].moves_boxes
    out_row = f"output ({method})"
    if scorer is not None:
        scorer.expect(["input (nms)", out_row], ["input candidates", out_row])
    with contextlib.closing(src), _writer(output, out_format, [src], keys, categories, images) as out:
        for image_id in progress_bar(src.image_ids, desc=f"postprocess {method}", unit="img", progress=progress):
            cand = src.candidates(image_id, cats)
            if calibration is not None:
                cand = calibration.apply(cand)
            det = _apply(cand, method, params, max_detections, score_threshold, class_agnostic)
            records = _records(image_id, det, None if moves_boxes else cand["bbox"], cand.get("extra"))
            _write_image(out, scorer, out_row, image_id, records, det)
            if scorer is not None:
                _score_input(scorer, "input", image_id, cand, max_detections, score_threshold, class_agnostic)
    return _result(len(src.image_ids), src.num_records, out, output, scorer)


def fuse_files(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    weight: str = "score",
    iou_threshold: float = 0.55,
    model_weights: Optional[Sequence[float]] = None,
    conf_type: str = "avg",
    method: str = "nms",
    params: Optional[Mapping[str, Any]] = None,
    max_detections: int = 100,
    score_threshold: float = 0.0,
    class_agnostic: bool = False,
    gt: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    format: Optional[str] = None,
    gt_format: Optional[str] = None,
    out_format: Optional[str] = None,
    images: Any = None,
    pr_iou_threshold: float = 0.4,
    pr_score_threshold: float = 0.1,
) -> dict:
    """Fuse the detections of several models (one file each, any format) with :func:`locconf.fusion.fuse`.

    Each file's candidates of an image are first thresholded and post-processed with ``method``
    (``"nms"`` by default: WBF fuses each model's detections; ``"none"`` fuses the raw candidates),
    then the files' detections of the image are fused (per category: ``class_agnostic`` applies to
    the per-file post-processing only) and capped at ``max_detections`` by fused score. Images are
    the union of the files' images.

    Args:
        inputs: two or more files (one suffices, for a file's own fusion). weight, iou_threshold,
            model_weights, conf_type: as :func:`locconf.fusion.fuse`. Other arguments as
            :func:`postprocess_file` (``format`` applies to every input); with ``gt``, each input
            is scored under plain NMS beside the fused output. A fused box merges several records:
            the fields locconf does not read (``segmentation``, ...) are not carried (a warning says
            which were dropped).

    Returns:
        As :func:`postprocess_file`.
    """
    params = _check_method(method, params or {}, max_detections, score_threshold)
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence) or not inputs:
        raise ValueError("inputs must be a non-empty list of files")
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
    fuse_args = dict(weight=weight, iou_threshold=iou_threshold, model_weights=model_weights, conf_type=conf_type)
    fuse([_empty_candidates()] * len(inputs), **fuse_args)  # checks the fusion's own arguments before reading anything
    output = Path(output)
    format_of(output, out_format, "out_format")
    scorer, keys, categories = _mappings(gt, gt_format, images, pr_iou_threshold, pr_score_threshold)
    sources = [_Source(p, keys, categories, format=format, images=images) for p in inputs]
    dropped = list(dict.fromkeys(k for s in sources for k in s.extra_keys))
    if dropped:
        logger.warning("fusion merges several records into one box: their fields %s are not carried into the "
                       "fused detections", dropped)
    with contextlib.ExitStack() as stack:
        for src in sources:
            stack.enter_context(contextlib.closing(src))
        out = _writer(output, out_format, sources, keys, categories, images, extra=False)
        return _fuse_sources(sources, output, out, weight, fuse_args, method, params, max_detections,
                             score_threshold, class_agnostic, scorer, progress)


def _check_sources(sources: Sequence[_Source], output: Path, method: str, weight: str) -> None:
    """Each input is not the output and carries the signals that ``method`` and ``weight`` read."""
    for src in sources:
        if _same_file(src.path, output):
            raise ValueError(f"output {output} is the input file {src.path}; write to another file")
        _check_signals(src, method)
        need = {"quality": src.has_quality, "variance": src.has_variance}.get(weight, True)
        if not need and src.num_records:
            raise ValueError(f"{src.path}: weight {weight!r} needs a {weight!r} in every record; record 0 has none")


def _fuse_sources(sources, output, writer, weight, fuse_args, method, params, max_detections, score_threshold,
                  class_agnostic, scorer, progress) -> dict:
    _check_sources(sources, output, method, weight)
    image_ids = sorted(set().union(*(s.image_ids for s in sources)))
    names = [str(s.path) for s in sources]
    names = [f"{n} [{k}]" if names.count(n) > 1 else n for k, n in enumerate(names)]  # one row per input
    cats = scorer.categories if scorer else None
    fused_row = f"fused ({weight})"
    if scorer is not None:
        scorer.expect([f"{n} (nms)" for n in names] + [fused_row], [f"{n} candidates" for n in names] + [fused_row])
    with writer as out:
        for image_id in progress_bar(image_ids, desc=f"fuse {weight}", unit="img", progress=progress):
            dets = []
            for name, src in zip(names, sources):
                cand = src.candidates(image_id, cats)
                det = _apply(cand, method, params, max_detections, score_threshold, class_agnostic)
                dets.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["category"],
                             **{k: det[k] for k in ("quality", "variances") if k in det}})
                if scorer is not None:
                    _score_input(scorer, name, image_id, cand, max_detections, score_threshold, class_agnostic)
            fused = fuse(dets, **fuse_args)
            fused = {k: v[:max_detections] for k, v in fused.items()}
            fused["category"] = fused.pop("labels")
            _write_image(out, scorer, fused_row, image_id, _records(image_id, fused), fused)
    return _result(len(image_ids), sum(s.num_records for s in sources), out, output, scorer)


def read_detections(path: str | os.PathLike, format: Optional[str] = None, *, images: Any = None,
                    gt: str | os.PathLike | None = None, gt_format: Optional[str] = None) -> list[dict]:
    """Every record of a file of detections (any format), checked, as COCO result records in image order.

    Image keys and labels are mapped to ids through ``gt`` when given (:mod:`locconf.io.keys`);
    records of an image named by a string carry it as ``image_path``, and every record keeps the
    fields locconf does not read. For small files and tests; large files are better streamed by
    :func:`postprocess_file`.
    """
    if gt is not None:
        data = read_annotations(gt, gt_format, images=images)
        keys, categories = ImageKeys(data["images"]), Categories(data["categories"])
    else:
        keys, categories = ImageKeys(), Categories()
    src = _Source(path, keys, categories, format=format, images=images)
    out = []
    with contextlib.closing(src):
        for image_id in src.image_ids:
            cand = src.candidates(image_id)
            extra = cand.get("extra") or [None] * len(cand["bbox"])
            name = keys.string_key(image_id)
            for i in range(len(cand["bbox"])):
                rec = _record(image_id, int(cand["category"][i]), cand["bbox"][i], float(cand["scores"][i]),
                              cand.get("quality"), cand.get("variances"), i, extra[i])
                if name is not None:
                    rec["image_path"] = name
                out.append(rec)
    return out
