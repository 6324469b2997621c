"""Many images per call (``locconf predict INPUT [INPUT ...] --out-dir DIR``): resumable, sharded over processes.

:func:`expand_inputs` turns files, folders and glob patterns into one sorted list of images;
:func:`predict_images` loads nothing itself (the caller passes the model, loaded once) and, for
each image, tiles it, merges the tiles (:func:`locconf.experiment.inference.predict`'s steps) and
writes its outputs; at the end it writes the combined CSV and COCO file of the whole call.

Outputs, for an image whose *name* is its path relative to the folder the inputs share, without
the suffix (``ortho/a.tif`` and ``ortho/b.tif`` give ``a`` and ``b``; ``x/a.tif`` and ``y/a.tif``
give ``x/a`` and ``y/a``; ``a.png`` beside ``a.tif`` gives ``a_png`` and ``a_tif``):

* ``DIR/<name>.png``: the drawing; ``DIR/<name>.json``: its detections as COCO results; for a
  georeferenced image (GeoTIFF) with the geo extra, ``DIR/<name>.geojson``: the boxes as polygons in
  its map coordinates and CRS (written as one set by
  :func:`locconf.experiment.inference.write_image_outputs`);
* ``DIR/.locconf-predict/<name>.json``: the image's completion record, written last (below);
* ``DIR/predictions.csv`` (``--csv``): every image's detections, ``image_path, xmin, ymin, xmax,
  ymax, label, score`` [+ ``quality``, ``var_x1 .. var_y2``, map columns]; ``image_path`` is the
  image's path as expanded from the command line;
* ``DIR/predictions.json`` (``--json``): ``{"images", "categories", "annotations"}``, the images
  ``{"id", "file_name", "width", "height"}`` and the detections as annotations with ``score``
  (and ``quality`` / ``variance``).

**Image ids** are positions in the sorted, de-duplicated list of the call's images, from 1, so
they do not depend on how the images are shared out among processes.

**Resuming.** An image is complete when its completion record exists, was written under the same
*settings key* and the same image file (size and modification time), and every output it lists
still has the size it records. The key is a SHA-256 of everything that changes the outputs: the
checkpoint (resolved path, size, modification time), the configuration and calibration files
likewise, the method and its keywords, the tiling, border and merging arguments, test-time
augmentation, the score threshold and drawing size, the label names and category ids. It leaves
out what changes only the speed (``batch_size``, the device, the number of processes). A rerun
skips complete images (counted as skipped), redoes the others (a record is deleted before its
image is redone, so an interrupted redo is never taken for complete) and, where only an image's
id moved (images added to the call), rewrites its detections file without running the model.
``overwrite=True`` redoes everything. The combined files are rebuilt at the end from the
per-image detections files, so a resumed call's combined files equal an uninterrupted call's.

**Processes.** Under ``torchrun`` (``WORLD_SIZE > 1``; the caller joins the process group,
:func:`locconf.engine.distributed.init_distributed`), rank ``r`` of ``W`` takes the images at
positions ``r, r + W, r + 2W, ...`` of the sorted list and writes their outputs; the ranks then
gather their results and rank 0 writes the combined files (the per-image files need no shared
folder for that; resuming reads each rank's own). Rank 0 holds the folder's lock
(:func:`locconf.files.output_lock`) for the whole call.

**Failures.** An image that cannot be read or predicted (a missing or damaged file, too many
pixels, an error of the model) is reported by name with the reason and the others go on
(``fail_fast=True`` stops at the first); the summary lists the failed images, which are left out
of the combined files.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "RECORDS_DIR", "expand_inputs", "output_names", "settings_key", "predict_images"]

#: The file suffixes (any case) of images found in folders and by patterns.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

#: The folder of the completion records inside the output folder.
RECORDS_DIR = ".locconf-predict"

_RECORD_FORMAT = "locconf-predict-image"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def expand_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Files, folders and glob patterns -> the images, sorted by path and without repeats.

    A file is taken as it is (whatever its suffix); a folder gives its files with a suffix of
    :data:`IMAGE_SUFFIXES` (any case), and those of its sub-folders with ``recursive``; a pattern
    (``*``, ``?``, ``[``; expanded here because a quoted pattern reaches the command unexpanded,
    ``**`` with ``recursive``) gives the matching images. An argument that gives no image is a
    ``ValueError`` (a missing file a ``FileNotFoundError``) naming it. Two arguments naming one
    file (also through a symbolic link) give it once.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("give at least one image, folder or pattern")
    found: list[Path] = []
    for arg in inputs:
        text = os.fspath(arg)
        path = Path(text)
        if path.is_dir():
            files = path.rglob("*") if recursive else path.iterdir()
            images = sorted(p for p in files if _is_image(p))
            if not images:
                raise ValueError(f"{text}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                                 + ("" if recursive else " (--recursive also searches its sub-folders)"))
        elif path.is_file():
            images = [path]
        elif glob.has_magic(text):
            images = sorted(p for p in map(Path, glob.glob(text, recursive=recursive)) if _is_image(p))
            if not images:
                raise ValueError(f"{text}: no image matches this pattern")
        else:
            raise FileNotFoundError(f"image file not found: {text}")
        found.extend(images)
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return sorted(unique.values(), key=lambda p: p.as_posix())


def output_names(images: Sequence[Path]) -> list[str]:
    """The output name of each image: its path relative to the folder all share, without the suffix
    (``/``-separated), with the suffix joined by ``_`` where two would otherwise be equal."""
    if not images:
        return []
    resolved = [Path(p).resolve() for p in images]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    rel = [p.relative_to(common) for p in resolved]
    stems = [r.with_suffix("").as_posix() for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names = [s if counts[s] == 1 else f"{s}_{r.suffix.lstrip('.')}" for s, r in zip(stems, rel)]
    if len(set(names)) != len(names):  # a_png.png beside a.png and a.PNG: keep the whole file name
        names = [r.as_posix().replace(".", "_") for r in rel]
    return names


def _identity(path: Optional[str | os.PathLike]) -> Optional[dict]:
    """A file's identity for the settings key: resolved path, size and modification time (None: no file)."""
    if path is None:
        return None
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_key(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the settings as canonical JSON (sorted keys; values JSON can hold)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_record(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == _RECORD_FORMAT else None


def _complete(job: dict, key: str, out_dir: Path) -> Optional[tuple[dict, list]]:
    """``(record, detections)`` of an image whose outputs are complete for ``key``, else None."""
    record = _read_record(job["record"])
    if record is None or record.get("key") != key or record.get("source") != job["identity"]:
        return None
    for out in (record.get("outputs") or {}).values():
        try:
            if (out_dir / out["name"]).stat().st_size != out["size"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    try:
        detections = json.loads(job["detections"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(detections, list) or len(detections) != record.get("count"):
        return None
    return record, detections


def _record(job: dict, key: str, out_dir: Path, outputs: Mapping[str, Path], raster: Any, count: int) -> dict:
    return {"format": _RECORD_FORMAT, "version": 1, "key": key, "source": job["identity"],
            "image": {"id": job["id"], "file_name": job["file_name"], "width": int(raster.width),
                      "height": int(raster.height)},
            "transform": list(raster.transform) if raster.transform is not None else None, "crs": raster.crs,
            "outputs": {kind: {"name": p.relative_to(out_dir).as_posix(), "size": p.stat().st_size}
                        for kind, p in outputs.items()},
            "count": count}


def _result(job: dict, record: dict, detections: list, skipped: bool) -> dict:
    return {"index": job["index"], "image": record["image"], "transform": record.get("transform"),
            "crs": record.get("crs"), "detections": detections, "skipped": skipped}


def _renumber(job: dict, record: dict, detections: list, out_dir: Path) -> tuple[dict, list]:
    """A complete image whose id moved: its detections file and record rewritten with the new id."""
    from ..files import atomic_write_text
    from ..tiling import write_together

    detections = [dict(r, image_id=job["id"]) for r in detections]
    record = dict(record, image=dict(record["image"], id=job["id"]))
    text = json.dumps(detections)
    job["record"].unlink(missing_ok=True)
    write_together({job["detections"]: lambda tmp: tmp.write_text(text, encoding="utf-8")})
    record["outputs"] = dict(record["outputs"], detections={"name": job["detections"].relative_to(out_dir).as_posix(),
                                                            "size": job["detections"].stat().st_size})
    atomic_write_text(job["record"], json.dumps(record, indent=1))
    return record, detections


def _plan(images: list[Path], out_dir: Path, csv_path: Path, json_path: Path) -> list[dict]:
    """One job per image: index, id, names and output paths; checks that no two outputs are one file."""
    names = output_names(images)
    jobs, owners = [], {csv_path.resolve(): "the combined CSV (--csv)", json_path.resolve(): "the combined JSON (--json)"}
    for index, (path, name) in enumerate(zip(images, names)):
        job = {"index": index, "id": index + 1, "path": path, "file_name": path.as_posix(), "name": name,
               "drawing": out_dir / f"{name}.png", "detections": out_dir / f"{name}.json",
               "vector": out_dir / f"{name}.geojson", "record": out_dir / RECORDS_DIR / f"{name}.json"}
        for kind in ("drawing", "detections", "vector"):
            resolved = job[kind].resolve()
            if resolved in owners:
                raise ValueError(f"the {kind} of {path} would be {job[kind]}, which is {owners[resolved]}: "
                                 f"choose another --csv / --json name")
            owners[resolved] = f"the {kind} of {path}"
        jobs.append(job)
    return jobs


def _check_files(jobs: list[dict], out_dir: Path, csv_path: Path, json_path: Path, inputs: Sequence,
                 protected: Mapping[str, Optional[str | os.PathLike]]) -> None:
    """No output on an input image, checkpoint, configuration or calibration, nor inside an input folder."""
    from ..files import check_outputs

    folders = [Path(os.fspath(a)) for a in inputs if Path(os.fspath(a)).is_dir()]
    check_outputs({"--out-dir": out_dir, "--csv": csv_path, "--json": json_path},
                  dict({"input folder": folders}, **protected))
    taken = {Path(p).resolve(): name for name, p in protected.items() if p is not None}
    taken.update({job["path"].resolve(): f"input image {job['path']}" for job in jobs})
    for job in jobs:
        for kind in ("drawing", "detections", "vector"):
            what = taken.get(job[kind].resolve())
            if what is not None:
                raise ValueError(f"the {kind} of {job['path']} would be {job[kind]}, which is the {what}: "
                                 f"write the outputs to another --out-dir")


def predict_images(model: nn.Module, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   csv_path: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
                   recursive: bool = False, overwrite: bool = False, fail_fast: bool = False,
                   method: str = "nms", params: Optional[dict] = None, score_threshold: float = 0.3,
                   tile_size: int = 400, overlap: int = 100, batch_size: int = 4, border: str = "drop",
                   calibration: Optional[str | os.PathLike] = None, tta: str = "none", tta_merge: str = "concat",
                   max_pixels: Optional[int] = None, max_side: int = 2000,
                   class_names: Optional[Sequence[str]] = None, label_to_cat_id: Optional[dict[int, int]] = None,
                   checkpoint: Optional[str | os.PathLike] = None, config: Optional[str | os.PathLike] = None,
                   device: Optional[str] = None, progress: bool = True, **merge_args: Any) -> dict:
    """Predict every image of ``inputs`` into ``out_dir`` (see the module docstring); return a summary.

    Args:
        model: the detector, loaded once (``locconf.experiment.load_trained``).
        inputs: files, folders and patterns (:func:`expand_inputs`, with ``recursive``).
        out_dir: the output folder; ``csv_path`` / ``json_path`` the combined files (default
            ``out_dir/predictions.csv`` and ``.json``).
        overwrite: redo complete images too. fail_fast: stop at the first image that fails.
        method, params, score_threshold, tile_size, overlap, batch_size, border, calibration, tta,
            tta_merge, max_pixels, max_side, class_names, label_to_cat_id, **merge_args:
            as :func:`locconf.experiment.inference.predict` (``calibration`` a JSON file here).
        checkpoint, config: the files the model came from: part of the settings key, and
            protected from being written over.
        device: where the model runs. progress: a bar over the images (and the tiles of an image of
            several tiles); under torchrun, rank 0's images only.

    Returns:
        ``{"images", "predicted", "skipped", "failed": [{"image", "reason"}], "detections",
        "shown" (score >= score_threshold), "seconds", "csv", "json", "out_dir", "world_size"}``,
        the same on every process.
    """
    from ..engine.distributed import all_gather_object, get_rank, get_world_size
    from ..evaluation.calibration import Calibration
    from ..files import output_lock
    from ..progress import progress_bar
    from ..tiling import DEFAULT_MAX_PIXELS
    from ..tta import check_transforms, tta_model
    from .inference import check_settings

    out_dir = Path(out_dir)
    csv_path = Path(csv_path) if csv_path is not None else out_dir / "predictions.csv"
    json_path = Path(json_path) if json_path is not None else out_dir / "predictions.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    check_settings(tile_size, overlap, method, params, border, tta, tta_merge, model, **merge_args)
    images = expand_inputs(inputs, recursive)
    jobs = _plan(images, out_dir, csv_path, json_path)
    _check_files(jobs, out_dir, csv_path, json_path, inputs,
                 {"checkpoint": checkpoint, "config": config, "calibration": calibration})
    settings = {"checkpoint": _identity(checkpoint), "config": _identity(config),
                "calibration": _identity(calibration), "method": method, "params": params or {},
                "score_threshold": score_threshold, "tile_size": tile_size, "overlap": overlap, "border": border,
                "tta": list(check_transforms(tta)), "tta_merge": tta_merge, "max_side": max_side,
                "class_names": list(class_names) if class_names else None,
                "label_to_cat_id": sorted((label_to_cat_id or {}).items()), "merge_args": merge_args}
    key = settings_key(settings)
    cal = Calibration.load(calibration) if calibration is not None else None
    runner = tta_model(model, tta, tta_merge, method, params)
    for job in jobs:
        job["identity"] = {k: v for k, v in _identity(job["path"]).items() if k != "path"}

    rank, world = get_rank(), get_world_size()
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(output_lock(out_dir, "locconf predict"))
            except ValueError as e:
                error = str(e)
        error = all_gather_object(error)[0]
        if error is not None:
            raise ValueError(error)
        mine = [job for job in jobs if job["index"] % world == rank]
        start = time.perf_counter()
        results, failures = _run_jobs(runner, mine, out_dir, key, overwrite=overwrite, fail_fast=fail_fast,
                                      progress=progress and rank == 0, bar=progress_bar, rank=rank, world=world,
                                      options=dict(method=method, params=params, tile_size=tile_size, overlap=overlap,
                                                   batch_size=batch_size, border=border, calibration=cal,
                                                   device=device, max_pixels=max_pixels, class_names=class_names,
                                                   label_to_cat_id=label_to_cat_id, score_threshold=score_threshold,
                                                   max_side=max_side, merge_args=merge_args))
        seconds = time.perf_counter() - start
        gathered = all_gather_object((results, failures, seconds))
        results = sorted((r for g in gathered for r in g[0]), key=lambda r: r["index"])
        failures = sorted((f for g in gathered for f in g[1]), key=lambda f: f["index"])
        seconds = max(g[2] for g in gathered)
        problem = None
        if rank == 0:
            try:
                _write_combined(results, csv_path, json_path, class_names, label_to_cat_id)
            except BaseException as e:
                if world == 1:
                    raise
                problem = e
        # every process returns once the combined files are written (or raises with rank 0's error)
        shared = all_gather_object(None if problem is None else f"{type(problem).__name__}: {problem}")[0]
        if problem is not None:
            raise problem
        if shared is not None:
            raise ValueError(f"rank 0 could not write the combined files: {shared}")
    detections = sum(len(r["detections"]) for r in results)
    shown = sum(1 for r in results for d in r["detections"] if d["score"] >= score_threshold)
    skipped = sum(r["skipped"] for r in results)
    return {"images": len(jobs), "predicted": len(results) - skipped, "skipped": skipped,
            "failed": [{"image": f["image"], "reason": f["reason"]} for f in failures], "detections": detections,
            "shown": shown, "seconds": seconds, "csv": str(csv_path), "json": str(json_path), "out_dir": str(out_dir),
            "world_size": world}


def _run_jobs(runner: nn.Module, jobs: list[dict], out_dir: Path, key: str, *, overwrite: bool, fail_fast: bool,
              progress: bool, bar: Any, rank: int, world: int, options: dict) -> tuple[list[dict], list[dict]]:
    """This process's images: each skipped when complete, else predicted and written; failures collected."""
    results, failures = [], []
    where = f" [rank {rank}/{world}]" if world > 1 else ""
    images_bar = bar(total=len(jobs), desc=f"images{where}", unit="image", progress=progress)
    try:
        for job in jobs:
            done = None if overwrite else _complete(job, key, out_dir)
            try:
                if done is not None:
                    record, detections = done
                    if record["image"]["id"] != job["id"]:
                        record, detections = _renumber(job, record, detections, out_dir)
                    results.append(_result(job, record, detections, skipped=True))
                    logger.debug("%s: complete, skipped", job["path"])
                else:
                    results.append(_predict_one(runner, job, out_dir, key, progress=progress, **options))
            except Exception as e:  # one image's failure does not stop the batch (unless fail_fast)
                if fail_fast:
                    raise
                reason = " ".join(str(e).split()) or type(e).__name__
                for prefix in (f"{job['path']}: ", f"{job['path'].resolve()}: "):
                    reason = reason[len(prefix):] if reason.startswith(prefix) else reason
                logger.error("%s failed%s: %s", job["path"], where, reason)
                failures.append({"index": job["index"], "image": job["file_name"], "reason": reason})
            images_bar.update(1)
    finally:
        images_bar.close()
    return results, failures


def _predict_one(runner: nn.Module, job: dict, out_dir: Path, key: str, *, method: str, params: Optional[dict],
                 tile_size: int, overlap: int, batch_size: int, border: str, calibration: Any, device: Optional[str],
                 max_pixels: int, class_names: Optional[Sequence[str]], label_to_cat_id: Optional[dict],
                 score_threshold: float, max_side: int, merge_args: dict, progress: bool) -> dict:
    from ..files import atomic_write_text
    from ..tiling import open_raster, predict_tiled
    from .build import device_of
    from .inference import write_image_outputs

    job["record"].unlink(missing_ok=True)  # from here until the new record, the image is not complete
    with open_raster(job["path"], max_pixels) as raster:
        dets = predict_tiled(runner, raster, tile_size, overlap, batch_size, method, params, border,
                             device=device_of(device), progress=progress, calibration=calibration, log_size=None,
                             **merge_args)
        outputs = write_image_outputs(raster, dets, image_path=job["file_name"], image_id=job["id"],
                                      drawing=job["drawing"], detections=job["detections"], class_names=class_names,
                                      label_to_cat_id=label_to_cat_id, score_threshold=score_threshold,
                                      max_side=max_side, vector=job["vector"])
        record = _record(job, key, out_dir, outputs, raster, int(dets["boxes"].shape[0]))
    atomic_write_text(job["record"], json.dumps(record, indent=1))
    detections = json.loads(job["detections"].read_text(encoding="utf-8"))
    logger.debug("%s: %d detections", job["path"], len(detections))
    return _result(job, record, detections, skipped=False)


def _write_combined(results: list[dict], csv_path: Path, json_path: Path, class_names: Optional[Sequence[str]],
                    label_to_cat_id: Optional[dict[int, int]]) -> None:
    """The call's CSV and COCO file, from the per-image detections, written as one set."""
    from ..tiling import records_to_dets, write_coco_images, write_csv_images, write_together

    cat_to_label = {c: label for label, c in (label_to_cat_id or {}).items()}
    categories = None
    if label_to_cat_id:
        categories = [{"id": c, "name": str(class_names[label]) if class_names and label < len(class_names)
                       else str(label)} for label, c in sorted(label_to_cat_id.items())]
    rows = [{"image_path": r["image"]["file_name"], "dets": records_to_dets(r["detections"], cat_to_label),
             "transform": r["transform"], "crs": r["crs"]} for r in results]
    records = [d for r in results for d in r["detections"]]
    write_together({
        csv_path: lambda tmp: write_csv_images(rows, tmp, class_names),
        json_path: lambda tmp: write_coco_images([r["image"] for r in results], records, tmp, categories),
    })
