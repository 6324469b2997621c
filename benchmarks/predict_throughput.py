"""Batch prediction throughput: one ``locconf predict`` call for N images vs one call per image, and one
process vs two under ``torchrun``.

    python benchmarks/predict_throughput.py --checkpoint /work/bench/runs/accuracy_neon/baseline/it1500_seed0/checkpoint_0001500.pth

Runs the real command line in subprocesses (``OMP_NUM_THREADS=1`` each, progress bars off) on the
first ``--images`` tiles of ``--images-from`` (default: the 400 px NEON training tiles of
``data/neon/train``), each a single 400 px tile:

* **one call**: ``locconf predict IMG_1 ... IMG_N --out-dir D`` (the model loads once);
* **one call per image**: ``locconf predict IMG --out D/x.png`` for the first ``--per-image``
  images, the time per call multiplied by N (each call imports torch and loads the model);
* **torchrun, 2 processes**: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
  locconf predict IMG_1 ... IMG_N --out-dir D2`` (gloo on the CPU), checked to write the same files
  as the one call.

For each: wall-clock seconds, the CPU seconds of the command's processes (``RUSAGE_CHILDREN``, which
includes torchrun's workers) and images per second; from the CPU seconds of the two one-process
rows, the start-up of a call and the cost of an image. The start-up of a call (interpreter, imports, model load) is its wall time minus
the seconds its summary line reports for the images. Wall times depend on what else the machine
runs: the report records the load average before and after, and the CPU seconds, which do not.
Without ``--checkpoint`` a tiny detector is trained on synthetic data first (a few iterations), so
the script runs anywhere; its start-up then understates a real model's.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from common import cpu_name  # benchmarks/common.py (the script's folder is on sys.path)
except ImportError:  # imported as a module from elsewhere (the tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import cpu_name

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")


def _timed(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its wall seconds, its processes' CPU seconds, stdout; raise on a non-zero exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stdout": proc.stdout}


def _images_seconds(stdout: str) -> float:
    """The seconds the summary line of ``locconf predict --out-dir`` reports for the images."""
    m = re.search(r"detections \(.*?\) in ([0-9.]+) s", stdout)
    if not m:
        raise RuntimeError(f"no summary line in:\n{stdout}")
    return float(m.group(1))


def _tiny_checkpoint(work: Path) -> Path:
    """A tiny Faster R-CNN trained for 20 iterations on synthetic 400 px scenes (when no checkpoint is given)."""
    import yaml

    cfg = {"model": dict(arch="rcnn", backbone="resnet18", fpn_channels=16, representation_size=64, min_size=400,
                         max_size=400, candidates_per_image=300),
           "data": dict(source="synthetic", root=str(work / "synthetic"),
                        synthetic=dict(num_train=8, num_val=2, image_size=400, num_classes=1)),
           "train": dict(iterations=20, batch_size=2, lr=0.01, warmup_iters=5, out_dir=str(work / "tiny"),
                         checkpoint_every=20, log_every=10, progress=False)}
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    _timed([sys.executable, "-m", "locconf", "train", str(work / "tiny.yaml")], work)
    return work / "tiny" / "checkpoint_0000020.pth"


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(checkpoint: Path | None, images_from: Path, count: int, per_image: int, work: Path) -> dict:
    images = sorted(p for p in images_from.iterdir() if p.suffix.lower() == ".png")[:count]
    if len(images) < count:
        raise ValueError(f"{images_from} has {len(images)} PNG images, fewer than --images {count}")
    if checkpoint is None:
        checkpoint = _tiny_checkpoint(work)
    base = ["predict", "--checkpoint", str(checkpoint), "--no-progress"]
    paths = [str(p.resolve()) for p in images]
    load = [os.getloadavg()[0]]

    one = _timed([sys.executable, "-m", "locconf", *base, *paths, "--out-dir", str(work / "one")], work)
    one["images_s"] = _images_seconds(one["stdout"])
    calls = []
    for i, p in enumerate(paths[:per_image]):
        calls.append(_timed([sys.executable, "-m", "locconf", *base, p, "--out", str(work / "each" / f"{i}.png")],
                            work))
    two = _timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "locconf", *base, *paths, "--out-dir", str(work / "two")], work)
    two["images_s"] = _images_seconds(two["stdout"])
    load.append(os.getloadavg()[0])
    same = _tree(work / "one") == _tree(work / "two")
    per_call = {k: sum(c[k] for c in calls) / len(calls) for k in ("wall", "cpu")}
    for r in (one, two):
        r.pop("stdout")
    return {"checkpoint": str(checkpoint), "images": count, "image_size": "x".join(map(str, _size(images[0]))),
            "images_from": str(images_from), "per_image_calls": len(calls), "one_call": one, "per_call": per_call,
            "torchrun_2": two, "same_outputs": same, "load_average": load, "cpu": cpu_name(),
            "cores": os.cpu_count()}


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def format_report(r: dict, command: str) -> str:
    n = r["images"]
    one, two, each = r["one_call"], r["torchrun_2"], r["per_call"]
    rows = [
        ("one call, 1 process", one["wall"], one["cpu"], one["wall"] - one["images_s"], one["images_s"]),
        (f"one call per image ({r['per_image_calls']} calls timed, x {n})", each["wall"] * n, each["cpu"] * n,
         None, None),
        ("one call, torchrun 2 processes", two["wall"], two["cpu"], two["wall"] - two["images_s"], two["images_s"]),
    ]
    lines = [f"Command: `{command}`", "",
             f"{n} images ({r['image_size']} px, one tile each) of `{r['images_from']}`; checkpoint "
             f"`{r['checkpoint']}`.", "",
             "| how | wall s | images / s (wall) | CPU s | CPU s / image | start-up s (wall) | images s (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, wall, cpu, startup, imgs in rows:
        lines.append(f"| {name} | {wall:.1f} | {n / wall:.2f} | {cpu:.1f} | {cpu / n:.2f} | "
                     f"{'-' if startup is None else f'{startup:.1f}'} | {'-' if imgs is None else f'{imgs:.1f}'} |")
    per_image = (one["cpu"] - each["cpu"]) / (n - 1)  # one call: S + n p; a call per image: S + p
    lines += ["", f"From the CPU seconds of the two one-process rows (one call = S + {n} p, one call per image = "
                  f"S + p): start-up S = {each['cpu'] - per_image:.1f} CPU s per call, p = {per_image:.2f} CPU s "
                  f"per image (tiling, model, merging, drawing, writing).",
              "", f"One call per image: {each['wall']:.1f} s wall and {each['cpu']:.1f} CPU s per call, each "
                  f"paying the start-up (interpreter, imports, model load); one call pays it once "
                  f"({one['wall'] - one['images_s']:.1f} s) and then {one['images_s'] / n:.2f} s per image. "
                  f"torchrun outputs equal the one-process outputs file for file: {r['same_outputs']}.",
              "",
              f"{r['cpu']}, {r['cores']} cores, OMP_NUM_THREADS=1 per process; load average (1 min) "
              f"{r['load_average'][0]:.1f} before and {r['load_average'][1]:.1f} after: wall times include what "
              f"else the machine ran, CPU seconds do not."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: train a tiny one on synthetic data")
    ap.add_argument("--images-from", type=Path, default=ROOT / "data" / "neon" / "train")
    ap.add_argument("--images", type=int, default=40, help="images predicted")
    ap.add_argument("--per-image", type=int, default=8, help="one-call-per-image runs timed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_throughput.md")
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="locconf_throughput_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.checkpoint.resolve() if args.checkpoint else None, args.images_from.resolve(), args.images,
                     args.per_image, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/predict_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = format_report(result, command)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    return result


if __name__ == "__main__":
    main()
