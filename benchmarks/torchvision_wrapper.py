"""The cost of wrapping a torchvision detector: its own eval forward against the wrapper's ``detect``.

Run:  OMP_NUM_THREADS=1 python benchmarks/torchvision_wrapper.py [--repeats 3] [--sizes 400 600 800] [--device cpu]

For each family at torchvision's default settings (``fasterrcnn_resnet50_fpn``,
``retinanet_resnet50_fpn``, ``fcos_resnet50_fpn``: 91 COCO logits, ``min_size`` 800, the builders'
thresholds), the same model runs ``model(images)`` (torchvision: its pre-NMS selection and
``batched_nms``) and ``from_torchvision(model).detect(images)`` (the wrapper: the same selection
re-implemented, then locconf's hard NMS at the model's ``nms_thresh`` keeping ``detections_per_img``).
Both give the same detections (``tests/test_from_torchvision.py``); the ratio of their times is the
wrapper's overhead (target: at most 1.05). The one step that differs, torchvision's
``postprocess_detections`` against the wrapper's selection + locconf's NMS, is also timed alone on
the same head outputs (computed once), where the backbone's noise does not hide it.

No trained weights can be downloaded here. With random weights a detector scores almost nothing
above its threshold (RetinaNet's prior is 0.01 < 0.05), which would time an NMS of nothing; so the
class logits are spread (random, seeded) to give thousands of pre-NMS candidates per image, the
load of a trained model on a busy image; the candidate counts are printed. The models are timed
round-robin (one image each in turn, torchvision then the wrapper) and the medians are reported,
so that a slow spell of a shared machine hits both alike; on the CPU the time is the process's CPU
time (one thread), which other jobs on the machine do not inflate as they do wall time.

Prints a Markdown table and writes it to ``benchmarks/results/torchvision_wrapper.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import cpu_name  # benchmarks/common.py
from torch import nn

from locconf.models import from_torchvision
from locconf.postprocess import postprocess

BUILDERS = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")


def build(name: str) -> nn.Module:
    from torchvision.models import get_model_builder

    torch.manual_seed(0)
    model = get_model_builder(name)(weights=None, weights_backbone=None).eval()
    if hasattr(model, "head"):  # RetinaNet / FCOS: sigmoid logits, prior 0.01
        nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.01)
        nn.init.normal_(model.head.classification_head.cls_logits.bias, mean=-3.0, std=1.0)
    else:  # Faster R-CNN: softmax over 91 logits
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.01)
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.bias, std=2.0)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn`` takes: the process's CPU time on the CPU (one thread: the work done, which a
    busy shared machine does not inflate as it does wall time), wall time on CUDA."""
    sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    t = clock()
    fn()
    sync(device)
    return clock() - t


def head_outputs(wrapped, img: torch.Tensor) -> tuple:
    """The inputs of the step torchvision and the wrapper do differently, computed once:
    ``(torchvision's postprocess_detections call, the wrapper's selection + NMS call)``."""
    tv = wrapped.torchvision_model
    batch, _ = tv.transform([img])
    features = tv.backbone(batch.tensors)
    sizes = batch.image_sizes
    nms = dict(iou_threshold=wrapped.nms_thresh)
    if wrapped.family == "faster_rcnn":
        heads = tv.roi_heads
        proposals, _ = tv.rpn(batch, features)
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, sizes)))
        theirs = lambda: heads.postprocess_detections(logits, deltas, proposals, sizes)  # noqa: E731
        select = lambda: wrapped._rcnn_select(logits, deltas, proposals, sizes)  # noqa: E731
    else:
        features = list(features.values())
        out = tv.head(features)
        anchors = tv.anchor_generator(batch, features)
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        per_level = [n * (out["cls_logits"].shape[1] // sum(per_level)) for n in per_level]
        split = {k: list(v.split(per_level, dim=1)) for k, v in out.items()}
        theirs = lambda: tv.postprocess_detections(split, [list(a.split(per_level)) for a in anchors], sizes)  # noqa
        select = lambda: wrapped._dense_select(out, anchors[0], per_level, sizes)  # noqa: E731
    ours = lambda: [postprocess(c, "nms", wrapped.max_detections, **nms)  # noqa: E731
                    for c in wrapped._finish(select())]
    return theirs, ours


def run(name: str, images: list[torch.Tensor], repeats: int, device: torch.device) -> dict:
    model = build(name).to(device)
    wrapped = from_torchvision(model, background=True)  # COCO's convention: logit 0 unused
    with torch.no_grad():
        wrapped.detect(images[:1])  # warm-up (and the numba kernel's load)
        model(images[:1])
        counts = [len(c["boxes"]) for c in wrapped.candidates(images)]
        stages = [head_outputs(wrapped, img) for img in images]
        times = {"torchvision": [], "wrapper": [], "tv_post": [], "our_post": []}
        for r in range(repeats):
            for img, (theirs, ours) in zip(images, stages):
                times["torchvision"].append(timed(lambda: model([img]), device))
                times["wrapper"].append(timed(lambda: wrapped.detect([img]), device))
                times["tv_post"].append(timed(theirs, device))
                times["our_post"].append(timed(ours, device))
            print(f"  {name}: round {r + 1}/{repeats}", file=sys.stderr)
    return {"counts": counts, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 600, 800], help="square image sides")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "torchvision_wrapper.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, s, s, generator=g).to(device) for s in args.sizes]
    place = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    lines = [f"torchvision detector vs locconf's wrapper (`detect`), default settings (91 logits, min_size 800), "
             f"images {', '.join(f'{s} px' for s in args.sizes)}; {device.type} ({place}), "
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; {clock}, median of {args.repeats} x "
             f"{len(images)} images, round-robin", "",
             "| builder | pre-NMS candidates per image | torchvision forward s/image | wrapper detect s/image | "
             "ratio | post-processing: torchvision ms | wrapper (selection + locconf NMS) ms | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name in BUILDERS:
        r = run(name, images, args.repeats, device)
        lines.append(f"| {name} | {', '.join(map(str, r['counts']))} | {r['torchvision']:.3f} | {r['wrapper']:.3f} | "
                     f"{r['wrapper'] / r['torchvision']:.3f} | {1e3 * r['tv_post']:.1f} | {1e3 * r['our_post']:.1f} | "
                     f"{r['our_post'] / r['tv_post']:.2f} |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
