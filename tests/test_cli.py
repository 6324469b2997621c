import json

from locconf.cli import build_parser, main


def test_synthetic_data_command_writes_coco(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path), "--num-train", "3", "--num-val", "2",
                 "--image-size", "64"]) == 0
    train = json.loads((tmp_path / "train.json").read_text())
    val = json.loads((tmp_path / "val.json").read_text())
    assert len(train["images"]) == 3 and len(val["images"]) == 2
    assert all((tmp_path / im["file_name"]).exists() for im in train["images"] + val["images"])


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


import pytest

VARIANTS = {
    "torchvision_frcnn": (dict(arch="torchvision_frcnn", representation_size=64, box_batch_size_per_image=32,
                               rpn_batch_size_per_image=64), ["nms", "soft-linear"]),
    "dir": (dict(arch="rcnn", quality="dir", representation_size=64, box_batch_size_per_image=32,
                 rpn_batch_size_per_image=64), ["nms", "quality"]),
    "iou_net": (dict(arch="rcnn", quality="iou_net", representation_size=64, refine_steps=2), ["iou-guided"]),
    "kl": (dict(arch="rcnn", quality="kl", representation_size=64), ["nms", "var-voting+soft"]),
    "clq": (dict(arch="one_stage", head="clq", head_convs=1, score_thresh=0.0), ["nms", "quality"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_eval_predict_end_to_end(variant, tmp_path, capsys):
    """A tiny detector of each family through `locconf train`, `eval` and `predict` on synthetic data."""
    import torch
    import yaml

    torch.manual_seed(0)
    model_cfg, methods = VARIANTS[variant]
    cfg = {
        "model": dict(model_cfg, backbone="resnet18", fpn_channels=16, min_size=96, max_size=96,
                      candidates_per_image=200),
        "data": dict(source="synthetic", root=str(tmp_path / "data"),
                     synthetic=dict(num_train=4, num_val=2, image_size=96, num_classes=2)),
        "train": dict(iterations=3, batch_size=2, lr=0.01, warmup_iters=1, out_dir=str(tmp_path / "run"),
                      checkpoint_every=2, log_every=1, progress=False),
        "eval": dict(methods=["nms", "soft-gaussian"]),
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config)]) == 0
    assert (tmp_path / "run" / "config.yaml").exists()
    ckpts = sorted((tmp_path / "run").glob("checkpoint_*.pth"))
    assert ckpts, "training wrote no checkpoint"
    ckpt = ckpts[-1]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"train"' in l]) == 3
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--methods", ",".join(methods),
                 "--out", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["methods"]) == set(methods)
    assert all(0 <= results["methods"][m]["AP"] <= 1 for m in results["methods"])
    assert (tmp_path / "ev" / "confidence.png").stat().st_size > 0
    image = tmp_path / "data" / "val" / "000000.png"
    assert main(["predict", str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "vis.png")]) == 0
    assert (tmp_path / "vis.png").stat().st_size > 0
    assert "drawn in" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path):
    from locconf.experiment import build_model, check_config

    with pytest.raises(ValueError, match="unknown section"):
        check_config({"modle": {}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['backbon'\] in section 'model'"):
        build_model(backbon="resnet18")


def test_shipped_configs_build(tmp_path):
    """Every config in configs/ has known sections and keys, and its model builds."""
    from pathlib import Path

    from locconf.experiment import build_model, load_config

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        model = build_model(num_classes=1, **cfg["model"])
        assert sum(p.numel() for p in model.parameters()) > 0


def test_eval_html_calibration_and_tiled_predict(tmp_path, capsys):
    """`eval --html` writes the report and a calibration into --out; `predict` tiles a larger
    image and applies it; `postprocess --calibration` reads predict's COCO results."""
    import csv

    import numpy as np
    import torch
    import yaml
    from PIL import Image

    torch.manual_seed(0)
    model_cfg, _ = VARIANTS["dir"]
    cfg = {
        "model": dict(model_cfg, backbone="resnet18", fpn_channels=16, min_size=96, max_size=96,
                      candidates_per_image=200),
        "data": dict(source="synthetic", root=str(tmp_path / "data"),
                     synthetic=dict(num_train=4, num_val=4, image_size=96, num_classes=2)),
        "train": dict(iterations=2, batch_size=2, lr=0.01, warmup_iters=1, out_dir=str(tmp_path / "run"),
                      checkpoint_every=2, log_every=1, progress=False),
        "eval": dict(methods=["nms", "quality"]),
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config)]) == 0
    ckpt = sorted((tmp_path / "run").glob("checkpoint_*.pth"))[-1]
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"),
                 "--html", str(tmp_path / "report.html"), "--gallery", "2", "--calibration-min-boxes", "1"]) == 0
    out = capsys.readouterr().out
    assert "expected calibration error" in out and "report:" in out
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # scatter, reliability, two gallery images
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["calibration"]["ece"]) <= {"score", "quality", "combined"}
    calibration = tmp_path / "ev" / "calibration.json"
    assert not ckpt.with_suffix(".calibration.json").exists()  # nothing written beside the checkpoint
    assert (tmp_path / "ev" / "reliability.png").exists()
    if not calibration.exists():  # an untrained model may match no box with IoU > 0.5: nothing to fit
        pytest.skip("no candidate matched a ground truth, so there was no calibration to fit")
    assert json.loads(calibration.read_text())["format"] == "locconf-calibration"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (250, 300, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    assert main(["predict", str(tmp_path / "big.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.png"),
                 "--tile-size", "96", "--overlap", "32", "--batch-size", "3", "--method", "quality",
                 "--calibration", str(calibration), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert rows and list(rows[0])[:8] == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score", "quality"]
    assert max(float(r["xmax"]) for r in rows) > 96  # boxes beyond the first tile: image coordinates
    assert main(["postprocess", str(tmp_path / "p.json"), "--out", str(tmp_path / "pp.json"), "--method", "none",
                 "--calibration", str(calibration), "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "pp.json").read_text())) == min(100, len(rows))


def test_bench_command_runs_the_accuracy_harness(tmp_path, monkeypatch, capsys):
    """`locconf bench` hands its options to locconf.bench.run.run_benchmark (stubbed here: no training)."""
    from locconf.bench import run as bench_run

    calls = []

    def fake(setting, variants, seeds, out, runs_dir, device=None, inner_progress=False, command="", amp=None):
        calls.append(dict(setting=setting, variants=[v.name for v in variants], seeds=list(seeds), out=out,
                          runs=runs_dir, command=command, amp=amp))
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("# the table\n")
        failed = {"error": "RuntimeError: boom"} if "kl" in calls[-1]["variants"] else {}
        return {"variants": {v.name: {"runs": {s: failed for s in seeds}} for v in variants}}

    monkeypatch.setattr(bench_run, "run_benchmark", fake)
    argv = ["bench", "--setting", "synthetic", "--seeds", "3", "--iterations", "5", "--variants", "dir", "dir",
            "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    assert main(argv) == 0
    call = calls[-1]
    assert call["setting"].name == "synthetic" and call["setting"].train["iterations"] == 5
    assert call["variants"] == ["dir"] and call["seeds"] == [3]
    assert (call["out"], call["runs"]) == (tmp_path / "out", tmp_path / "runs")
    assert call["command"].startswith("locconf bench --setting synthetic --seeds 3 --iterations 5 --variants dir dir")
    assert call["amp"] is None
    assert main(argv + ["--amp", "off"]) == 0 and calls[-1]["amp"] is False
    assert "# the table" in capsys.readouterr().out
    assert main(argv[:-4] + ["kl", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]) == 1
    assert "FAILED runs" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "--setting", "neon"])
    assert args.seeds == [0, 1] and args.out is None and "tv_frcnn" not in args.variants


def test_choices_mirror_the_library():
    """The command line's torch-free choice lists are the library's own tables."""
    from locconf.cli import choices
    from locconf.fusion import CONF_TYPES, WEIGHTS
    from locconf.postprocess import METHODS
    from locconf.tiling import BORDERS

    assert choices.METHODS == tuple(METHODS)
    assert choices.BORDERS == tuple(BORDERS)
    assert choices.WEIGHTS == tuple(WEIGHTS) and choices.CONF_TYPES == tuple(CONF_TYPES)


def test_version_and_help_show_defaults_and_choices(capsys):
    import locconf

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"locconf {locconf.__version__}"
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 400)" in text and "{none,drop,down-weight}" in text and "(default: drop)" in text
    assert "soft-gaussian" in text and "(default: nms)" in text


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"locconf train: error: config file {missing} does not exist"]
    assert "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: nope}\ntrain: {iterations: 1}\n")
    assert main(["train", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.arch must be one of" in err


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    assert main(["train", str(tmp_path / "nope.yaml"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("LOCCONF_DEBUG", "1")
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from locconf.cli import train as train_cmd

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_cmd, "run", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "x.yaml"])


def test_interrupt_is_reported_as_such(monkeypatch, capsys):
    from locconf.cli import train as train_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "run", interrupted)
    assert main(["train", "x.yaml"]) == 130
    assert capsys.readouterr().err.strip() == "locconf train: interrupted"


def test_quiet_and_verbose_set_the_package_log_level():
    import logging

    from locconf.cli import build_parser, configure_logging

    for argv, level in ((["-q", "data", "synthetic", "--out", "x"], logging.WARNING),
                        (["data", "synthetic", "--out", "x", "-v"], logging.DEBUG),
                        (["data", "synthetic", "--out", "x"], logging.INFO)):
        args = build_parser().parse_args(argv)
        configure_logging(-1 if getattr(args, "quiet", False) else int(getattr(args, "verbose", 0) or 0))
        assert logging.getLogger("locconf").level == level
    configure_logging(0)


def test_progress_bars_follow_tqdm_disable_and_the_terminal(monkeypatch):
    from locconf.progress import progress_disabled

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_disabled(False) is True
    assert progress_disabled(True) is None  # tqdm decides: shown only on a terminal
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_disabled(True) is True
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert progress_disabled(True) is None


def test_a_piped_training_prints_no_progress_bar_updates(tmp_path):
    """`locconf train cfg.yaml 2>&1 | cat`: standard error is not a terminal, so no bar is drawn."""
    import subprocess
    import sys

    import yaml

    cfg = {"model": dict(arch="rcnn", backbone="resnet18", fpn_channels=16, min_size=64, max_size=64,
                         representation_size=32, candidates_per_image=50),
           "data": dict(source="synthetic", root=str(tmp_path / "data"),
                        synthetic=dict(num_train=2, num_val=1, image_size=64, num_classes=1)),
           "train": dict(iterations=4, batch_size=1, lr=0.001, warmup_iters=1, out_dir=str(tmp_path / "run"),
                         checkpoint_every=4, log_every=1)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "locconf", "train", str(tmp_path / "cfg.yaml")],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "s/it" not in proc.stderr
    assert "step 4" in proc.stdout
