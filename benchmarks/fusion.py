"""Speed of locconf's box fusion (locconf.fusion.fuse) against ensemble-boxes' weighted_boxes_fusion.

    python benchmarks/fusion.py                       # table -> benchmarks/results/fusion.md
    python benchmarks/fusion.py --models 3 --sizes 5000 --classes 1

Scenes: M models detect the same objects in a 1000 x 1000 image, scores uniform in [0, 1], 1 or 80
classes, each model giving N boxes jittered around the objects:

* ``candidates``: about 50 boxes per object and model (raw candidates, before NMS), objects of
  20-170 px; clusters are large.
* ``detections``: one box per object and model (each model's detections after NMS, as WBF is
  usually fed), N objects of 5-40 px (a crowded scene); clusters have about M members.

Both libraries get the same boxes: ensemble-boxes the coordinates divided by 1000 (it
wants [0, 1]; no box is outside), locconf the pixels. Times are medians over repeats, measured in
the same run; the agreement column is the largest difference between the two outputs (boxes in
[0, 1] units, scores), after matching each fused box of one to one of the other.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_name  # benchmarks/common.py

from locconf.fusion import fuse


def scene(kind: str, models: int, n: int, num_classes: int, seed: int = 0, size: float = 1000.0) -> list[dict]:
    """Boxes of ``models`` detectors around the same objects, inside [0, size] (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n_obj = max(1, n // 50) if kind == "candidates" else n
    lo, span = (20.0, 150.0) if kind == "candidates" else (5.0, 35.0)
    centres = torch.rand(n_obj, 2, generator=g, dtype=torch.float64) * size
    sizes = lo + torch.rand(n_obj, 2, generator=g, dtype=torch.float64) * span
    obj_labels = torch.randint(0, num_classes, (n_obj,), generator=g)
    lists = []
    for _ in range(models):
        obj = torch.randint(0, n_obj, (n,), generator=g) if kind == "candidates" else torch.arange(n)
        ctr = centres[obj] + torch.randn(n, 2, generator=g, dtype=torch.float64) * sizes[obj] * 0.1
        wh = sizes[obj] * torch.exp(torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.1)
        boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1).clamp(0, size)
        lists.append({"boxes": boxes, "scores": torch.rand(n, generator=g, dtype=torch.float64),
                      "labels": obj_labels[obj]})
    return lists


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up (and numba compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ensemble_wbf(lists: list[dict], size: float = 1000.0):
    from ensemble_boxes import weighted_boxes_fusion

    return weighted_boxes_fusion([(c["boxes"] / size).numpy() for c in lists], [c["scores"].numpy() for c in lists],
                                 [c["labels"].numpy() for c in lists], iou_thr=0.55, skip_box_thr=0.0)


@contextlib.contextmanager
def float64_peer():
    """ensemble-boxes with its fused boxes accumulated in float64 instead of float32 (a diagnostic).

    Its ``get_weighted_box`` sums ``score * box`` of a cluster's members into a float32 array, so a
    box whose IoU with a cluster is within float32 rounding of another cluster's (or of the
    threshold) may go elsewhere than in exact arithmetic. This swaps in the same weighted mean in
    float64 for the duration of the block.
    """
    import ensemble_boxes.ensemble_boxes_wbf as wbf

    def weighted_box(members, conf_type="avg"):
        m = np.asarray(members, dtype=np.float64)  # rows: label, score * weight, weight, model, x1, y1, x2, y2
        out = np.empty(8)
        out[0], out[2], out[3] = m[0, 0], m[:, 2].sum(), -1
        out[1] = m[:, 1].max() if conf_type == "max" else m[:, 1].mean()
        out[4:] = (m[:, 1:2] * m[:, 4:]).sum(0) / m[:, 1].sum()
        return out

    original = wbf.get_weighted_box
    wbf.get_weighted_box = weighted_box
    try:
        yield
    finally:
        wbf.get_weighted_box = original


def max_difference(ours: dict, peer, size: float = 1000.0) -> float:
    """Largest |difference| of boxes (in [0, 1] units) and scores, each peer row matched to one of ours."""
    boxes, scores, labels = peer
    if len(boxes) != ours["boxes"].shape[0]:
        return float("inf")
    mine = np.c_[(ours["boxes"] / size).numpy(), ours["scores"].numpy()]
    mine_labels = ours["labels"].numpy()
    used = np.zeros(len(mine), dtype=bool)
    worst = 0.0
    for b, s, lab in zip(boxes, scores, labels):
        d = np.abs(mine - np.r_[b, s]).max(1)
        d[used | (mine_labels != int(lab))] = np.inf
        j = int(d.argmin())
        used[j] = True
        worst = max(worst, float(d[j]))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", nargs="+", default=["candidates", "detections"], choices=["candidates", "detections"])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="boxes per model")
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 80])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fusion.md")
    args = ap.parse_args()

    header = ["scene", "models x boxes", "classes", "fused boxes", "ensemble-boxes WBF (ms)", "locconf fuse, score (ms)",
              "speed-up", "locconf quality (ms)", "locconf variance (ms)", "max difference",
              "max difference, float64 peer"]
    rows = []
    for kind, n, c in ((k, n, c) for k in args.scenes for n in args.sizes for c in args.classes):
        lists = scene(kind, args.models, n, c)
        g = torch.Generator().manual_seed(1)
        for cand in lists:  # signals for the other weightings (timing only)
            cand["quality"] = torch.rand(n, generator=g, dtype=torch.float64)
            cand["variances"] = 0.5 + torch.rand(n, 4, generator=g, dtype=torch.float64) * 5
        ours = {w: median_s(lambda: fuse(lists, weight=w), args.repeats) for w in ("score", "quality", "variance")}
        t = time.perf_counter()
        peer = ensemble_wbf(lists)
        peer_s = [time.perf_counter() - t]
        for _ in range(2 if n <= 5000 else 0):
            t = time.perf_counter()
            ensemble_wbf(lists)
            peer_s.append(time.perf_counter() - t)
        peer_s = statistics.median(peer_s)
        out = fuse(lists)
        diff = max_difference(out, peer)
        diff64 = "-"
        if diff > 1e-6:  # is it ensemble-boxes' float32 accumulation? rerun it in float64
            with float64_peer():
                diff64 = f"{max_difference(out, ensemble_wbf(lists)):.1e}"
        row = [kind, f"{args.models} x {n}", str(c), str(out["boxes"].shape[0]), f"{1e3 * peer_s:.1f}",
               f"{1e3 * ours['score']:.2f}", f"{peer_s / ours['score']:.0f}x", f"{1e3 * ours['quality']:.2f}",
               f"{1e3 * ours['variance']:.2f}", f"{diff:.1e}", diff64]
        rows.append(row)
        print(" | ".join(row), flush=True)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
    table = "\n".join(lines)
    meta = (
        f"Command: `python benchmarks/fusion.py` · {cpu_name()}, torch {torch.__version__} with "
        f"torch.get_num_threads() = {torch.get_num_threads()}, numba clustering on one core. IoU threshold 0.55, "
        "conf_type avg. "
        "Speed-up: ensemble-boxes' median time (3 runs; 1 above 5,000 boxes per model) divided by locconf's "
        f"score-weighted median ({args.repeats} runs after a warm-up), on the same scene in the same run. "
        "Max difference: the largest absolute difference between the two outputs (coordinates in [0, 1] "
        "units and scores) after matching fused boxes one to one. Where it exceeds 1e-6, the last column "
        "reruns ensemble-boxes with its fused boxes accumulated in float64 instead of float32 (`float64_peer` "
        "in the script): a box whose IoU with two clusters, or with the threshold, differs by less than float32 "
        "rounding can join another cluster there, which moves the fused boxes of both clusters."
    )
    print("\n" + table + "\n\n" + meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n\n" + meta + "\n")


if __name__ == "__main__":
    main()
