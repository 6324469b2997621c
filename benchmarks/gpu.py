"""GPU speed of locconf: post-processing against torchvision's CUDA NMS, and a training step per variant.

    python benchmarks/gpu.py postprocess --out benchmarks/results/device/postprocess.md
    python benchmarks/gpu.py train-step --out benchmarks/results/device/train_step.md
    python benchmarks/gpu.py postprocess --device cpu --sizes 1000   # the code path, without a GPU

``postprocess``: the inputs of ``benchmarks/postprocess.py`` (detector-like boxes, 1 and 80 classes)
on the GPU. For each size the table gives torchvision's CUDA ``batched_nms`` in ms, every locconf
method as a ratio to it (CUDA events around each call, interleaved repeats, medians), locconf's
CPU path on the same boxes as a ratio to its own CUDA time (the speed-up of the GPU path), and
whether the kept boxes and scores equal the CPU path's.

``train-step``: every detector of the accuracy harness (``benchmarks/accuracy.py``, NEON setting:
ImageNet EfficientNet-Lite0, 400 px, batch 2) and torchvision's Faster R-CNN on the same backbone
settings, side by side: every model is built first, then iteration i of each runs in turn (so a
varying load hits them alike); the median time of one SGD iteration (forward, backward, step; CUDA
synchronised) over ``--iters`` iterations after ``--warmup``, in fp32 and, on CUDA, with mixed
precision (what ``train()`` uses there by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import postprocess as bench  # noqa: E402  benchmarks/postprocess.py: the inputs and the method table
from common import cpu_name  # noqa: E402



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device) -> float:
    """Wall milliseconds of one call, the device synchronised before and after."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - t)


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict:
    for fn in fns.values():  # warm-up (kernels compiled / loaded)
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed_ms(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def _same(a, b) -> bool:
    """Whether two post-processing results (keep, scores[, boxes]) agree: indices equal, floats close."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        x, y = x.cpu(), y.cpu()
        if x.shape != y.shape:
            return False
        if x.dtype.is_floating_point:
            if not torch.allclose(x, y, rtol=1e-4, atol=1e-4):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def postprocess_table(sizes, classes, repeats: int, device: torch.device, cpu_max: int) -> str:
    names = list(bench.METHODS)
    header = ["N", "classes", "torchvision batched_nms (ms)"] + [f"{m} (x)" for m in names]
    header += [f"{m}: CPU / GPU" for m in names] + ["same as CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in sizes:
        for c in classes:
            cpu_args = bench.detector_like(n, c)
            args = tuple(t.to(device) for t in cpu_args)
            fns = {bench.PEER: lambda: bench.torchvision_nms(*args)}
            fns.update({m: (lambda fn=fn: fn(*args)) for m, fn in bench.METHODS.items()})
            reps = repeats if n <= 20000 else max(3, repeats // 3)
            ms = interleaved(fns, reps, device)
            base = ms[bench.PEER]
            row = [str(n), str(c), f"{base:.2f}"] + [f"{ms[m] / base:.2f}" for m in names]
            same = []
            for m, fn in bench.METHODS.items():
                if n > cpu_max:
                    row.append("-")
                    continue
                fn(*cpu_args)  # warm-up: the first CPU call loads the numba kernel
                cpu_ms = statistics.median(timed_ms(lambda: fn(*cpu_args), torch.device("cpu"))
                                           for _ in range(max(1, reps // 3)))
                row.append(f"{cpu_ms / ms[m]:.1f}")
                same.append(_same(fn(*args), fn(*cpu_args)))
            row.append("-" if not same else ("yes" if all(same) else f"NO ({same.count(False)} differ)"))
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def _harness():
    import accuracy  # benchmarks/accuracy.py

    return accuracy


def _batches(train_ds, n: int, device: torch.device) -> list:
    from locconf.data import collate_fn

    out = []
    for i in range(n):
        images, targets = collate_fn([train_ds[(2 * i) % len(train_ds)], train_ds[(2 * i + 1) % len(train_ds)]])
        out.append(([im.to(device) for im in images],
                    [{k: t.to(device) if torch.is_tensor(t) else t for k, t in tg.items()} for tg in targets]))
    return out


def _stepper(name: str, cfg: dict, amp: bool, device: torch.device):
    """A function doing one SGD step of a fresh model (seed 0) on the batch it is given."""
    from locconf import experiment

    torch.manual_seed(0)
    model = experiment.build_model(**cfg["model"]).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step(images, targets):
        with torch.autocast(device.type, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss {loss.item()}")

    return step


def train_step_table(iters: int, warmup: int, device: torch.device, variants: list[str]) -> str:
    """Every variant's step, round-robin (iteration i of every model, then i + 1, ...), so that a
    varying load on a shared machine hits them alike; medians after ``warmup``."""
    from locconf.experiment import build_datasets

    acc = _harness()
    setting = acc.neon_setting(iterations=iters)
    train_ds, _, _ = build_datasets(**setting.data)
    batches = _batches(train_ds, warmup + iters, device)
    names = [n for n in variants if not acc.ALL_VARIANTS[n].reuse]
    cfgs = {n: acc.make_config(setting, acc.ALL_VARIANTS[n], 0, "unused", train_ds.num_classes) for n in names}
    med = {}
    for amp in ([False, True] if device.type == "cuda" else [False]):
        steps = {n: _stepper(n, cfgs[n], amp, device) for n in names}
        times = {n: [] for n in names}
        for images, targets in batches:
            for n, step in steps.items():
                times[n].append(timed_ms(lambda: step(images, targets), device))
        for n in names:
            med[n, amp] = statistics.median(times[n][warmup:])
            print(n, "AMP" if amp else "fp32", f"{med[n, amp]:.1f} ms", flush=True)
        del steps
    ref = med.get(("tv_frcnn", False))
    header = ["variant", "fp32 (ms/iter)", "AMP (ms/iter)", "vs torchvision Faster R-CNN (fp32)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in names:
        amp = med.get((n, True))
        lines.append(f"| {n} | {med[n, False]:.1f} | {'-' if amp is None else f'{amp:.1f}'} | "
                     f"{'-' if ref is None else f'{med[n, False] / ref:.2f}'} |")
    return "\n".join(lines)


def _where(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{device.type} ({gpu}); CPU {cpu_name()}, {torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["postprocess", "train-step"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 100000])
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 80])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--cpu-max", type=int, default=20000, help="time the CPU path up to this many boxes")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=None, help="train-step: default every harness variant + tv_frcnn")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (pass --device cpu to exercise the code path)")
    if args.part == "postprocess":
        table = postprocess_table(args.sizes, args.classes, args.repeats, device, args.cpu_max)
        text = (f"{table}\n\nCommand: `python benchmarks/gpu.py postprocess` on {_where(device)}. Columns (x): "
                "each method's median time over torchvision's `batched_nms` on the same boxes and device, "
                "interleaved in one run; `CPU / GPU`: locconf's CPU path on the same boxes over its GPU time "
                f"(timed up to {args.cpu_max} boxes); `same as CPU`: kept indices equal and scores within 1e-4.\n")
    else:
        acc = _harness()
        names = args.variants or [n for n in acc.ALL_VARIANTS if not acc.ALL_VARIANTS[n].reuse]
        table = train_step_table(args.iters, args.warmup, device, names)
        text = (f"{table}\n\nCommand: `python benchmarks/gpu.py train-step` on {_where(device)}. One SGD "
                "iteration of each detector of `benchmarks/accuracy.py --setting neon` (batch 2, 400 px, NEON "
                f"training tiles without augmentation), the models stepped round-robin: median of {args.iters} "
                f"after {args.warmup} warm-up, synchronised; the last column is fp32 time over torchvision's Faster R-CNN (`tv_frcnn`) "
                "built from the same backbone and settings.\n")
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
