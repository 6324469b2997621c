"""Running an accuracy comparison: train and evaluate every (variant, seed), aggregate, write the results.

Resumable: a run whose final checkpoint exists is not retrained (a partial one is resumed exactly),
a run whose evaluation exists is not re-evaluated, and the aggregates are always rebuilt from every
requested run on disk, so adding a seed later trains only that seed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml
from ..progress import progress_bar

from locconf.candidates import signals as _signals
from locconf.postprocess import REQUIRED_SIGNALS
from locconf.postprocess import METHODS

from .report import format_report, plot_summary
from .settings import ALL_VARIANTS, BASELINE, Setting, Variant, budget_text, make_config
from .stats import aggregate

log = logging.getLogger("locconf.bench")

#: Training keys that do not change the experiment (ignored when comparing a run's saved config): where and
#: how fast it ran. ``device`` and ``amp`` (mixed precision on CUDA) change the arithmetic, not the recipe;
#: both are recorded with each run (timing.json's ``hardware``), so a table that mixes CPU and GPU runs says so.
_VOLATILE_TRAIN_KEYS = ("device", "amp", "progress", "num_workers", "log_every", "checkpoint_every",
                        "keep_checkpoints")


def select_methods(signals: Iterable[str], methods: Sequence[str] = METHODS) -> list[str]:
    """The post-processing methods whose required candidate field (REQUIRED_SIGNALS) is among ``signals``."""
    have = set(signals)
    return [m for m in methods if REQUIRED_SIGNALS[m] is None or REQUIRED_SIGNALS[m] in have]


def candidate_signals(output: Mapping[str, Any]) -> list[str]:
    """Which localization signals (``quality``, ``variances``) one image's candidates carry."""
    return _signals(output)


# -- hardware ---------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's best guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware(device: str | None) -> dict:
    """Device, CPU, torch threads and library versions of this process."""
    import torchvision

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = f"CUDA ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "CPU"
    return {"device": name, "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


def _run_hardware(device: str | None, amp: bool | None = None) -> str:
    """One line naming where a run trained (kept with its timing: reruns may happen elsewhere)."""
    hw = hardware(device)
    precision = ""
    if hw["device"].startswith("CUDA"):  # train()'s default on CUDA is mixed precision
        precision = ", fp32" if amp is False else ", mixed precision"
    return f"{hw['device']}{precision}, {hw['cpu']}, {hw['threads']} threads"


# -- one run ----------------------------------------------------------------------------------


def _normalise(cfg: Mapping) -> dict:
    """A configuration as YAML would give it back, without the keys that do not change the model."""
    cfg = yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(dict(cfg), default=str)), sort_keys=True))
    cfg.setdefault("train", {})
    for key in _VOLATILE_TRAIN_KEYS:
        cfg["train"].pop(key, None)
    # the folder being compared is the run's own, however it was named when trained (relative,
    # absolute, or on the machine that trained it)
    cfg["train"].pop("out_dir", None)
    return cfg


def _check_saved_config(run_dir: Path, cfg: Mapping) -> None:
    """Refuse a run folder that holds a run of another configuration."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = _normalise(yaml.safe_load(saved.read_text()) or {})
    new = _normalise(cfg)
    if old != new:
        diff = sorted(f"{sec}.{k}" for sec in set(old) | set(new)
                      for k in set(old.get(sec, {})) | set(new.get(sec, {}))
                      if old.get(sec, {}).get(k) != new.get(sec, {}).get(k))
        raise ValueError(f"{run_dir} holds a run of a different configuration (differs in {', '.join(diff)}); "
                         "delete it or pass another --runs folder")


def seconds_per_iteration(metrics_file: Path) -> float | None:
    """Median of the ``time`` (seconds of one iteration) of the training records of a metrics.jsonl."""
    if not metrics_file.is_file():
        return None
    times = []
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "train" and isinstance(rec.get("time"), (int, float)):
            times.append(float(rec["time"]))
    return statistics.median(times) if times else None


def train_once(cfg: dict, progress: bool = False) -> dict:
    """Train unless the final checkpoint exists (a partial run is resumed); returns a timing record."""
    from locconf.engine.checkpoint import checkpoint_path
    from locconf.experiment import run_train

    run_dir = Path(cfg["train"]["out_dir"])
    final = checkpoint_path(run_dir, int(cfg["train"]["iterations"]))
    timing_file = run_dir / "timing.json"
    _check_saved_config(run_dir, cfg)
    if final.is_file():
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        return {"checkpoint": str(final), "status": "reused", "train_s": timing.get("train_s"),
                "s_per_iter": seconds_per_iteration(run_dir / "metrics.jsonl"), "hardware": timing.get("hardware")}
    cfg = copy.deepcopy(cfg)
    cfg["train"].setdefault("progress", progress)
    t0 = time.perf_counter()
    summary = run_train(cfg, resume=True)
    elapsed = time.perf_counter() - t0
    previous = json.loads(timing_file.read_text()).get("train_s", 0.0) if timing_file.is_file() else 0.0
    resumed = int(summary.get("start_step", 0)) > 0
    timing = {"train_s": elapsed + (previous if resumed else 0.0), "resumed_from_step": summary.get("start_step", 0),
              "hardware": _run_hardware(cfg["train"].get("device"), cfg["train"].get("amp"))}
    timing_file.write_text(json.dumps(timing, indent=1))
    if not final.is_file():
        raise RuntimeError(f"training finished without writing {final}")
    return {"checkpoint": str(final), "status": "resumed" if resumed else "trained", "train_s": timing["train_s"],
            "s_per_iter": seconds_per_iteration(run_dir / "metrics.jsonl"), "hardware": timing["hardware"]}


def records_only(run_dir: Path, eval_dir: Path, iterations: int) -> dict | None:
    """The timing record of a run whose weights are not here but whose records are, else None.

    A run trained and evaluated on another machine (a lent GPU) comes back as its small files
    (``config.yaml``, ``metrics.jsonl``, ``timing.json``, ``eval/results.json`` and ``record.json``),
    not its checkpoints; such a run is aggregated from them. Weights present, or any record missing:
    None (train / evaluate as usual). ``timing.json`` is written only after a training finished.
    """
    from locconf.engine.checkpoint import checkpoint_path

    timing_file = run_dir / "timing.json"
    if checkpoint_path(run_dir, iterations).is_file() or not timing_file.is_file():
        return None
    if not ((eval_dir / "results.json").is_file() and (eval_dir / "record.json").is_file()):
        return None
    timing = json.loads(timing_file.read_text())
    return {"checkpoint": None, "status": "records only", "train_s": timing.get("train_s"),
            "s_per_iter": seconds_per_iteration(run_dir / "metrics.jsonl"), "hardware": timing.get("hardware")}


def evaluate_once(checkpoint: str | Path, cfg: dict, eval_dir: Path, device: str | None = None,
                  progress: bool = False) -> dict:
    """Evaluate a checkpoint under every method its candidates support, unless already done."""
    from locconf.experiment import build_datasets, load_trained, run_eval

    results_file, record_file = eval_dir / "results.json", eval_dir / "record.json"
    if results_file.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        results = json.loads(results_file.read_text())
        return {**record, "methods": results["methods"], "correlation": results.get("correlation", {}),
                "eval_status": "reused"}
    t0 = time.perf_counter()
    model, cfg = load_trained(checkpoint, cfg=cfg, device=device)
    _, val_ds, _ = build_datasets(**cfg["data"])
    image, _ = val_ds[0]
    with torch.no_grad():
        probe = model.candidates([image.to(next(model.parameters()).device)])[0]
    signals = candidate_signals(probe)
    methods = select_methods(signals)
    out = run_eval(model, cfg, eval_dir, methods=methods, device=device, progress=progress)
    record = {"signals": signals, "methods_evaluated": methods, "eval_s": time.perf_counter() - t0,
              "checkpoint": str(checkpoint)}
    record_file.write_text(json.dumps(record, indent=1))
    return {**record, "methods": out["results"], "correlation": out["correlation"], "eval_status": "evaluated"}


def _run_variant_seed(setting: Setting, variant: Variant, seed: int, num_classes: int, runs_dir: Path, out: Path,
                      device: str | None, inner_progress: bool, amp: bool | None = None) -> tuple[dict, str | None]:
    """Train (or reuse) and evaluate one (variant, seed); returns its run record and a warning (or None)."""
    iterations = int(setting.train["iterations"])
    trained = ALL_VARIANTS[variant.reuse] if variant.reuse else variant
    train_dir = runs_dir / trained.name / f"it{iterations}_seed{seed}"
    train_cfg = make_config(setting, trained, seed, train_dir, num_classes, amp=amp)
    eval_cfg = make_config(setting, variant, seed, train_dir, num_classes, amp=amp)
    eval_dir = runs_dir / variant.name / f"it{iterations}_seed{seed}" / "eval"
    timing = records_only(train_dir, eval_dir, iterations)
    if timing is None:
        timing = train_once(train_cfg, progress=inner_progress)  # checks the saved config itself
    else:
        _check_saved_config(train_dir, train_cfg)
    ev = evaluate_once(timing["checkpoint"], eval_cfg, eval_dir, device=device, progress=inner_progress)
    run = {
        "run_dir": str(train_dir), "eval_dir": str(eval_dir),
        "status": (f"reuses {variant.reuse}" if variant.reuse and timing["checkpoint"] else timing["status"])
        + ("" if ev["eval_status"] == "evaluated" else ", eval reused"),
        "train_s": None if variant.reuse else timing.get("train_s"),
        "s_per_iter": None if variant.reuse else timing.get("s_per_iter"),
        "train_hardware": timing.get("hardware"),
        "eval_s": ev.get("eval_s"), "signals": ev.get("signals"),
        "methods": ev["methods"], "correlation": ev["correlation"],
    }
    missing = sorted(set(variant.expects) - set(ev.get("signals") or []))
    warning = (f"{variant.name} seed {seed}: candidates lack {missing}, which this variant should predict; "
               "only the methods its candidates support were scored") if missing else None
    plot = eval_dir / "confidence.png"
    if plot.is_file():
        target = out / "plots" / f"{variant.name}_seed{seed}_confidence.png"
        shutil.copyfile(plot, target)
        run["plot"] = str(target.relative_to(out))
    return run, warning


def _meta(setting: Setting, seeds: Sequence[int], train_ds, val_ds, device: str | None, wall_runs: float,
          t_start: float, command: str) -> dict:
    """The ``meta`` section of results.json: setting, budget, data sizes, hardware, times, command."""
    return {
        "setting": setting.name, "description": setting.description, "seeds": list(seeds),
        "budget": budget_text(setting),
        "config": {"model": setting.model, "family_model": setting.family_model,
                   "family_train": setting.family_train, "data": setting.data, "train": setting.train},
        "data": {"train_images": len(train_ds), "train_boxes": train_ds.num_boxes(),
                 "val_images": len(val_ds), "val_boxes": val_ds.num_boxes(), "num_classes": train_ds.num_classes},
        "hardware": hardware(device),
        "spread": "mean and sample standard deviation over seeds (n - 1); min, max and values also given; "
                  "deltas paired by seed",
        "wall_time_runs_s": wall_runs,
        "wall_time_invocation_s": time.perf_counter() - t_start,
        "command": command,
        "metrics_scale": "fractions in [0, 1] (tables show x 100)",
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def run_benchmark(setting: Setting, variants: Sequence[Variant], seeds: Sequence[int], out: str | Path,
                  runs_dir: str | Path, device: str | None = None, inner_progress: bool = False,
                  progress: bool = True, command: str = "", amp: bool | None = None) -> dict:
    """Train and evaluate every (variant, seed), aggregate, and write results.json, table.md and plots.

    ``amp``: mixed precision of the trainings on CUDA (None: ``train()``'s default, on for CUDA).
    A run trained elsewhere whose records are here but not its weights is aggregated from its
    records (:func:`records_only`).

    Returns the results dict (also written to ``out/results.json``). A failing (variant, seed) is
    recorded as an error and the others go on.
    """
    from locconf.experiment import build_datasets

    t_start = time.perf_counter()
    out, runs_dir = Path(out), Path(runs_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.reuse is not None and v.reuse not in ALL_VARIANTS:
            raise ValueError(f"variant {v.name!r} reuses unknown variant {v.reuse!r}")
    train_ds, val_ds, _ = build_datasets(**setting.data)
    results_variants: dict[str, dict] = {
        v.name: {"label": v.label, "family": v.family, "headline": v.headline, "expects": list(v.expects),
                 "reuses": v.reuse, "model": dict(v.model), "runs": {}, "warnings": [], "errors": []}
        for v in variants
    }
    records: dict[str, dict] = {v.name: {} for v in variants}
    jobs = [(v, s) for v in variants for s in seeds]
    bar = progress_bar(jobs, desc=f"accuracy/{setting.name}", unit="run", progress=progress, dynamic_ncols=True)
    for variant, seed in bar:
        bar.set_postfix_str(f"{variant.name} seed {seed}")
        info = results_variants[variant.name]
        try:
            run, warning = _run_variant_seed(setting, variant, seed, train_ds.num_classes, runs_dir, out, device,
                                             inner_progress, amp=amp)
            if warning:
                info["warnings"].append(warning)
            records[variant.name][seed] = run
        except Exception as e:  # record and go on: one missing detector must not sink the others
            log.exception("%s seed %d failed", variant.name, seed)
            run = {"error": f"{type(e).__name__}: {e}", "status": "failed"}
            info["errors"].append(run["error"])
        info["runs"][seed] = run

    agg = aggregate(records, headlines={v.name: v.headline for v in variants}, baseline=BASELINE)
    wall_runs = sum((r.get("train_s") or 0.0) + (r.get("eval_s") or 0.0)
                    for info in results_variants.values() for r in info["runs"].values())
    results = {"meta": _meta(setting, seeds, train_ds, val_ds, device, wall_runs, t_start, command),
               "variants": results_variants, "aggregate": agg}
    summary_plot = plot_summary(results, out / "plots" / "summary.png")
    if summary_plot is not None:
        results["meta"]["summary_plot"] = str(summary_plot.relative_to(out))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "table.md").write_text(format_report(results))
    return results
