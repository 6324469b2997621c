"""`locconf predict` on the command line: both forms, exit codes, and torchrun with 2 CPU processes (gloo)
equal, file for file, to one process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from locconf.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small untrained Faster R-CNN with a DIR head saved as a locconf checkpoint (meta: config and
    categories), and five 96 px images."""
    from locconf.experiment import build_model, check_config

    root = tmp_path_factory.mktemp("tiny")
    cfg = check_config({"model": dict(arch="rcnn", quality="dir", representation_size=32, backbone="resnet18",
                                      fpn_channels=8, min_size=96, max_size=96, candidates_per_image=20,
                                      num_classes=1),
                        "data": dict(source="synthetic", root=str(root / "data"),
                                     synthetic=dict(num_train=2, num_val=2, image_size=96, num_classes=1))})
    torch.manual_seed(0)
    model = build_model(**cfg["model"])
    ckpt = root / "ck.pth"
    torch.save({"model": model.state_dict(), "meta": {"config": cfg, "categories": [{"id": 7, "name": "crown"}]}},
               ckpt)
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    return root, ckpt


ARGS = ["--tile-size", "96", "--overlap", "32", "--score-threshold", "1.0", "--max-side", "96", "--no-progress"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_processes_equal_one_process_file_for_file(tiny, tmp_path, capsys, one_thread):
    root, ckpt = tiny
    predict = ["predict", str(root / "imgs"), "--checkpoint", str(ckpt), *ARGS]
    assert main([*predict, "--out-dir", str(tmp_path / "one")]) == 0  # one process, one thread
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "locconf", *predict, "--out-dir", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "5 images: 5 predicted, 0 skipped" in two.stdout and "on 2 processes" in two.stdout
    assert two.stdout.count("5 images:") == 1  # rank 0 alone prints the summary
    one_tree, two_tree = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert sorted(one_tree) == sorted(two_tree) and len(one_tree) == 5 * 3 + 2
    assert one_tree == two_tree
    # the outputs of two processes are complete for one process: nothing is redone
    capsys.readouterr()
    assert main([*predict, "--out-dir", str(tmp_path / "two")]) == 0
    assert "0 predicted, 5 skipped" in capsys.readouterr().out


def test_batch_and_single_forms_and_exit_codes(tiny, tmp_path, capsys):
    root, ckpt = tiny
    assert main(["predict", str(root / "imgs" / "3.png"), str(root / "imgs" / "[01].png"), "--checkpoint", str(ckpt),
                 "--out-dir", str(tmp_path / "out"), *ARGS]) == 0
    out = capsys.readouterr().out
    assert "3 images: 3 predicted, 0 skipped (already complete), 0 failed" in out
    coco = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [(root / "imgs" / f"{i}.png").as_posix() for i in (0, 1, 3)]
    assert coco["categories"] == [{"id": 7, "name": "crown"}]
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv", encoding="utf-8")))
    assert list(rows[0])[:8] == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score", "quality"]
    assert len(rows) == len(coco["annotations"]) and {r["label"] for r in rows} == {"crown"}

    # one damaged image among good ones: reported by name, the others done, exit 1
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.open(root / "imgs" / "2.png").save(bad / "a.png")
    (bad / "b.png").write_bytes((root / "imgs" / "4.png").read_bytes()[:300])
    assert main(["predict", str(bad), "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "o2"), *ARGS]) == 1
    captured = capsys.readouterr()
    assert "1 predicted, 0 skipped (already complete), 1 failed" in captured.out
    assert "1 of 2 images failed" in captured.err and f"{(bad / 'b.png').as_posix()}:" in captured.err
    # user errors before the batch: exit 2
    assert main(["predict", str(tmp_path / "nothing.png"), "--checkpoint", str(ckpt), "--out-dir",
                 str(tmp_path / "o3"), *ARGS]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(["predict", str(root / "imgs"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "v.png"),
                 *ARGS]) == 2
    assert "--out draws one image file" in capsys.readouterr().err

    # the single-image form: its three files, the CSV with image_path
    image = root / "imgs" / "0.png"
    assert main(["predict", str(image), "--checkpoint", str(ckpt), "--out", str(tmp_path / "vis.png"), "--tta", "flips",
                 *ARGS]) == 0
    assert "drawn in" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "vis.csv", encoding="utf-8")))
    assert rows and {r["image_path"] for r in rows} == {str(image)}
    assert {r["image_id"] for r in json.loads((tmp_path / "vis.json").read_text())} == {1}
    assert (tmp_path / "vis.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_eval_with_test_time_augmentation(tiny, tmp_path, capsys):
    """`locconf eval --tta flips` scores each method on the pooled passes, `--tta-merge fuse-quality` each
    method then fusion; both write their results (the synthetic val split of the checkpoint's config)."""
    import yaml

    root, crown_ckpt = tiny
    state = torch.load(crown_ckpt, weights_only=True)
    state["meta"]["categories"] = [{"id": 1, "name": "rectangle_1"}]  # the synthetic data's, which eval checks
    ckpt = tmp_path / "ck.pth"
    torch.save(state, ckpt)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(state["meta"]["config"]))
    for merge in ("concat", "fuse-quality"):
        assert main(["eval", str(cfg), "--checkpoint", str(ckpt), "--methods", "nms,quality", "--out",
                     str(tmp_path / merge), "--tta", "flips", "--tta-merge", merge, "--no-progress"]) == 0
        results = json.loads((tmp_path / merge / "results.json").read_text())
        assert set(results["methods"]) == {"nms", "quality"}
        assert all(0 <= m["AP"] <= 1 for m in results["methods"].values())
    assert main(["eval", str(cfg), "--checkpoint", str(ckpt), "--tta", "flips", "--tta-merge", "fuse-variance",
                 "--out", str(tmp_path / "v"), "--no-progress"]) == 2
    assert "needs 'variances'" in capsys.readouterr().err
