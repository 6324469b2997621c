"""Tiled prediction on whole NEON images: merge methods and border handling, scored on whole held-out bands.

    python benchmarks/tiled_neon.py --checkpoint /work/bench/runs/recipe/lite0_3000/checkpoint_0003000.pth
    python benchmarks/tiled_neon.py --checkpoint runs/demo1000/checkpoint_0001000.pth --out benchmarks/results/tiled_neon_dir.md  # locconf demo --iterations 1000 --out runs/demo1000

The held-out data of ``locconf data neon-trees`` (``locconf.data.neon``) are: the bottom
``--val-height`` pixels of each image larger than a tile (the two YELL crops: a 2299 x 400 and a
1249 x 400 band) and the two 400 x 400 images of other sites (OSBS_029, SOAP_061). Instead of the
val split's non-overlapping tiles, each band (or image) is here **one image**, with every crown
that has at least half its area inside it as ground truth (``crop_boxes_to_window(..., min_visible=0.5)``,
the rule of the val tiles), and the checkpoint predicts on it tile by tile exactly as ``locconf
predict`` does (``locconf.tiling``: ``--tile-size`` tiles with ``--overlap``). The model runs once
per band; its tiles' candidates are then merged with every post-processing method (quality-ranked
ones only where the detector predicts a quality) and every border handling (``none``: pool and
suppress, as DeepForest's ``predict_tile``; ``drop``; ``down-weight``), and each merge is scored
with faster-coco-eval over the four images at once (maxDets 1000: a band holds up to 109 crowns).

The source images come from the deepforest wheel cached by ``locconf.data.neon`` (``--cache-dir``,
default ``$LOCCONF_CACHE`` or ``~/.cache/locconf``); a missing cache is fetched with pip once.
Every model label counts as a tree (NEON has one class). Writes ``--out`` (markdown: one table
per ``--checkpoint``) and, with ``--json``, every number.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

try:
    from common import cpu_name  # benchmarks/common.py (the script's folder is on sys.path)
except ImportError:  # imported as a module from elsewhere (the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_name

from locconf.data.neon import crop_boxes_to_window, fetch_deepforest_data, read_voc, site_of
from locconf.evaluation import load_coco
from locconf.postprocess import REQUIRED_SIGNALS
from locconf.experiment import load_trained
from locconf.postprocess import METHODS
from locconf.tiling import BORDERS, TileMerger, open_raster, tile_candidates, tile_grid

COLUMNS = ("AP", "AP50", "AP75")
MAX_DETS = 1000


def held_out_bands(src_dir: Path, out_dir: Path, val_height: int = 400, tile_size: int = 400) -> Path:
    """Write each source image's held-out band (whole images no larger than a tile) as a PNG + COCO json.

    Returns the ground-truth json (``out_dir/bands.json``): one image per band with ``site``,
    ``source`` and ``window``; crowns clipped to the band, kept when half their area is inside.
    """
    images, annotations = [], []
    xmls = sorted(src_dir.glob("*.xml"))
    if not xmls:
        raise FileNotFoundError(f"no VOC *.xml annotation files in {src_dir}")
    for voc in (read_voc(p) for p in xmls):
        w, h = voc.width, voc.height
        window = (0, 0, w, h) if w <= tile_size and h <= tile_size else (0, h - val_height, w, h)
        boxes, _ = crop_boxes_to_window(voc.boxes, window, 0.5)
        with Image.open(voc.image_path) as im:
            band = im.convert("RGB").crop(window)
        image_id = len(images) + 1
        name = f"{voc.image_path.stem}_band.png"
        band.save(out_dir / name)
        images.append({"id": image_id, "file_name": name, "width": window[2] - window[0],
                       "height": window[3] - window[1], "site": site_of(voc.image_path.name),
                       "source": voc.image_path.name, "window": list(window)})
        for b in boxes.tolist():
            bw, bh = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": 0})
    gt = out_dir / "bands.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": [{"id": 1, "name": "tree"}]}))
    return gt


def coco_scores(gt, records: list[dict], image_ids: list[int]) -> dict[str, float]:
    """AP, AP50, AP75 of ``records`` on ``image_ids`` with maxDets (1, 10, MAX_DETS)."""
    from faster_coco_eval import COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(records) if records else gt.loadRes([{"image_id": image_ids[0], "category_id": 1,
                                                               "bbox": [0, 0, 1, 1], "score": 0.0}])
        ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
        ev.params.imgIds = sorted(image_ids)
        ev.params.maxDets = [1, 10, MAX_DETS]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


def _records(dets: dict, image_id: int) -> list[dict]:
    boxes = dets["boxes"].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    return [{"image_id": image_id, "category_id": 1, "bbox": b, "score": s}
            for b, s in zip(xywh, dets["scores"].tolist())]


def run(checkpoint: Path, methods: list[str], borders: list[str], tile_size: int, overlap: int, val_height: int,
        batch_size: int, cache_dir: Path | None, device: str, progress: bool) -> dict:
    model, cfg = load_trained(checkpoint, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt_path = held_out_bands(fetch_deepforest_data(cache_dir), tmp, val_height, tile_size)
        gt = load_coco(gt_path)
        images = json.loads(gt_path.read_text())["images"]
        t0 = time.perf_counter()
        tiles = {}
        for im in images:
            with open_raster(tmp / im["file_name"]) as raster:
                windows = tile_grid(raster.height, raster.width, tile_size, overlap)
                tiles[im["id"]] = (windows, list(tile_candidates(model, raster, windows, batch_size, device,
                                                                progress)))
        infer_s = time.perf_counter() - t0
    has = {k: all(k in c for _, (_, ts) in tiles.items() for _, c in ts) for k in ("quality", "variances")}
    usable = [m for m in methods if REQUIRED_SIGNALS[m] is None or has[REQUIRED_SIGNALS[m]]]
    ids = [im["id"] for im in images]
    sites = sorted({im["site"] for im in images})
    rows = {}
    for method in usable:
        for border in borders:
            records, n = [], 0
            for im in images:
                windows, cands = tiles[im["id"]]
                merger = TileMerger(windows, (im["height"], im["width"]), method, border=border,
                                    max_detections=MAX_DETS)
                for index, c in cands:
                    merger.add(index, c)
                dets = merger.finish()
                n += len(dets["scores"])
                records += _records(dets, im["id"])
            row = coco_scores(gt, records, ids)
            row["sites"] = {s: coco_scores(gt, [r for r in records if gt.imgs[r["image_id"]]["site"] == s],
                                           [im["id"] for im in images if im["site"] == s]) for s in sites}
            row["detections"] = n
            rows[f"{method} / {border}"] = row
    return {"rows": rows, "images": images, "boxes": len(gt.anns), "skipped": sorted(set(methods) - set(usable)),
            "inference_s": round(infer_s, 1), "tiles": sum(len(w) for w, _ in tiles.values()),
            "model": {k: cfg["model"].get(k) for k in ("arch", "backbone", "quality", "head") if cfg["model"].get(k)}}


def _cell(v: float) -> str:
    return "-" if v is None or v < 0 or math.isnan(v) else f"{100 * v:.1f}"


def _section(checkpoint: Path, result: dict, seconds: float) -> list[str]:
    rows = result["rows"]
    sites = sorted({s for r in rows.values() for s in r["sites"]})
    reference = rows.get("nms / none")
    model = ", ".join(f"{k} {v}" for k, v in result["model"].items())
    lines = [f"## `{checkpoint}`", "", f"{model}; {result['tiles']} tiles, the model run once on them in "
             f"{result['inference_s']} s; {seconds:.0f} s in all."]
    if result["skipped"]:
        lines.append(f"Skipped (the detector predicts no quality / variances): {', '.join(result['skipped'])}.")
    lines += ["", "| method / border | " + " | ".join(COLUMNS) + " | dAP | dAP75 | "
              + " | ".join(f"AP {s}" for s in sites) + " | detections |",
              "|---|" + "---:|" * (len(COLUMNS) + 2 + len(sites) + 1)]
    for name, r in rows.items():
        d = [f"{100 * (r[c] - reference[c]):+.1f}" if reference else "" for c in ("AP", "AP75")]
        lines.append(f"| {name} | " + " | ".join(_cell(r[c]) for c in COLUMNS) + " | " + " | ".join(d) + " | "
                     + " | ".join(_cell(r["sites"][s]["AP"]) for s in sites) + f" | {r['detections']} |")
    return lines + [""]


def format_markdown(runs: list[tuple[Path, dict, float]], args: argparse.Namespace) -> str:
    """The report: how the images were built and merged, then one table per checkpoint."""
    first = runs[0][1]
    sizes = ", ".join(f"{im['source']} {im['width']}x{im['height']}" for im in first["images"])
    lines = [
        "# Tiled prediction on whole NEON images: merging and cut boxes",
        "",
        f"- Images: the held-out data of `locconf data neon-trees` as {len(first['images'])} whole images "
        f"({sizes}), {first['boxes']} crowns (at least half inside), each predicted tile by tile: tiles "
        f"{args.tile_size} px with overlap {args.overlap}, {args.batch_size} tiles per model call.",
        f"- Merge: `locconf.tiling.TileMerger` (margin 4 px, cover 0.7, score ratio 0.5, cut weight 0.5), "
        f"at most {MAX_DETS} detections per image; COCO maxDets (1, 10, {MAX_DETS}).",
        "- Border: `none` pools every tile's candidates and suppresses (DeepForest's merge); `drop` removes a "
        "candidate cut by an interior tile edge when a neighbouring tile has a whole counterpart covering it; "
        "`down-weight` halves the score of cut candidates.",
        f"- Hardware: {cpu_name()}, {torch.get_num_threads()} torch threads.",
        "- Command: `python benchmarks/tiled_neon.py --checkpoint " + " ".join(str(c) for c, _, _ in runs)
        + (f" --tile-size {args.tile_size}" if args.tile_size != 400 else "")
        + (f" --overlap {args.overlap}" if args.overlap != 100 else "") + "`",
        "",
        "Metrics x 100 over the four images; d: against `nms / none`. Per-site columns give AP.",
        "",
    ]
    for checkpoint, result, seconds in runs:
        lines += _section(checkpoint, result, seconds)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="one or more checkpoints (config.yaml beside each): one table each")
    parser.add_argument("--methods", default="nms,soft-linear,soft-gaussian,quality,quality+soft-gaussian,iou-guided")
    parser.add_argument("--borders", default=",".join(BORDERS))
    parser.add_argument("--tile-size", type=int, default=400)
    parser.add_argument("--overlap", type=int, default=100)
    parser.add_argument("--val-height", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tiled_neon.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    methods, borders = args.methods.split(","), args.borders.split(",")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    for b in borders:
        if b not in BORDERS:
            parser.error(f"--borders: {b!r} is not one of {', '.join(BORDERS)}")
    for c in args.checkpoint:
        if not c.is_file() or not (c.parent / "config.yaml").is_file():
            parser.error(f"--checkpoint: {c} is not a file with a config.yaml beside it")
    torch.set_num_threads(args.threads)
    runs = []
    for checkpoint in args.checkpoint:
        t0 = time.perf_counter()
        result = run(checkpoint, methods, borders, args.tile_size, args.overlap, args.val_height, args.batch_size,
                     args.cache_dir, args.device, not args.no_progress)
        runs.append((checkpoint, result, time.perf_counter() - t0))
    text = format_markdown(runs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({str(c): r for c, r, _ in runs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
