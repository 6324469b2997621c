"""Inference speed of every detector variant against the baseline, on identical inputs, in one run.

Run:  python benchmarks/inference.py [--candidates 100 1000] [--repeats 5] [--device cpu]

Every model is built at the NEON CPU setting (ResNet-18 FPN P3-P6, 128 channels, 400 x 400 input)
with random weights and the same seed, and runs ``model.candidates(images)`` (before any
post-processing) on the same images. Random weights score every proposal alike, so the number of
candidates is set explicitly (``score_thresh=0``, ``candidates_per_image=N``): the quality heads'
cost grows with it, and a trained model's count depends on its threshold (DIR's ``a``), so the
table is given at several counts. Variants are timed round-robin (one image each in turn) and the
median is reported, so that a slow spell of the machine hits every variant alike.

Prints a Markdown table (images/s, ms/image, ratio of time to the two-stage baseline and, for the
one-stage rows, to ATSS) and writes it to ``benchmarks/results/inference.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import cpu_name  # benchmarks/common.py

from locconf.models import build_rcnn

SIZE = 400
COMMON = dict(backbone="resnet18", fpn_channels=128, returned_layers=(2, 3, 4), min_size=SIZE, max_size=SIZE,
              channels_last=True)

TWO_STAGE = {
    "baseline (Faster R-CNN)": dict(quality=None),
    "IoU-Net": dict(quality="iou_net"),
    "IoU-Net + refinement (5 steps)": dict(quality="iou_net", refine_steps=5),
    "DIR": dict(quality="dir"),
    "DIR-foresight": dict(quality="dir_foresight"),
    "IoU-direct": dict(quality="iou_direct"),
    "KL-Loss": dict(quality="kl"),
}
ONE_STAGE = {"ATSS": "atss", "GFL": "gfl", "CLQ": "clq"}


def build(name: str, candidates: int, quality_width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in TWO_STAGE:
        return build_rcnn(1, score_thresh=0.0, candidates_per_image=candidates,
                          quality_representation_size=quality_width, **COMMON, **TWO_STAGE[name])
    from locconf.models.one_stage import build_one_stage

    return build_one_stage(1, head=ONE_STAGE[name], score_thresh=0.0, candidates_per_image=candidates, **COMMON)


def run(candidates: int, repeats: int, device: torch.device, quality_width: int, images: list[torch.Tensor]):
    names = list(TWO_STAGE)
    try:
        import locconf.models.one_stage  # noqa: F401

        names += list(ONE_STAGE)
    except ImportError:
        pass
    models = {n: build(n, candidates, quality_width).to(device).eval() for n in names}
    times = {n: [] for n in names}
    counts = {}
    with torch.no_grad():
        for n, m in models.items():  # warm-up (and candidate count)
            counts[n] = len(m.candidates(images[:1])[0]["boxes"])
        for r in range(repeats):
            for img in images:
                for n, m in models.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    m.candidates([img])
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[n].append(time.perf_counter() - t)
            print(f"  N={candidates}: round {r + 1}/{repeats}", file=sys.stderr)
    return {n: statistics.median(t) for n, t in times.items()}, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--quality-width", type=int, default=1024,
                        help="hidden width of the quality branches (the papers: 1024)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g).to(device) for _ in range(args.images)]
    lines = [f"Inference, {SIZE}x{SIZE}, ResNet-18 FPN P3-P6 (128 ch), random weights, model.candidates(images), "
             f"quality branches {args.quality_width} wide; {device.type} "
             f"({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} x "
             f"{args.images} images, round-robin.", ""]
    lines += ["| candidates / image | variant | images/s | ms / image | time vs baseline |",
              "|---:|---|---:|---:|---:|"]
    for n in args.candidates:
        med, counts = run(n, args.repeats, device, args.quality_width, images)
        base = med["baseline (Faster R-CNN)"]
        for name, t in med.items():
            ref = f"{t / base:.2f}x"
            if name in ONE_STAGE and "ATSS" in med:
                ref += f" ({t / med['ATSS']:.2f}x ATSS)"
            lines.append(f"| {counts[name]} | {name} | {1 / t:.2f} | {1e3 * t:.0f} | {ref} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n\nCommand: `python benchmarks/inference.py " + " ".join(sys.argv[1:]) + "`\n")


if __name__ == "__main__":
    main()
