"""Post-process (or fuse) any detector's candidates from files: what ``locconf postprocess`` runs.

Input: COCO results, the format MMDetection, detectron2 and ultralytics export, one record per
candidate box::

    {"image_id": 42, "category_id": 3, "bbox": [x, y, w, h], "score": 0.83,
     "quality": 0.71,                       # optional: predicted IoU
     "variance": [vx1, vy1, vx2, vy2]}      # optional: predicted sigma^2 of x1, y1, x2, y2 (pixels^2)

either as one JSON array (loaded whole: its size bounds the memory) or as JSON Lines, one record
per line (streamed). The format is told by the first non-blank character (``[`` or ``{``), not by
the file name. Within a file, every record carries ``quality`` (and ``variance``) or none does.

JSON Lines files are grouped by image with an external two-pass grouping, so records may come in
any order: a first pass parses each line for its ``image_id`` and keeps, per run of consecutive
records of one image, only the run's byte offset, first record index and length (three integers);
the second pass sorts the runs by image id and reads each image's records back by seeking to its
runs. A file whose records are grouped by image (as detectors write them) has one run per image,
so memory is bounded by the number of images plus one image's records, whatever the number of
records; a file in random order needs one run per record (24 bytes each).

Each image's candidates go through :func:`locconf.postprocess.postprocess` (or, with several
inputs, :func:`locconf.fusion.fuse`) and are written at once, images by increasing id, detections
by decreasing score, as a JSON array (or JSON Lines when the output name ends in ``.jsonl`` /
``.ndjson``). Output records keep the kept candidate's ``quality`` / ``variance``; their ``bbox``
is the input's unchanged unless the method moves boxes (variance voting, fusion).

Errors: a bad record (not an object, a missing key, a wrong type, a negative width or height, NaN
or inf, a non-positive variance, an image or category id that the ground truth lacks) raises a
``ValueError`` naming the file, the record's index (0-based, in file order; JSON Lines also give
the line) and the key. The output is written to a temporary file in the output's folder and renamed
only once everything succeeded; on any error the temporary file is deleted and an existing output
is left untouched.

Scoring (``gt``): the output, and for comparison each input under plain NMS, are scored with the
COCO API of faster-coco-eval (:mod:`locconf.evaluation.coco`: AP, AP50, AP75, AP90, APs/m/l,
AR100) on every image of the ground truth, as COCO's own evaluation does (an image without records
counts its objects as missed). The Pearson / Spearman correlation of each confidence signal with the
true IoU of the matched boxes (IoU > 0.5; :func:`locconf.evaluation.confidence_correlation`) is
reported for the input candidates and for the output.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .evaluation.coco import coco_metrics, format_table, load_coco
from .evaluation.correlation import confidence_correlation
from .evaluation.matching import match_to_ground_truth
from .fusion import CONF_TYPES, WEIGHTS, fuse
from .postprocess import METHODS, postprocess

__all__ = ["postprocess_file", "fuse_files", "read_detections", "FILE_METHODS"]

#: Methods accepted on files: those of :func:`locconf.postprocess.postprocess`, and ``"none"``
#: (keep every candidate; only the score threshold and the per-image cap apply).
FILE_METHODS = ("none",) + tuple(METHODS)

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


# --------------------------------------------------------------------------------------------
# Reading: one source file, its records grouped by image
# --------------------------------------------------------------------------------------------


_INT64 = 2**63


def _is_int(v: Any) -> bool:
    """An integer that fits in int64 (bools are not integers here)."""
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64


def _is_num(v: Any) -> bool:
    """A JSON number that float64 holds (an integer beyond ~1.8e308 is not)."""
    if isinstance(v, float):
        return True
    if not isinstance(v, int) or isinstance(v, bool):
        return False
    try:
        float(v)
    except OverflowError:
        return False
    return True


class _Where:
    """Formats "file: record i (line l)" only when an error message needs it."""

    __slots__ = ("src", "index", "line")

    def __init__(self, src: "_Source", index: int, line: Optional[int]):
        self.src, self.index, self.line = src, index, line

    def __format__(self, spec: str) -> str:
        return self.src._where(self.index, self.line)


class _Source:
    """One candidates file, indexed by image (the first pass); :meth:`records` reads one image back.

    Attributes:
        image_ids: sorted image ids. num_records: records in the file.
        has_quality, has_variance: whether the file's first record carries them.
    """

    def __init__(self, path: str | os.PathLike, known_images: Optional[set] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such file")
        self.known_images = known_images
        self._file = None
        self.has_quality = self.has_variance = False
        with open(self.path, "rb") as f:
            first = b""
            while not first:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                first = chunk.lstrip()[:1]
        if first == b"[":
            self.jsonl = False
            self._index_array()
        elif first in (b"{", b""):
            self.jsonl = True
            self._index_lines()
        else:
            raise ValueError(f"{self.path}: neither a JSON array nor JSON Lines of objects "
                             f"(starts with {first.decode(errors='replace')!r})")

    def _where(self, index: int, line: Optional[int] = None) -> str:
        return f"{self.path}: record {index}" + (f" (line {line})" if line is not None else "")

    def _first_record(self, rec: dict) -> None:
        self.has_quality, self.has_variance = "quality" in rec, "variance" in rec

    def _image_id(self, rec: Any, index: int, line: Optional[int] = None) -> int:
        if not isinstance(rec, dict):
            raise ValueError(f"{self._where(index, line)}: must be a JSON object, got {type(rec).__name__}")
        if "image_id" not in rec:
            raise ValueError(f"{self._where(index, line)}: missing key 'image_id'")
        image_id = rec["image_id"]
        if not _is_int(image_id):
            raise ValueError(f"{self._where(index, line)}: 'image_id' must be a 64-bit integer, got {image_id!r}")
        if self.known_images is not None and image_id not in self.known_images:
            raise ValueError(f"{self._where(index, line)}: 'image_id' {image_id} is not an image of the ground truth")
        if index == 0:
            self._first_record(rec)
        return image_id

    # -- JSON array: loaded whole -------------------------------------------------------------

    def _index_array(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: a JSON file must hold a list of records, got {type(data).__name__}")
        self._data = data
        groups: dict[int, list[int]] = {}
        for i, rec in enumerate(data):
            groups.setdefault(self._image_id(rec, i), []).append(i)
        self._groups = groups
        self.image_ids = sorted(groups)
        self.num_records = len(data)

    # -- JSON Lines: two passes ----------------------------------------------------------------

    def _lines(self, f) -> Iterator[tuple[int, bytes]]:
        """(offset, line) of every line from the current position."""
        while True:
            offset = f.tell()
            line = f.readline()
            if not line:
                return
            yield offset, line

    def _loads(self, line: bytes, index: int, line_no: int) -> Any:
        try:
            return json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self._where(index, line_no)}: not valid JSON ({e})") from None

    def _index_lines(self) -> None:
        ids, offsets, firsts, lines, counts = (array("q") for _ in range(5))
        index = 0
        with open(self.path, "rb") as f:
            for line_no, (offset, line) in enumerate(self._lines(f), start=1):
                if not line.strip():
                    continue
                image_id = self._image_id(self._loads(line, index, line_no), index, line_no)
                if counts and ids[-1] == image_id:
                    counts[-1] += 1
                else:
                    for arr, v in zip((ids, offsets, firsts, lines, counts), (image_id, offset, index, line_no, 1)):
                        arr.append(v)
                index += 1
        self.num_records = index
        ids_np = np.frombuffer(ids, dtype=np.int64) if len(ids) else np.zeros(0, np.int64)
        order = np.argsort(ids_np, kind="stable")
        self._runs = [np.frombuffer(a, dtype=np.int64)[order] if len(a) else np.zeros(0, np.int64)
                      for a in (offsets, firsts, lines, counts)]
        sorted_ids = ids_np[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if sorted_ids.size else sorted_ids
        self.image_ids = sorted_ids[starts].tolist()
        self._run_bounds = dict(zip(self.image_ids, zip(starts.tolist(), np.r_[starts[1:], sorted_ids.size].tolist())))

    def records(self, image_id: int) -> list[tuple[int, Optional[int], dict]]:
        """``(index, line or None, record)`` of every record of ``image_id``, in file order (none: [])."""
        if not self.jsonl:
            return [(i, None, self._data[i]) for i in self._groups.get(image_id, ())]
        if image_id not in self._run_bounds:
            return []
        if self._file is None:
            self._file = open(self.path, "rb")
        lo, hi = self._run_bounds[image_id]
        out = []
        for offset, index, line_no, count in zip(*(a[lo:hi].tolist() for a in self._runs)):
            self._file.seek(offset)
            while count:
                line = self._file.readline()
                if line.strip():
                    out.append((index, line_no, self._loads(line, index, line_no)))
                    index += 1
                    count -= 1
                line_no += 1
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- One image's candidates ----------------------------------------------------------------

    def candidates(self, image_id: int, known_categories: Optional[set] = None) -> dict:
        """One image's records as checked candidate tensors (float64 boxes xyxy, int64 categories).

        The fields of :class:`locconf.candidates.Candidates` (``boxes`` (N, 4), ``scores`` (N,),
        ``quality`` (N,) / ``variances`` (N, 4) when the file has them) with ``category`` (N,), the
        COCO category ids, in place of ``labels``; and ``bbox``: the records' ``bbox`` lists.
        """
        recs = self.records(image_id)
        n = len(recs)
        boxes, scores, cats, quality, variances = [], [], [], [], []
        for index, line, rec in recs:
            for key in ("category_id", "bbox", "score"):
                if key not in rec:
                    raise ValueError(f"{self._where(index, line)}: missing key {key!r}")
            w = _Where(self, index, line)
            cat, bbox, score = rec["category_id"], rec["bbox"], rec["score"]
            if not _is_int(cat):
                raise ValueError(f"{w}: 'category_id' must be a 64-bit integer, got {cat!r}")
            if known_categories is not None and cat not in known_categories:
                raise ValueError(f"{w}: 'category_id' {cat} is not a category of the ground truth")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
                raise ValueError(f"{w}: 'bbox' must be a list of 4 numbers [x, y, w, h], got {bbox!r:.200}")
            if not _is_num(score):
                raise ValueError(f"{w}: 'score' must be a number, got {score!r}")
            for key, has, out in (("quality", self.has_quality, quality), ("variance", self.has_variance, variances)):
                if (key in rec) != has:
                    first = "has" if has else "has no"
                    raise ValueError(f"{w}: {'missing' if has else 'unexpected'} key {key!r}: the file's first "
                                     f"record {first} {key!r}, and a file's records must all carry it or none")
                if not has:
                    continue
                v = rec[key]
                if key == "quality" and not _is_num(v):
                    raise ValueError(f"{w}: 'quality' must be a number, got {v!r}")
                if key == "variance" and (not isinstance(v, list) or len(v) != 4 or not all(_is_num(x) for x in v)):
                    raise ValueError(f"{w}: 'variance' must be a list of 4 numbers (x1, y1, x2, y2), got {v!r:.200}")
                out.append(v)
            boxes.append(bbox)
            scores.append(score)
            cats.append(cat)
        f64 = torch.float64
        xywh = torch.tensor(boxes, dtype=f64).reshape(n, 4)
        cand = {"scores": torch.tensor(scores, dtype=f64).reshape(n),
                "category": torch.tensor(cats, dtype=torch.int64).reshape(n)}
        bad = {"bbox": ~torch.isfinite(xywh).all(1), "score": ~torch.isfinite(cand["scores"])}
        size_bad = (xywh[:, 2:] < 0).any(1)
        if self.has_quality:
            cand["quality"] = torch.tensor(quality, dtype=f64).reshape(n)
            bad["quality"] = ~torch.isfinite(cand["quality"])
        if self.has_variance:
            cand["variances"] = torch.tensor(variances, dtype=f64).reshape(n, 4)
            bad["variance"] = ~(torch.isfinite(cand["variances"]) & (cand["variances"] > 0)).all(1)
        for key, mask in bad.items():
            if bool(mask.any()):
                i = int(mask.nonzero()[0])
                what = "finite and positive" if key == "variance" else "finite (no NaN or inf)"
                raise ValueError(f"{self._where(*recs[i][:2])}: {key!r} must be {what}")
        if bool(size_bad.any()):
            i = int(size_bad.nonzero()[0])
            raise ValueError(f"{self._where(*recs[i][:2])}: 'bbox' has a negative width or height: {boxes[i]}")
        cand["boxes"] = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        cand["bbox"] = boxes
        return cand


def read_detections(path: str | os.PathLike) -> list[dict]:
    """Every record of a COCO results file (JSON array or JSON Lines), checked, in image order.

    For small files and tests; large files are better streamed by :func:`postprocess_file`.
    """
    src = _Source(path)
    out = []
    with contextlib.closing(src):
        for image_id in src.image_ids:
            cand = src.candidates(image_id)
            for i in range(len(cand["bbox"])):
                out.append(_record(image_id, int(cand["category"][i]), cand["bbox"][i], float(cand["scores"][i]),
                                   cand.get("quality"), cand.get("variances"), i))
    return out


# --------------------------------------------------------------------------------------------
# Writing: a stream into a temporary file, renamed at the end
# --------------------------------------------------------------------------------------------


class _AtomicWriter:
    """Write records as a JSON array (or JSON Lines) to a temporary file; rename on success only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.jsonl = self.path.suffix.lower() in _JSONL_SUFFIXES
        self.count = 0

    def __enter__(self) -> "_AtomicWriter":
        folder = self.path.parent
        if not folder.is_dir():
            raise ValueError(f"output folder {folder} does not exist")
        # A fresh name opened exclusively (not mkstemp, whose 0600 mode the renamed output would keep).
        self._tmp = folder / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        self._f = open(self._tmp, "x", encoding="utf-8")
        if not self.jsonl:
            self._f.write("[")
        return self

    def write(self, record: dict) -> None:
        text = json.dumps(record, allow_nan=False)
        if self.jsonl:
            self._f.write(text + "\n")
        else:
            self._f.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.jsonl:
                self._f.write("\n]\n" if self.count else "]\n")
            self._f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def _record(image_id: int, category_id: int, bbox: list, score: float, quality: Optional[Tensor],
            variances: Optional[Tensor], i: int) -> dict:
    rec = {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
    if quality is not None:
        rec["quality"] = float(quality[i])
    if variances is not None:
        rec["variance"] = variances[i].tolist()
    return rec


def _records(image_id: int, det: dict, bbox: Optional[list] = None) -> list[dict]:
    """COCO result records of one image's detections (``bbox``: the input lists, where unchanged)."""
    n = det["scores"].shape[0]
    if n == 0:
        return []
    if bbox is None:
        b = det["boxes"].to(torch.float64)
        boxes = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
    else:
        boxes = [bbox[r] for r in det["row"].tolist()]
    scores, cats = det["scores"].tolist(), det["category"].tolist()
    q, v = det.get("quality"), det.get("variances")
    return [_record(image_id, cats[i], boxes[i], scores[i], q, v, i) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Post-processing one image
# --------------------------------------------------------------------------------------------


def _check_method(method: str, params: Mapping, max_detections: int, score_threshold: float) -> dict:
    if method not in FILE_METHODS:
        raise ValueError(f"method must be one of {', '.join(FILE_METHODS)}; got {method!r}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of keyword arguments, got {type(params).__name__}")
    params = dict(params)
    if method == "none" and params:
        raise ValueError(f"params: method 'none' takes no parameters, got {sorted(params)}")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive int, got {max_detections!r}")
    if (isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float))
            or not math.isfinite(score_threshold)):
        raise ValueError(f"score_threshold must be a finite number, got {score_threshold!r}")
    if method != "none":  # a dry run on no boxes checks the parameters' names and values
        empty = {"boxes": torch.zeros(0, 4, dtype=torch.float64), "scores": torch.zeros(0, dtype=torch.float64),
                 "labels": torch.zeros(0, dtype=torch.int64), "quality": torch.zeros(0, dtype=torch.float64),
                 "variances": torch.zeros(0, 4, dtype=torch.float64)}
        try:
            postprocess(empty, method, max_detections, **params)
        except TypeError as e:
            raise ValueError(f"params: {e}") from None
        except ValueError as e:
            raise ValueError(f"params: {e}") from None
    return params


def _apply(cand: dict, method: str, params: dict, max_detections: int, score_threshold: float,
           class_agnostic: bool) -> dict:
    """Threshold, post-process and cap one image's candidates; carries ``row`` (input position)."""
    n = cand["scores"].shape[0]
    fields = {k: cand[k] for k in ("boxes", "scores", "category", "quality", "variances") if k in cand}
    fields["row"] = torch.arange(n)
    keep = torch.nonzero(fields["scores"] >= score_threshold).flatten()
    if keep.numel() < n:
        fields = {k: v[keep] for k, v in fields.items()}
    if method == "none":
        order = torch.sort(fields["scores"], descending=True, stable=True).indices[:max_detections]
        return {k: v[order] for k, v in fields.items()}
    if not class_agnostic:
        fields["labels"] = fields["category"]
    return postprocess(fields, method, max_detections, **params)


def _load_calibration(calibration: Any, sources: Sequence[_Source]) -> Any:
    """``calibration`` (a :class:`locconf.evaluation.Calibration` or its JSON file) checked against the files."""
    if calibration is None:
        return None
    from .evaluation.calibration import Calibration

    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    for src in sources:
        if "quality" in cal.knots and not src.has_quality and src.num_records:
            raise ValueError(f"{src.path}: the calibration maps 'quality' but record 0 has none")
    return cal


def _check_signals(src: _Source, method: str) -> None:
    has = {"quality": src.has_quality, "variances": src.has_variance}  # by candidate signal
    field = {"quality": "quality", "variances": "variance"}  # a signal's name in a record
    for need in METHODS[method].needs if method in METHODS else ():
        if not has[need] and src.num_records:
            raise ValueError(f"{src.path}: method {method!r} needs a {field[need]!r} in every record; "
                             "record 0 has none")


# --------------------------------------------------------------------------------------------
# Scoring against a ground truth
# --------------------------------------------------------------------------------------------


class _Scorer:
    """Collects, per named row, the COCO records to score and the matched boxes to correlate."""

    def __init__(self, gt_path: str | os.PathLike):
        self.gt = load_coco(gt_path)
        self.images = set(self.gt.getImgIds())
        self.categories = set(self.gt.getCatIds())
        self.rows: dict[str, list[dict]] = {}
        self.matched: dict[str, list[dict]] = {}
        self._targets: dict[int, dict] = {}

    def target(self, image_id: int) -> dict:
        """The ground truth of one image as a target dict (a one-image cache: memory stays bounded)."""
        if image_id not in self._targets:
            anns = self.gt.imgToAnns.get(image_id, [])
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
            self._targets = {image_id: {
                "image_id": image_id, "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)}}
        return self._targets[image_id]

    def expect(self, rows: Sequence[str], correlated: Sequence[str]) -> None:
        """Declare the rows in table order (so that a file without records still gets its row)."""
        self.rows = {r: [] for r in rows}
        self.matched = {r: [] for r in correlated}

    def add(self, row: str, image_id: int, records: list[dict]) -> None:
        keys = ("image_id", "category_id", "bbox", "score")
        self.rows[row].extend({k: r[k] for k in keys} for r in records)

    def correlate(self, row: str, image_id: int, cand: dict) -> None:
        """Keep the candidates whose true IoU is > 0.5 (all that the correlation uses)."""
        if cand["scores"].shape[0] == 0:
            return
        target = self.target(image_id)
        det = {"boxes": cand["boxes"], "labels": cand["category"]}
        keep = match_to_ground_truth(det, target) > 0.5
        if bool(keep.any()):
            kept = {"image_id": image_id, "boxes": cand["boxes"][keep], "labels": cand["category"][keep],
                    "scores": cand["scores"][keep]}
            if cand.get("quality") is not None:
                kept["quality"] = cand["quality"][keep]
            self.matched[row].append(kept)

    def report(self) -> dict:
        metrics = {}
        image_ids = sorted(self.images)
        for row, records in self.rows.items():
            with contextlib.redirect_stdout(io.StringIO()):
                dt = self.gt.loadRes(records)
            metrics[row] = coco_metrics(self.gt, dt, image_ids)
        correlation = {}
        for row, cands in self.matched.items():
            targets = [self.target(c["image_id"]) for c in cands] if cands else []
            correlation[row] = confidence_correlation(cands, targets) if cands else {}
        return {"metrics": metrics, "correlation": correlation, "table": format_table(metrics)}


def format_correlation(correlation: Mapping[str, Mapping]) -> str:
    """Markdown table of the correlations of :func:`postprocess_file`'s report."""
    lines = ["| boxes | signal | Pearson | Spearman | n |", "|---|---|---:|---:|---:|"]
    for row, signals in correlation.items():
        for signal, c in signals.items():
            lines.append(f"| {row} | {signal} | {c['pearson']:+.3f} | {c['spearman']:+.3f} | {c['n']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


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
) -> dict:
    """Post-process a COCO results file of candidates into a COCO results file of detections.

    Args:
        input: candidates, a JSON array or JSON Lines (see the module docstring).
        output: where the detections go (JSON Lines if it ends in ``.jsonl`` / ``.ndjson``).
        method: one of :data:`FILE_METHODS`. params: its keyword arguments (e.g. ``sigma``).
        max_detections: detections kept per image. score_threshold: candidates with a lower
            score are dropped before post-processing.
        class_agnostic: suppress across categories (each detection keeps its category).
        gt: a COCO instances json: check ids against it and score the output (and the input under
            plain NMS) with COCO metrics and the correlation of each signal with the true IoU.
        progress: a tqdm progress bar over images.
        calibration: a :class:`locconf.evaluation.Calibration` or its JSON file (``locconf eval``
            writes one): each image's ``quality`` is calibrated before anything else, and the
            output records carry the calibrated quality.

    Returns:
        ``{"images", "records", "detections"}`` counts, and with ``gt`` also ``"metrics"``
        (``{row: {metric: value}}``), ``"correlation"`` and ``"table"`` (markdown).
    """
    params = _check_method(method, params or {}, max_detections, score_threshold)
    output = Path(output)
    scorer = _Scorer(gt) if gt is not None else None
    src = _Source(input, scorer.images if scorer else None)
    if _same_file(src.path, output):
        raise ValueError(f"output {output} is the input file; write to another file")
    _check_signals(src, method)
    calibration = _load_calibration(calibration, [src])
    cats = scorer.categories if scorer else None
    moves_boxes = method in METHODS and METHODS[method].moves_boxes
    if scorer is not None:
        scorer.expect(["input (nms)", f"output ({method})"], ["input candidates", f"output ({method})"])
    with contextlib.closing(src), _AtomicWriter(output) as out:
        for image_id in tqdm(src.image_ids, desc=f"postprocess {method}", unit="img", disable=not progress):
            cand = src.candidates(image_id, cats)
            if calibration is not None:
                cand = calibration.apply(cand)
            det = _apply(cand, method, params, max_detections, score_threshold, class_agnostic)
            records = _records(image_id, det, None if moves_boxes else cand["bbox"])
            for rec in records:
                out.write(rec)
            if scorer is not None:
                scorer.add(f"output ({method})", image_id, records)
                ref = _apply(cand, "nms", {}, max_detections, score_threshold, class_agnostic)
                scorer.add("input (nms)", image_id, _records(image_id, ref, cand["bbox"]))
                above = torch.nonzero(cand["scores"] >= score_threshold).flatten()
                scorer.correlate("input candidates", image_id,
                                 {k: v[above] for k, v in cand.items() if isinstance(v, Tensor)})
                scorer.correlate(f"output ({method})", image_id, det)
    result = {"images": len(src.image_ids), "records": src.num_records, "detections": out.count,
              "output": str(output)}
    if scorer is not None:
        result.update(scorer.report())
    return result


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
) -> dict:
    """Fuse the detections of several models (one COCO results file each) with :func:`locconf.fusion.fuse`.

    Each file's candidates of an image are first thresholded and post-processed with ``method``
    (``"nms"`` by default: WBF fuses each model's detections; ``"none"`` fuses the raw candidates),
    then the files' detections of the image are fused (per category: ``class_agnostic`` applies to
    the per-file post-processing only) and capped at ``max_detections`` by fused score. Images are
    the union of the files' images.

    Args:
        inputs: two or more files (one suffices, for a file's own fusion). weight, iou_threshold,
            model_weights, conf_type: as :func:`locconf.fusion.fuse`. Other arguments as
            :func:`postprocess_file`; with ``gt``, each input is scored under plain NMS beside the
            fused output.

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
    empty = {"boxes": torch.zeros(0, 4, dtype=torch.float64), "scores": torch.zeros(0, dtype=torch.float64),
             "labels": torch.zeros(0, dtype=torch.int64), "quality": torch.zeros(0, dtype=torch.float64),
             "variances": torch.zeros(0, 4, dtype=torch.float64)}
    fuse([empty] * len(inputs), **fuse_args)  # checks the fusion's own arguments before reading anything
    output = Path(output)
    scorer = _Scorer(gt) if gt is not None else None
    sources = [_Source(p, scorer.images if scorer else None) for p in inputs]
    with contextlib.ExitStack() as stack:
        for src in sources:
            stack.enter_context(contextlib.closing(src))
        return _fuse_sources(sources, output, weight, fuse_args, method, params, max_detections, score_threshold,
                             class_agnostic, scorer, progress)


def _fuse_sources(sources, output, weight, fuse_args, method, params, max_detections, score_threshold,
                  class_agnostic, scorer, progress) -> dict:
    for src in sources:
        if _same_file(src.path, output):
            raise ValueError(f"output {output} is the input file {src.path}; write to another file")
        _check_signals(src, method)
        need = {"quality": src.has_quality, "variance": src.has_variance}.get(weight, True)
        if not need and src.num_records:
            raise ValueError(f"{src.path}: weight {weight!r} needs a {weight!r} in every record; record 0 has none")
    image_ids = sorted(set().union(*(s.image_ids for s in sources)))
    names = [str(s.path) for s in sources]
    names = [f"{n} [{k}]" if names.count(n) > 1 else n for k, n in enumerate(names)]  # one row per input
    cats = scorer.categories if scorer else None
    fused_row = f"fused ({weight})"
    if scorer is not None:
        scorer.expect([f"{n} (nms)" for n in names] + [fused_row], [f"{n} candidates" for n in names] + [fused_row])
    with _AtomicWriter(output) as out:
        for image_id in tqdm(image_ids, desc=f"fuse {weight}", unit="img", disable=not progress):
            dets = []
            for name, src in zip(names, sources):
                cand = src.candidates(image_id, cats)
                det = _apply(cand, method, params, max_detections, score_threshold, class_agnostic)
                dets.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["category"],
                             **{k: det[k] for k in ("quality", "variances") if k in det}})
                if scorer is not None:
                    ref = _apply(cand, "nms", {}, max_detections, score_threshold, class_agnostic)
                    scorer.add(f"{name} (nms)", image_id, _records(image_id, ref, cand["bbox"]))
                    above = torch.nonzero(cand["scores"] >= score_threshold).flatten()
                    scorer.correlate(f"{name} candidates", image_id,
                                     {k: v[above] for k, v in cand.items() if isinstance(v, Tensor)})
            fused = fuse(dets, **fuse_args)
            fused = {k: v[:max_detections] for k, v in fused.items()}
            fused["category"] = fused.pop("labels")
            records = _records(image_id, fused)
            for rec in records:
                out.write(rec)
            if scorer is not None:
                scorer.add(fused_row, image_id, records)
                scorer.correlate(fused_row, image_id, fused)
    result = {"images": len(image_ids), "records": sum(s.num_records for s in sources), "detections": out.count,
              "output": str(output)}
    if scorer is not None:
        result.update(scorer.report())
    return result
