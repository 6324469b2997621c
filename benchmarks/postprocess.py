"""Speed of locconf's post-processing against torchvision's hard NMS and ensemble-boxes' Soft-NMS.

    python benchmarks/postprocess.py                 # full table -> benchmarks/results/postprocess.md
    python benchmarks/postprocess.py --sizes 1000    # quick look

Inputs are identical for every method: boxes clustered around objects as a detector produces
them (about 50 candidates per object, jittered around it, in a 1000 x 1000 image), scores
uniform in [0, 1], 1 or 80 classes. Times are medians over repeats, ratios are against
``torchvision.ops.batched_nms`` measured in the same run on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name  # benchmarks/common.py
import torchvision

from locconf import postprocess as pp


def detector_like(n: int, num_classes: int, seed: int = 0, size: float = 1000.0):
    g = torch.Generator().manual_seed(seed)
    n_obj = max(1, n // 50)
    centres = torch.rand(n_obj, 2, generator=g) * size
    sizes = 20 + torch.rand(n_obj, 2, generator=g) * 150
    obj = torch.randint(0, n_obj, (n,), generator=g)
    ctr = centres[obj] + torch.randn(n, 2, generator=g) * sizes[obj] * 0.15
    wh = sizes[obj] * torch.exp(torch.randn(n, 2, generator=g) * 0.15)
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    quality = torch.rand(n, generator=g)
    variances = 0.5 + torch.rand(n, 4, generator=g) * 5
    return boxes, scores, labels, quality, variances


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and numba compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ensemble_soft_nms(boxes, scores, labels):
    from ensemble_boxes import soft_nms

    lo, hi = boxes.min(), boxes.max()
    unit = ((boxes - lo) / (hi - lo)).numpy()
    return soft_nms([unit], [scores.numpy()], [labels.numpy()], method=2, iou_thr=0.3, sigma=0.5, thresh=1e-3)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 80])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-ensemble", action="store_true", help="skip the (slow) ensemble-boxes peer")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "postprocess.md")
    args = ap.parse_args()

    methods = {
        "soft-gaussian": lambda b, s, l, q, v: pp.soft_nms(b, s, l, method="gaussian"),
        "soft-linear": lambda b, s, l, q, v: pp.soft_nms(b, s, l, method="linear"),
        "iou-guided": lambda b, s, l, q, v: pp.iou_guided_nms(b, s, q, l),
        "quality": lambda b, s, l, q, v: pp.quality_nms(b, s, q, l),
        "var-voting": lambda b, s, l, q, v: pp.var_voting(b, s, v, l),
        "var-voting+soft": lambda b, s, l, q, v: pp.var_voting(b, s, v, l, suppression="soft"),
        "nms (locconf)": lambda b, s, l, q, v: pp.nms(b, s, l),
    }
    header = ["N", "classes", "torchvision nms (ms)"] + [f"{m} (x)" for m in methods]
    header += ["ensemble-boxes soft (ms)", "locconf soft-gaussian speed-up vs ensemble-boxes"]
    rows, notes = [], []
    for n in args.sizes:
        for c in args.classes:
            b, s, l, q, v = detector_like(n, c)
            base = median_ms(lambda: torchvision.ops.batched_nms(b, s, l, 0.5), args.repeats)
            row = [str(n), str(c), f"{base:.2f}"]
            soft_ms = None
            for name, fn in methods.items():
                ms = median_ms(lambda: fn(b, s, l, q, v), args.repeats)
                soft_ms = ms if name == "soft-gaussian" else soft_ms
                row.append(f"{ms / base:.2f}")
            if args.no_ensemble:
                row += ["-", "-"]
            else:
                peer = median_ms(lambda: ensemble_soft_nms(b, s, l), 1 if n > 5000 else 3)
                row += [f"{peer:.1f}", f"{peer / soft_ms:.0f}x"]
            rows.append(row)
            print(" | ".join(row), flush=True)
            if c == 1:
                kept = len(torchvision.ops.batched_nms(b, s, l, 0.5))
                pairs = int((torchvision.ops.box_iou(b, b) > 0).sum() - n) // 2 if n <= 5000 else None
                notes.append(f"N={n}, 1 class: hard NMS keeps {kept} boxes"
                             + (f"; {pairs} pairs overlap (IoU > 0)" if pairs is not None else ""))

    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    table = "\n".join(lines)
    meta = (
        f"Command: `python benchmarks/postprocess.py` · {cpu_name()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, torchvision {torchvision.__version__}. Columns (x) are the "
        "median time of each locconf method divided by torchvision's batched_nms on the same boxes "
        "in the same run; the last two columns compare Gaussian Soft-NMS with ensemble-boxes."
    )
    meta += "\n\n" + "\n".join(f"- {x}" for x in notes)
    print("\n" + table + "\n\n" + meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n\n" + meta + "\n")


if __name__ == "__main__":
    main()
