"""PrRoIPool vs torchvision RoIAlign: forward and forward+backward time, same boxes, same run.

Run:  python benchmarks/pooling.py [--repeats 5] [--device cpu]
Prints a Markdown table and writes it to benchmarks/results/pooling.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from common import cpu_name  # benchmarks/common.py
from torchvision.ops import MultiScaleRoIAlign, roi_align

from locconf.prroi_pool import MultiScalePrRoIPool, prroi_pool

IMAGE = 800
CHANNELS = 256
OUTPUT = 7


def realistic_boxes(k: int, image: int, generator: torch.Generator) -> torch.Tensor:
    """(k, 4) boxes with sides of 16-300 px (log-uniform), aspect 1:2-2:1, spread over the image."""
    side = torch.exp(torch.empty(k).uniform_(torch.log(torch.tensor(16.0)).item(), torch.log(torch.tensor(300.0)).item(),
                                             generator=generator))
    aspect = torch.exp(torch.empty(k).uniform_(-0.69, 0.69, generator=generator))
    wh = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], 1)
    ctr = torch.rand(k, 2, generator=generator) * image
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1).clamp(0, image)


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall time in ms over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def forward_backward(run: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    def fn() -> None:
        leaves = [t.detach().requires_grad_() for t in tensors]
        run(*leaves).sum().backward()

    return fn




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pooling.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []

    single = torch.randn(1, CHANNELS, IMAGE // 4, IMAGE // 4, generator=gen).to(device)
    pyramid = OrderedDict((f"p{k}", torch.randn(1, CHANNELS, IMAGE // 2**k, IMAGE // 2**k, generator=gen).to(device))
                          for k in (2, 3, 4, 5))
    ms_align = MultiScaleRoIAlign(list(pyramid), OUTPUT, sampling_ratio=2)
    ms_prroi = MultiScalePrRoIPool(list(pyramid), OUTPUT)
    shapes = [(IMAGE, IMAGE)]

    for k in (512, 2000):
        boxes = realistic_boxes(k, IMAGE, gen).to(device)
        rois = torch.cat([boxes.new_zeros(k, 1), boxes], 1)
        align = lambda f, r: roi_align(f, r, OUTPUT, 0.25, sampling_ratio=2)  # noqa: E731
        align_adapt = lambda f, r: roi_align(f, r, OUTPUT, 0.25, sampling_ratio=-1)  # noqa: E731
        prroi = lambda f, r: prroi_pool(f, r, OUTPUT, 0.25)  # noqa: E731
        ms_a = lambda p2, p3, p4, p5, b: ms_align(dict(zip(pyramid, (p2, p3, p4, p5))), [b], shapes)  # noqa: E731
        ms_p = lambda p2, p3, p4, p5, b: ms_prroi(dict(zip(pyramid, (p2, p3, p4, p5))), [b], shapes)  # noqa: E731
        feats = list(pyramid.values())
        with torch.no_grad():
            cases = [
                ("200x200 map", "forward", lambda: align(single, rois), lambda: align_adapt(single, rois),
                 lambda: prroi(single, rois)),
                ("FPN P2-P5", "forward", lambda: ms_a(*feats, boxes), None, lambda: ms_p(*feats, boxes)),
            ]
            for setting, kind, a, a2, p in cases:
                rows.append((setting, k, kind, timed(a, args.repeats, device),
                             timed(a2, args.repeats, device) if a2 else None, timed(p, args.repeats, device)))
        rows.append(("200x200 map", k, "fwd+bwd (features)",
                     timed(forward_backward(lambda f: align(f, rois), single), args.repeats, device),
                     timed(forward_backward(lambda f: align_adapt(f, rois), single), args.repeats, device),
                     timed(forward_backward(lambda f: prroi(f, rois), single), args.repeats, device)))
        rows.append(("200x200 map", k, "fwd+bwd (features+boxes)", None, None,
                     timed(forward_backward(lambda f, r: prroi(f, torch.cat([rois[:, :1], r], 1)), single, boxes),
                           args.repeats, device)))
        rows.append(("200x200 map", k, "fwd+bwd (boxes only)", None, None,
                     timed(forward_backward(lambda r: prroi(single, torch.cat([rois[:, :1], r], 1)), boxes),
                           args.repeats, device)))
        rows.append(("FPN P2-P5", k, "fwd+bwd (features)",
                     timed(forward_backward(lambda *f: ms_a(*f, boxes), *feats), args.repeats, device), None,
                     timed(forward_backward(lambda *f: ms_p(*f, boxes), *feats), args.repeats, device)))

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    lines = [
        "# PrRoIPool vs RoIAlign",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Device: {device}; CPU: {cpu_name()}; torch.get_num_threads() = {torch.get_num_threads()}; "
        f"torch {torch.__version__}  ",
        f"C = {CHANNELS}, output {OUTPUT}x{OUTPUT}, boxes 16-300 px (log-uniform sides, aspect 1:2-2:1) in an "
        f"{IMAGE}x{IMAGE} image, one image; median of {args.repeats} runs after a warm-up, ms. "
        "RoIAlign uses sampling_ratio=2 (as MultiScaleRoIAlign in torchvision's Faster R-CNN); the adaptive "
        "column is roi_align's default sampling_ratio=-1. Ratio = PrRoIPool / RoIAlign(sampling_ratio=2). "
        "RoIAlign has no gradient to the boxes, hence n/a.",
        "",
        "| setting | boxes | pass | RoIAlign sr=2 | RoIAlign adaptive | PrRoIPool | ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for setting, k, kind, a, a2, p in rows:
        ratio = f"{p / a:.2f}x" if a else "n/a"
        lines.append(f"| {setting} | {k} | {kind} | {ms(a)} | {ms(a2)} | {ms(p)} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
