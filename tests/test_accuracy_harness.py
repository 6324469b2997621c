"""The accuracy benchmark harness (locconf.bench): configs, method selection, aggregation, deltas,
targets, the report, resumability on a tiny torchvision detector, and the script and command that run it."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locconf.bench import cli, report, settings, stats
from locconf.bench import run as runner
from locconf.experiment import check_config
from locconf.postprocess import METHODS

ROOT = Path(__file__).resolve().parent.parent


# every test here runs on one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# -- variants -> configs ------------------------------------------------------------------------


def test_every_variant_gets_the_same_backbone_size_and_budget(tmp_path):
    setting = settings.neon_setting(iterations=50)
    cfgs = {name: settings.make_config(setting, v, seed=3, out_dir=tmp_path / name, num_classes=1)
            for name, v in settings.VARIANTS.items()}
    for name, cfg in cfgs.items():
        check_config(cfg)  # known sections only
        m, t = cfg["model"], cfg["train"]
        assert (m["backbone"], m["weights"], m["norm"], m["fpn_channels"], m["returned_layers"]) == (
            "efficientnet_lite0", "imagenet", "frozen", 64, [1, 2, 3]), name
        assert m["anchor_sizes"] == [16, 32, 64, 128], name  # both families: one anchor size per level
        assert (m["min_size"], m["max_size"], m["candidates_per_image"], m["num_classes"]) == (400, 400, 1000, 1)
        assert (t["iterations"], t["batch_size"], t["schedule"], t["steps"], t["warmup_iters"]) == (
            50, 2, "step", [0.7, 0.9], 100), name
        assert t["seed"] == 3 and t["out_dir"] == str(tmp_path / name)
        assert cfg["data"] == setting.data
    base, dir_, kl = cfgs["baseline"]["model"], cfgs["dir"]["model"], cfgs["kl"]["model"]
    assert base["arch"] == "rcnn" and "quality" not in base
    assert base["aspect_ratios"] == [0.7, 1.0, 1.4] and base["box_batch_size_per_image"] == 256
    assert base["quality_representation_size"] == 256
    assert (dir_["quality"], kl["quality"], cfgs["dir_foresight"]["model"]["quality"],
            cfgs["iou_direct"]["model"]["quality"]) == ("dir", "kl", "dir_foresight", "iou_direct")
    for head in ("atss", "gfl", "clq"):
        m = cfgs[head]["model"]
        assert (m["arch"], m["head"]) == ("one_stage", head)
        for key in ("aspect_ratios", "box_batch_size_per_image", "quality_representation_size"):
            assert key not in m, (head, key)  # two-stage-only keys
        assert cfgs[head]["train"]["lr"] == 0.005
    assert cfgs["baseline"]["train"]["lr"] == 0.01
    # IoU-Net with refinement: the iou_net weights, evaluated with refine_steps=5, never trained itself
    refine = settings.VARIANTS["iou_net_refine"]
    assert refine.reuse == "iou_net"
    assert cfgs["iou_net_refine"]["model"] == {**cfgs["iou_net"]["model"], "refine_steps": 5}
    # the setting is not mutated by building configs
    cfgs["baseline"]["model"]["backbone"] = "resnet50"
    assert setting.model["backbone"] == "efficientnet_lite0"


def test_settings_budget_and_iterations_override():
    syn = settings.synthetic_setting()
    assert syn.train["iterations"] == 800 and syn.data["source"] == "synthetic"
    assert syn.family_model["two_stage"]["representation_size"] == 256
    assert "representation_size" not in settings.neon_setting().family_model["two_stage"]
    assert settings.synthetic_setting(iterations=7).train["iterations"] == 7
    assert settings.neon_setting().train["iterations"] == 1500
    scratch = settings.SETTINGS["neon-scratch"]()
    assert scratch.name == "neon-scratch" and scratch.train["iterations"] == 600
    assert scratch.model["backbone"] == "resnet18" and "weights" not in scratch.model
    assert (scratch.train["lr"], scratch.family_train["one_stage"]["lr"]) == (0.02, 0.01)
    assert settings.SETTINGS["neon-scratch"](iterations=9).train["iterations"] == 9
    with pytest.raises(ValueError, match="family"):
        settings.make_config(syn, settings.Variant("x", "x", "three_stage", {}), 0, "out")


def test_method_selection_follows_the_signals_the_candidates_carry():
    plain = ["nms", "soft-linear", "soft-gaussian"]
    assert runner.select_methods([]) == plain
    assert runner.select_methods(["quality"]) == plain + ["iou-guided", "quality", "quality+soft-linear",
                                                       "quality+soft-gaussian"]
    assert runner.select_methods(["variances"]) == plain + ["var-voting", "var-voting+soft"]
    assert runner.select_methods(["quality", "variances"]) == list(METHODS)
    boxes = torch.zeros(3, 4)
    assert runner.candidate_signals({"boxes": boxes, "scores": torch.ones(3)}) == []
    assert runner.candidate_signals({"boxes": boxes, "quality": torch.ones(3)}) == ["quality"]
    assert runner.candidate_signals({"variances": torch.ones(3, 4), "quality": torch.ones(3)}) == ["quality", "variances"]


# -- aggregation ----------------------------------------------------------------------------------


def test_spread_is_mean_sample_std_min_max_without_undefined_values():
    s = stats.spread([0.30, 0.32, 0.34, -1, None, float("nan")])
    assert s["n"] == 3 and s["values"] == [0.30, 0.32, 0.34]
    assert s["mean"] == pytest.approx(0.32)
    assert s["std"] == pytest.approx(0.02)  # sqrt(((-.02)^2 + 0 + .02^2) / (3 - 1))
    assert (s["min"], s["max"]) == (0.30, 0.34)
    one = stats.spread([0.5])
    assert one["mean"] == 0.5 and one["std"] is None
    assert stats.spread([-1, None]) is None


def _metrics(ap, ap75=None, sites=None):
    m = {"AP": ap, "AP50": ap + 0.2, "AP75": ap if ap75 is None else ap75, "AP90": -1}
    if sites:
        m["sites"] = sites
    return m


def _records():
    """Two seeds: baseline (NMS only) and DIR (NMS + quality), with sites and correlations."""
    return {
        "baseline": {
            0: {"methods": {"nms": _metrics(0.30, sites={"A": _metrics(0.2)})},
                "correlation": {"score": {"pearson": 0.20, "spearman": 0.25, "n": 100}}},
            1: {"methods": {"nms": _metrics(0.34, sites={"A": _metrics(0.4)})},
                "correlation": {"score": {"pearson": 0.24, "spearman": 0.27, "n": 110}}},
        },
        "dir": {
            0: {"methods": {"nms": _metrics(0.31, 0.20), "quality": _metrics(0.35, 0.26)},
                "correlation": {"score": {"pearson": 0.3, "spearman": 0.3, "n": 90},
                                "quality": {"pearson": 0.78, "spearman": 0.7, "n": 90}}},
            1: {"methods": {"nms": _metrics(0.33, 0.22), "quality": _metrics(0.36, 0.27)},
                "correlation": {"score": {"pearson": 0.3, "spearman": 0.3, "n": 92},
                                "quality": {"pearson": 0.74, "spearman": 0.7, "n": 92}}},
        },
    }


def test_summarize_and_paired_deltas_by_hand():
    rec = _records()
    s = stats.summarize(rec["baseline"])
    assert s["methods"]["nms"]["AP"]["mean"] == pytest.approx(0.32)
    assert s["methods"]["nms"]["AP"]["std"] == pytest.approx(math.sqrt(2) * 0.02)  # values 0.30, 0.34
    assert s["methods"]["nms"]["AP90"] is None  # -1 in every seed: undefined
    assert s["methods"]["nms"]["sites"]["A"]["AP"]["mean"] == pytest.approx(0.3)
    assert s["correlation"]["score"]["pearson"]["mean"] == pytest.approx(0.22)

    own = stats.paired_deltas(rec["dir"], rec["dir"], "nms")
    # quality - nms per seed: AP 0.04, 0.03; AP75 0.06, 0.05
    assert own["quality"]["AP"]["values"] == pytest.approx([0.04, 0.03])
    assert own["quality"]["AP"]["mean"] == pytest.approx(0.035)
    assert own["quality"]["AP"]["std"] == pytest.approx(0.01 / math.sqrt(2))
    assert own["quality"]["AP75"]["mean"] == pytest.approx(0.055)
    assert own["nms"]["AP"]["mean"] == pytest.approx(0.0)
    vs_base = stats.paired_deltas(rec["dir"], rec["baseline"], "nms")
    # quality - baseline nms, paired by seed: 0.35 - 0.30, 0.36 - 0.34
    assert vs_base["quality"]["AP"]["values"] == pytest.approx([0.05, 0.02])
    assert vs_base["quality"]["AP90"] is None
    # a seed missing from the reference is left out of the pairing
    only_seed_1 = {1: rec["baseline"][1]}
    assert stats.paired_deltas(rec["dir"], only_seed_1, "nms")["quality"]["AP"]["values"] == pytest.approx([0.02])
    assert stats.paired_deltas(rec["dir"], {}, "nms") == {}


def test_targets_verdicts():
    agg = stats.aggregate(_records(), headlines={"baseline": "nms", "dir": "quality"})
    targets = {t["target"]: t for t in agg["targets"]}
    pearson = targets["DIR predicted IoU: Pearson with the true IoU >= 0.75"]
    assert pearson["value"]["mean"] == pytest.approx(0.76) and pearson["verdict"] == "met"
    assert targets["Pearson ordering: classification score < foresight < hindsight <= DIR"]["verdict"] == "not run"
    own = targets["DIR (quality NMS) vs the same model's NMS: dAP >= 2, dAP75 >= 3"]
    assert own["verdict"] == "met"  # +3.5 AP, +5.5 AP75
    base = targets["DIR (quality NMS) vs the baseline's NMS: dAP >= 2, dAP75 >= 3"]
    assert base["value"]["AP"]["mean"] == pytest.approx(0.035) and base["verdict"] == "missed"  # AP75 +1.5 < 3

    def corr(p):
        return {0: {"methods": {"nms": _metrics(0.3)}, "correlation": {"quality": {"pearson": p, "n": 5},
                                                                        "score": {"pearson": 0.2, "n": 5}}}}

    ordered = {"baseline": corr(0.1), "dir_foresight": corr(0.6), "iou_direct": corr(0.74), "dir": corr(0.76)}
    chain = stats.aggregate(ordered)["targets"][1]
    assert chain["verdict"] == "reproduced"
    assert chain["value"]["hindsight P&I (dir)"]["mean"] == pytest.approx(0.76)
    ordered["iou_direct"] = corr(0.5)  # hindsight below foresight
    assert stats.aggregate(ordered)["targets"][1]["verdict"] == "refuted"


def test_report_tables_overall_per_site_pearson_and_targets(tmp_path):
    rec = _records()
    agg = stats.aggregate(rec, headlines={"baseline": "nms", "dir": "quality"})
    runs = {name: {"runs": {s: {"status": "trained", "train_s": 120.0, "s_per_iter": 0.5, "eval_s": 3.0,
                                "signals": ["quality"] if name == "dir" else [], "plot": f"plots/{name}_seed{s}.png"}
                            for s in r}, "warnings": [], "errors": []}
            for name, r in rec.items()}
    results = {
        "meta": {"setting": "unit", "description": "hand-built", "seeds": [0, 1], "budget": "10 iterations",
                 "data": {"train_images": 4, "train_boxes": 9, "val_images": 2, "val_boxes": 5},
                 "hardware": {"device": "cpu (CPU)", "cpu": "x", "threads": 1, "torch": "t", "torchvision": "v",
                              "python": "3"},
                 "wall_time_runs_s": 7200.0, "wall_time_invocation_s": 60.0, "command": "python x"},
        "variants": runs,
        "aggregate": agg,
    }
    text = report.format_report(results)
    assert "# Accuracy benchmark: unit" in text and "2.00 h" in text
    assert "| baseline | **nms** | 32.0 ± 2.8 | 52.0 ± 2.8 | 32.0 ± 2.8 | - |" in text
    # DIR's quality NMS: AP 35.5 ± 0.7; +3.5 ± 0.7 over its own NMS; +3.5 ± 2.1 over the baseline's
    assert "| dir | **quality** | 35.5 ± 0.7 |" in text
    assert "+3.5 ± 0.7 | +5.5 ± 0.7 | +3.5 ± 2.1 |" in text
    assert "## Per site" in text and "| baseline | **nms** | A | 30.0 ± 14.1 |" in text
    assert "| dir | 0.300 ± 0.000 | 0.760 ± 0.028 | - | 91 |" in text
    assert "| DIR predicted IoU: Pearson with the true IoU >= 0.75 | 0.760 ± 0.028 | met" in text
    assert "[png](plots/dir_seed1.png)" in text
    assert "![summary]" not in text  # no summary plot drawn yet
    # the compact summary: one row per variant under its headline method
    summary = report.format_summary(results)
    assert "| baseline | nms | 32.0 ± 2.8 | 52.0 ± 2.8 | 32.0 ± 2.8 | - | (is NMS) | (is the reference) |" in summary
    assert "| dir | quality | 35.5 ± 0.7 |" in summary and "| +3.5 ± 0.7 / +5.5 ± 0.7 | +3.5 ± 2.1 / " in summary
    assert "| 0.30 ± 0.00 | 0.76 ± 0.03 |" in summary and summary in text

    png = report.plot_summary(results, tmp_path / "plots" / "summary.png")
    assert png == tmp_path / "plots" / "summary.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results["meta"]["summary_plot"] = "plots/summary.png"
    assert "![summary](plots/summary.png)" in report.format_report(results)
    empty = {**results, "aggregate": {"variants": {}}}
    assert report.plot_summary(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# -- the real thing, tiny: train, evaluate, resume -------------------------------------------------


def _tiny_setting(root, lr=0.01):
    return settings.Setting(
        name="tiny", description="tiny synthetic",
        model=dict(backbone="resnet18", fpn_channels=16, returned_layers=[2, 3, 4], min_size=64, max_size=64,
                   candidates_per_image=50),
        family_model={"two_stage": dict(anchor_sizes=[16, 32, 64, 128], box_batch_size_per_image=16,
                                        representation_size=32, rpn_batch_size_per_image=32),
                      "one_stage": {}},
        family_train={"two_stage": {}, "one_stage": {}},
        data=dict(source="synthetic", root=str(root / "data"),
                  synthetic=dict(num_train=2, num_val=2, image_size=64, num_classes=2, seed=0)),
        train=dict(iterations=2, batch_size=2, lr=lr, warmup_iters=1, checkpoint_every=0, log_every=1),
    )


def test_tiny_run_writes_results_and_a_second_call_does_not_retrain(tmp_path):
    variant = settings.EXTRA_VARIANTS["tv_frcnn"]
    out, runs = tmp_path / "out", tmp_path / "runs"
    first = runner.run_benchmark(_tiny_setting(tmp_path), [variant], [0], out, runs, progress=False)
    run = first["variants"]["tv_frcnn"]["runs"][0]
    assert not run.get("error"), run
    assert run["status"] == "trained" and run["signals"] == []
    assert run["train_s"] > 0 and run["s_per_iter"] > 0 and "1 threads" in run["train_hardware"]
    assert set(run["methods"]) == {"nms", "soft-linear", "soft-gaussian"}  # no quality/variances signal
    run_dir = runs / "tv_frcnn" / "it2_seed0"
    ckpt, log = run_dir / "checkpoint_0000002.pth", run_dir / "metrics.jsonl"
    eval_results = run_dir / "eval" / "results.json"
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (ckpt, log, eval_results)}
    assert (out / "plots" / "tv_frcnn_seed0_confidence.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["data"]["train_images"] == 2 and saved["meta"]["hardware"]["threads"] == 1
    assert set(saved["aggregate"]["variants"]["tv_frcnn"]["summary"]["methods"]) == set(run["methods"])
    assert "| tv_frcnn | **nms** |" in (out / "table.md").read_text()

    second = runner.run_benchmark(_tiny_setting(tmp_path), [variant], [0], out, runs, progress=False)
    run2 = second["variants"]["tv_frcnn"]["runs"][0]
    assert run2["status"] == "reused, eval reused"
    assert run2["train_s"] == pytest.approx(run["train_s"])  # the recorded training time, not a new one
    assert run2["methods"] == json.loads(json.dumps(run["methods"]))
    for p, (mtime, data) in stamps.items():
        assert (p.stat().st_mtime_ns, p.read_bytes()) == (mtime, data), f"{p} was rewritten"

    # the same run folder with another configuration is refused, not silently reused
    third = runner.run_benchmark(_tiny_setting(tmp_path, lr=0.02), [variant], [0], out, runs, progress=False)
    assert "different configuration" in third["variants"]["tv_frcnn"]["runs"][0]["error"]
    assert "train.lr" in third["variants"]["tv_frcnn"]["runs"][0]["error"]
    assert "failed" in (out / "table.md").read_text()


def test_a_run_trained_elsewhere_is_aggregated_from_its_records_without_its_weights(tmp_path):
    """A GPU machine returns a run's small files, not its checkpoints: the table is built from them."""
    variant = settings.EXTRA_VARIANTS["tv_frcnn"]
    out, runs = tmp_path / "out", tmp_path / "runs"
    first = runner.run_benchmark(_tiny_setting(tmp_path), [variant], [0], out, runs, progress=False)["variants"]
    run_dir = runs / "tv_frcnn" / "it2_seed0"
    for ckpt in run_dir.glob("checkpoint_*.pth"):
        ckpt.unlink()
    # recorded with fp32 on a GPU: precision, like the device, is not part of the experiment's config
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(saved.replace("train:\n", "train:\n  amp: false\n  device: cuda\n", 1))
    again = runner.run_benchmark(_tiny_setting(tmp_path), [variant], [0], out, runs, progress=False)["variants"]
    run = again["tv_frcnn"]["runs"][0]
    assert run["status"] == "records only, eval reused"
    assert not list(run_dir.glob("checkpoint_*.pth"))  # not retrained
    assert "trained on" not in (out / "table.md").read_text()  # one machine: no column
    assert run["methods"] == json.loads(json.dumps(first["tv_frcnn"]["runs"][0]["methods"]))
    assert run["train_s"] == pytest.approx(first["tv_frcnn"]["runs"][0]["train_s"])
    # without its evaluation the records do not suffice: the run is trained again
    (run_dir / "eval" / "results.json").unlink()
    (run_dir / "config.yaml").write_text(saved)
    third = runner.run_benchmark(_tiny_setting(tmp_path), [variant], [0], out, runs, progress=False)["variants"]
    assert third["tv_frcnn"]["runs"][0]["status"] == "trained"
    assert (run_dir / "checkpoint_0000002.pth").is_file()
    # a recorded config that differs in the recipe is still refused
    cfg_file = run_dir / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("lr: 0.01", "lr: 0.03"))
    for ckpt in run_dir.glob("checkpoint_*.pth"):
        ckpt.unlink()
    fourth = runner.run_benchmark(_tiny_setting(tmp_path), [variant], [0], out, runs, progress=False)["variants"]
    assert "different configuration" in fourth["tv_frcnn"]["runs"][0]["error"]


def test_report_says_which_run_trained_where_when_machines_differ():
    gpu = "CUDA (NVIDIA H200), fp32, Intel(R) Xeon(R) Processor, 1 threads"
    assert report.short_place(gpu) == "H200, fp32"
    assert report.short_place("CUDA (NVIDIA H100 80GB HBM3), mixed precision, x, 16 threads") == (
        "H100 80GB HBM3, mixed precision")
    assert report.short_place("CPU, AMD EPYC, 1 threads") == "CPU" and report.short_place(None) == "-"
    variants = {"baseline": {"runs": {0: {"train_hardware": "CPU, AMD EPYC, 1 threads", "status": "reused"},
                                      1: {"train_hardware": gpu, "status": "records only"}}}}
    lines = report._runs_table(variants)
    assert "| trained on |" in lines[2] and lines[3].count("|") == lines[2].count("|")
    assert lines[4].startswith("| baseline | 0 | reused | CPU | ") and "| H200, fp32 | " in lines[5]
    assert any("different hardware" in line for line in lines)
    one = report._runs_table({"baseline": {"runs": {0: variants["baseline"]["runs"][0]}}})
    assert "trained on" not in one[2] and not any("different hardware" in line for line in one)


def test_amp_option_reaches_the_config_and_the_command():
    setting = settings.neon_setting(iterations=10)
    v = settings.VARIANTS["baseline"]
    assert "amp" not in settings.make_config(setting, v, 0, "x")["train"]
    assert settings.make_config(setting, v, 0, "x", amp=False)["train"]["amp"] is False
    args = _parser().parse_args(["--setting", "neon", "--seeds", "1", "--variants", "dir", "--amp", "off"])
    assert cli.command_of(args) == "locconf bench --setting neon --seeds 1 --variants dir --amp off"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--setting", "neon", "--amp", "fp16"])


def _parser() -> argparse.ArgumentParser:
    return cli.add_arguments(argparse.ArgumentParser())


def test_cli_defaults():
    args = _parser().parse_args(["--setting", "synthetic"])
    assert args.seeds == [0, 1] and args.variants == list(settings.DEFAULT_VARIANTS) and args.threads is None
    assert "tv_frcnn" not in settings.DEFAULT_VARIANTS and settings.BASELINE in settings.DEFAULT_VARIANTS
    with pytest.raises(SystemExit):
        _parser().parse_args(["--setting", "coco"])


def test_cli_command_repeats_the_options_and_bad_values_are_refused(monkeypatch):
    args = _parser().parse_args(["--setting", "neon", "--seeds", "2", "--variants", "baseline", "dir",
                                 "--iterations", "30", "--out", "a b", "--threads", "2"])
    assert cli.command_of(args) == ("locconf bench --setting neon --seeds 2 --iterations 30 --variants baseline dir "
                                    "--out 'a b' --threads 2")
    assert _parser().parse_args(cli.command_of(args).split(" ", 2)[2].replace("'a b'", "ab").split()).seeds == [2]
    monkeypatch.setattr(runner, "run_benchmark", lambda *a, **k: pytest.fail("ran despite a bad option"))
    for bad in (["--seeds", "1", "1"], ["--seeds", "-1"], ["--iterations", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit, match="must be"):
            cli.run(_parser().parse_args(["--setting", "synthetic", *bad]))


def test_the_script_keeps_its_names_and_options():
    """benchmarks/accuracy.py is a thin script over locconf.bench; other scripts import names from it."""
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import accuracy as a\n"
        "from locconf.bench import run, settings\n"
        "assert a.VARIANTS is settings.VARIANTS and a.ALL_VARIANTS is settings.ALL_VARIANTS\n"
        "assert a.SETTINGS is settings.SETTINGS and a.run_benchmark is run.run_benchmark\n"
        "assert a.make_config is settings.make_config and a.neon_setting is settings.neon_setting\n"
        "args = a.build_parser().parse_args(['--setting', 'synthetic'])\n"
        "print(json.dumps({'variants': args.variants, 'root': str(a.ROOT), 'help': a.build_parser().format_help()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["variants"] == list(settings.DEFAULT_VARIANTS) and Path(got["root"]) == ROOT
    assert "python benchmarks/accuracy.py --setting synthetic" in got["help"] and "--inner-progress" in got["help"]


@pytest.mark.parametrize("name", sorted(settings.ABLATION_VARIANTS))
def test_ablation_variants_build_the_model_they_name(name):
    """Each ablation re-evaluates a trained variant's weights: same family and parameters as the
    variant it reuses, with its option set on the built model."""
    from locconf.experiment import build_model

    setting = settings.synthetic_setting(iterations=1)
    v = settings.ALL_VARIANTS[name]
    trained = settings.ALL_VARIANTS[v.reuse]
    assert v.family == trained.family and v.reuse in settings.VARIANTS
    torch.manual_seed(0)
    model = build_model(**settings.make_config(setting, v, 0, "unused", 3)["model"])
    torch.manual_seed(0)
    reference = build_model(**settings.make_config(setting, trained, 0, "unused", 3)["model"])
    assert model.state_dict().keys() == reference.state_dict().keys()  # the trained weights load
    roi = model.roi_heads
    if "dir_confidence" in v.model:
        assert roi.quality_head.confidence == v.model["dir_confidence"]
    if "dir_inference_features" in v.model:
        assert roi.quality_head.inference_features == v.model["dir_inference_features"]
    if "refine_order" in v.model:
        assert roi.refine_order == v.model["refine_order"]


@pytest.mark.parametrize("name, quality", [("cascade", None), ("cascade_dir", "dir")])
def test_cascade_variants_build_a_three_stage_cascade(name, quality):
    from locconf.experiment import build_model
    from locconf.models.cascade import CascadeRoIHeads

    setting = settings.synthetic_setting(iterations=1)
    model = build_model(**settings.make_config(setting, settings.ALL_VARIANTS[name], 0, "unused", 3)["model"])
    roi = model.roi_heads
    assert isinstance(roi, CascadeRoIHeads) and roi.iou_thresholds == [0.5, 0.6, 0.7]
    assert model.quality == quality and (roi.quality_head is None) == (quality is None)
