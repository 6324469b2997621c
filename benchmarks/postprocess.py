"""Speed and memory of locconf's post-processing against torchvision's hard NMS and ensemble-boxes' Soft-NMS.

    python benchmarks/postprocess.py                      # everything -> benchmarks/results/postprocess.md
    python benchmarks/postprocess.py --sizes 1000 --no-memory --no-first-call   # quick look

Three parts:

1. Speed. Inputs are identical for every method: boxes clustered around objects as a detector
   produces them (about 50 candidates per object, jittered around it, in a 1000 x 1000 image),
   scores uniform in [0, 1], 1 or 80 classes. Every repeat times every method once, in turn
   (interleaved, so that the load of a shared machine hits all of them alike; 3x the repeats up
   to 5,000 boxes, half above 20,000); the table gives medians, and ratios against
   ``torchvision.ops.batched_nms`` on the same boxes.
2. Memory. Each (input, method) runs in a fresh process: the time of one call and its peak
   resident memory above the process's memory just before the call (the kernel's peak-RSS mark
   is reset before the call; ``ru_maxrss`` would not do, as it survives fork and exec from this
   1 GB parent), for 100,000 detector-like boxes and for 100,000 / 10,000 identical boxes (every
   pair overlaps), with torchvision's hard NMS in the same rows.
3. First call. A fresh process imports locconf and times its first call: with an empty kernel
   cache (the one-time compilation), with the cache filled, and with numba's own one-time
   initialisation done beforehand. ``benchmarks/first_call.py`` measures the first call in more
   cases (medians of repeated processes, a read-only package, the loading as before).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name  # benchmarks/common.py
import torchvision

from locconf import postprocess as pp

HERE = Path(__file__).resolve().parent


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


def identical(n: int, seed: int = 0):
    """``n`` copies of one box, random scores: every pair overlaps with IoU 1."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[100.0, 200.0, 300.0, 350.0]]).repeat(n, 1)
    return (boxes, torch.rand(n, generator=g), torch.zeros(n, dtype=torch.long), torch.rand(n, generator=g),
            0.5 + torch.rand(n, 4, generator=g))


METHODS = {
    "soft-gaussian": lambda b, s, l, q, v: pp.soft_nms(b, s, l, method="gaussian"),
    "soft-linear": lambda b, s, l, q, v: pp.soft_nms(b, s, l, method="linear"),
    "iou-guided": lambda b, s, l, q, v: pp.iou_guided_nms(b, s, q, l),
    "quality": lambda b, s, l, q, v: pp.quality_nms(b, s, q, l),
    "var-voting": lambda b, s, l, q, v: pp.var_voting(b, s, v, l),
    "var-voting+soft": lambda b, s, l, q, v: pp.var_voting(b, s, v, l, suppression="soft"),
    "nms (locconf)": lambda b, s, l, q, v: pp.nms(b, s, l),
}
PEER = "torchvision nms"


def torchvision_nms(b, s, l, q, v):
    return torchvision.ops.batched_nms(b, s, l, 0.5)


def ensemble_soft_nms(boxes, scores, labels):
    from ensemble_boxes import soft_nms

    lo, hi = boxes.min(), boxes.max()
    unit = ((boxes - lo) / (hi - lo)).numpy()
    return soft_nms([unit], [scores.numpy()], [labels.numpy()], method=2, iou_thr=0.3, sigma=0.5, thresh=1e-3)


# --------------------------------------------------------------------------------------------
# 1. Speed
# --------------------------------------------------------------------------------------------


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each function; each repeat runs every function once, in turn."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def speed_table(sizes, classes, repeats, ensemble_max) -> tuple[str, list[str]]:
    header = ["N", "classes", f"{PEER} (ms)"] + [f"{m} (x)" for m in METHODS]
    header += ["ensemble-boxes soft (ms)", "locconf soft-gaussian speed-up vs ensemble-boxes"]
    rows, notes = [], []
    for n in sizes:
        for c in classes:
            args = detector_like(n, c)
            fns = {PEER: lambda: torchvision_nms(*args)}
            fns.update({name: (lambda fn=fn: fn(*args)) for name, fn in METHODS.items()})
            with_peer = n <= ensemble_max
            if with_peer:
                fns["ensemble-boxes"] = lambda: ensemble_soft_nms(*args[:3])
            ms = interleaved_ms(fns, 3 * repeats if n <= 5000 else repeats if n <= 20000 else max(3, repeats // 2))
            base = ms[PEER]
            row = [str(n), str(c), f"{base:.2f}"] + [f"{ms[name] / base:.2f}" for name in METHODS]
            if with_peer:
                row += [f"{ms['ensemble-boxes']:.1f}", f"{ms['ensemble-boxes'] / ms['soft-gaussian']:.0f}x"]
            else:
                row += ["-", "-"]
            rows.append(row)
            print(" | ".join(row), flush=True)
            if c == 1:
                b, s, l = args[:3]
                kept = len(torchvision.ops.batched_nms(b, s, l, 0.5))
                soft = len(pp.soft_nms(b, s, l)[0])
                pairs = int((torchvision.ops.box_iou(b, b) > 0).sum() - n) // 2 if n <= 5000 else None
                notes.append(f"N={n}, 1 class: hard NMS keeps {kept} boxes, Gaussian Soft-NMS {soft}"
                             + (f"; {pairs} pairs overlap (IoU > 0)" if pairs is not None else ""))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines), notes


# --------------------------------------------------------------------------------------------
# 2. Memory, one fresh process per (input, method)
# --------------------------------------------------------------------------------------------

_MEMORY_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import postprocess as bench

def status(key):  # MiB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

case, n, method = sys.argv[2], int(sys.argv[3]), sys.argv[4]
fn = bench.torchvision_nms if method == bench.PEER else bench.METHODS[method]
args = bench.detector_like(n, 1) if case == "detector-like" else bench.identical(n)
fn(*(a[:64] for a in args))  # warm-up: loads the numba kernel
try:  # reset the peak resident memory to the current one (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
rss = status("VmRSS")
t = time.perf_counter()
fn(*args)
dt = time.perf_counter() - t
peak = status("VmHWM")
print(json.dumps({"s": dt, "growth_mb": peak - rss, "peak_mb": peak, "reset": reset}))
"""


def memory_table(cases, timeout: float) -> str:
    names = [PEER] + list(METHODS)
    header = ["input", "N"] + [f"{m}: s / MiB" for m in names]
    rows = []
    for case, n in cases:
        row = [case, str(n)]
        for name in names:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            try:
                res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(HERE), case, str(n), name],
                                     capture_output=True, text=True, timeout=timeout, env=env)
                if res.returncode != 0:
                    last = (res.stderr.strip().splitlines() or ["?"])[-1]
                    row.append(f"failed: {last[:60]}")
                else:
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    row.append(f"{r['s']:.3f} / {r['growth_mb']:.0f}" + ("" if r["reset"] else " (upper bound)"))
            except subprocess.TimeoutExpired:
                row.append(f"> {timeout:.0f} s")
            print(case, n, name, row[-1], flush=True)
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# 3. The first call in a fresh process
# --------------------------------------------------------------------------------------------

_FIRST_CHILD = r"""
import json, sys, time
import torch
t0 = time.perf_counter()
from locconf import postprocess as pp
t1 = time.perf_counter()
if sys.argv[1] == "numba-initialised":
    from numba.core.registry import cpu_target
    cpu_target.target_context.refresh()  # numba's own one-time set-up, as any numba user pays it
g = torch.Generator().manual_seed(0)
b = torch.rand(200, 4, generator=g) * 100
b[:, 2:] += b[:, :2]
cand = dict(boxes=b, scores=torch.rand(200, generator=g), labels=torch.zeros(200, dtype=torch.long))
t2, c2 = time.perf_counter(), time.process_time()
pp.postprocess(cand, "soft-gaussian")
t3, c3 = time.perf_counter(), time.process_time()
pp.postprocess(cand, "nms")
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_s": t3 - t2, "first_cpu_s": c3 - c2, "second_s": t4 - t3}))
"""


def first_call() -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, OMP_NUM_THREADS="1", LOCCONF_CACHE=cache)  # an empty kernel cache (locconf.jit)
        for label, mode in [("empty numba cache (compiles)", "plain"), ("cache filled", "plain"),
                            ("cache filled", "plain"), ("cache filled, numba initialised before", "numba-initialised")]:
            res = subprocess.run([sys.executable, "-c", _FIRST_CHILD, mode], capture_output=True, text=True,
                                 env=env, timeout=600)
            if res.returncode != 0:
                out.append(f"{label}: failed: {res.stderr.strip()[-300:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            out.append(f"{label}: import locconf.postprocess {r['import_s']:.2f} s, first call "
                       f"(soft-gaussian, 200 boxes) {r['first_s']:.3f} s ({r['first_cpu_s']:.3f} s of CPU), "
                       f"next call (nms) {r['second_s'] * 1e3:.1f} ms")
            print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 100000])
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 80])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ensemble-max", type=int, default=20000,
                    help="run the (quadratic) ensemble-boxes peer up to this many boxes")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory table (a process per cell)")
    ap.add_argument("--no-first-call", action="store_true", help="skip the first-call timings")
    ap.add_argument("--memory-timeout", type=float, default=300)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "postprocess.md")
    args = ap.parse_args()

    table, notes = speed_table(args.sizes, args.classes, args.repeats, args.ensemble_max)
    parts = [table, "", (
        f"Command: `python benchmarks/postprocess.py` · {cpu_name()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, torchvision {torchvision.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} at the end. Columns (x) are the median time of each locconf method "
        "divided by torchvision's batched_nms on the same boxes, measured interleaved in the same run; "
        "the last two columns compare Gaussian Soft-NMS with ensemble-boxes (not run above "
        f"{args.ensemble_max} boxes: it is quadratic)."
    ), ""] + [f"- {x}" for x in notes]
    if not args.no_memory:
        cases = [("detector-like", 100000), ("identical", 100000), ("identical", 10000)]
        parts += ["", "One call in a fresh process (one class): seconds / MiB, the peak resident memory "
                  "during the call (reset before it through /proc/self/clear_refs) less the resident "
                  "memory just before it; the process itself holds about 0.8 GB of torch and numba.", "",
                  memory_table(cases, args.memory_timeout)]
    if not args.no_first_call:
        parts += ["", "First call in a fresh process (4 processes, in this order, sharing one numba cache "
                  "directory that starts empty):", ""] + [f"- {x}" for x in first_call()]
    text = "\n".join(parts) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
