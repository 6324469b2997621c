"""Latency of the exported network (up to the candidates): ONNX Runtime against eager PyTorch, on CPU.

Run:  python benchmarks/export_latency.py [--families dir clq ...] [--threads 1 2] [--repeats 3]
      [--candidates 1000] [--workdir runs/export_latency]

Every family is built at the NEON CPU setting of ``benchmarks/inference.py`` (ResNet-18 FPN P3-P6,
128 channels, 400 x 400, quality branches 1024 wide) with random weights (seed 0),
``score_thresh=0`` and ``candidates_per_image=N`` (random weights score every box alike; the
quality heads' cost grows with N), exported to ONNX with ``locconf.export.export_onnx`` (the dynamo
exporter; the files are kept in ``--workdir`` and reused) and run on the 11 NEON validation tiles
(each resized to 400 x 400 by ``locconf.export.prepare_images``). Per family and thread count
(``torch.set_num_threads`` and the onnxruntime session's ``intra_op_num_threads``) three things are
timed, round-robin one image at a time, median over ``--repeats`` passes of the tiles:

* ``eager``: ``model.candidates([image])``, the detector as locconf runs it;
* ``eager fixed``: the exported network (``locconf.export.export_network``) in eager PyTorch;
* ``onnxruntime``: the ONNX file in onnxruntime (CPUExecutionProvider), outputs as numpy.

The ratios are eager time / onnxruntime time (above 1: onnxruntime is faster); with one thread
the CPU time of the calling thread is measured too (both runtimes compute in it), which a shared,
loaded machine disturbs much less than the wall time. The agreement
columns compare onnxruntime's candidates with eager ``model.candidates`` on the first tile:
candidate counts, and the largest box difference after pairing each eager row with the nearest
onnxruntime row of its label. The load average of the machine is printed with the table: on a
shared machine every number moves with it.

Writes ``benchmarks/results/export_latency.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_name  # benchmarks/common.py

from locconf.export import OnnxDetector, candidates_from_outputs, export_network, export_onnx, prepare_images
from locconf.models import build_one_stage, build_rcnn

SIZE = 400
COMMON = dict(backbone="resnet18", fpn_channels=128, returned_layers=(2, 3, 4), min_size=SIZE, max_size=SIZE)
FAMILIES = {
    "rcnn": dict(quality=None),
    "iou_net": dict(quality="iou_net"),
    "dir": dict(quality="dir"),
    "dir_foresight": dict(quality="dir_foresight"),
    "iou_direct": dict(quality="iou_direct"),
    "kl": dict(quality="kl"),
    "cascade_dir": dict(quality="dir", cascade=(0.5, 0.6, 0.7)),
    "atss": dict(head="atss"),
    "gfl": dict(head="gfl"),
    "clq": dict(head="clq"),
}
NEON_VAL = Path(__file__).resolve().parents[1] / "data" / "neon" / "val"


def build(family: str, candidates: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(FAMILIES[family], score_thresh=0.0, candidates_per_image=candidates, **COMMON)
    if "head" in kwargs:
        return build_one_stage(1, **kwargs).eval()
    return build_rcnn(1, quality_representation_size=1024, **kwargs).eval()


def neon_tiles() -> torch.Tensor:
    from PIL import Image

    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
              for p in sorted(NEON_VAL.glob("*.png"))]
    if not images:
        raise SystemExit(f"no NEON tiles in {NEON_VAL}: run `locconf data neon-trees --out data/neon`")
    return prepare_images(images, (SIZE, SIZE))[0]


def agreement(model, detector: OnnxDetector, image: torch.Tensor) -> tuple[int, int, float]:
    """(eager count, onnxruntime count, largest box difference of paired rows, px)."""
    ref = model.candidates([image])[0]
    got = candidates_from_outputs(detector.run(image[None]))[0]
    if len(ref["boxes"]) == 0 or len(got["boxes"]) == 0:
        return len(ref["boxes"]), len(got["boxes"]), float("nan")
    dist = (ref["boxes"][:, None] - got["boxes"][None]).abs().amax(-1)
    dist[ref["labels"][:, None] != got["labels"][None]] = float("inf")
    return len(ref["boxes"]), len(got["boxes"]), float(dist.min(dim=1).values.max())


def median_ms(fn, images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this thread (ms) of ``fn(image)`` over the images."""
    fn(images[0])  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        for img in images:
            t, c = time.perf_counter(), time.thread_time()
            fn(img)
            cpu.append(time.thread_time() - c)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), 1e3 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("runs/export_latency"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_latency.md")
    args = parser.parse_args()
    import onnxruntime

    images = neon_tiles()
    load_start = os.getloadavg()
    rows = []
    for family in args.families:
        model = build(family, args.candidates)
        path = args.workdir / f"{family}_{SIZE}_c{args.candidates}.onnx"
        if not path.is_file():
            t = time.perf_counter()
            export_onnx(model, path, (SIZE, SIZE))
            print(f"{family}: exported in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        network = export_network(model, (SIZE, SIZE))
        for threads in args.threads:
            torch.set_num_threads(threads)
            detector = OnnxDetector(path, threads=threads)
            with torch.no_grad():
                eager = median_ms(lambda img: model.candidates([img]), images, args.repeats)
                fixed = median_ms(lambda img: network(img[None]), images, args.repeats)
            ort = median_ms(lambda img: detector.run(img[None]), images, args.repeats)
            n_ref, n_ort, diff = agreement(model, detector, images[0])
            rows.append((family, threads, eager, fixed, ort, n_ref, n_ort, diff))
            print(f"{family} x{threads}: eager {eager[0]:.0f} ms (cpu {eager[1]:.0f}), fixed {fixed[0]:.0f} ms "
                  f"(cpu {fixed[1]:.0f}), onnxruntime {ort[0]:.0f} ms (cpu {ort[1]:.0f}); "
                  f"candidates {n_ref} / {n_ort}, boxes within {diff:.1e} px", file=sys.stderr)
    load_end = os.getloadavg()
    lines = [f"Latency of the network up to the candidates, {SIZE} x {SIZE} NEON val tiles (11), batch 1, "
             f"ResNet-18 FPN P3-P6 (128 ch), random weights, score_thresh 0, {args.candidates} candidates / image; "
             f"{cpu_name()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider); "
             f"median of {args.repeats} x 11 images, round-robin. Load average (1 min) {load_start[0]:.1f} at the "
             f"start, {load_end[0]:.1f} at the end, on {os.cpu_count()} cores.", "",
             "Wall: median latency. CPU (one thread only): median CPU time of the calling thread, which both "
             "runtimes compute in with one thread; it counts the work, not the waiting, so it is the steadier "
             "figure on a shared machine.", "",
             "| family | threads | eager `model.candidates` ms | eager fixed-shape network ms | onnxruntime ms | "
             "eager / onnxruntime | fixed / onnxruntime | CPU ms eager / fixed / onnxruntime | CPU eager / onnxruntime "
             "| candidates eager / onnxruntime | box diff px |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for family, threads, eager, fixed, ort, n_ref, n_ort, diff in rows:
        cpu = (f"{eager[1]:.0f} / {fixed[1]:.0f} / {ort[1]:.0f} | {eager[1] / ort[1]:.2f}x" if threads == 1
               else "- | -")
        lines.append(f"| {family} | {threads} | {eager[0]:.0f} | {fixed[0]:.0f} | {ort[0]:.0f} | "
                     f"{eager[0] / ort[0]:.2f}x | {fixed[0] / ort[0]:.2f}x | {cpu} | {n_ref} / {n_ort} | {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n\nCommand: `OMP_NUM_THREADS=1 python benchmarks/export_latency.py "
                        + " ".join(sys.argv[1:]) + "`\n")


if __name__ == "__main__":
    main()
