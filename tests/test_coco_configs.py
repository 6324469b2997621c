"""The COCO R50-FPN 1x configs: the papers' settings, and a smoke test that each one builds, trains
one step and evaluates on a tiny COCO-format fixture (sparse COCO-style category ids).

The smoke test keeps ResNet-50 and every model key of the config except the sizes (images of
64-96 px, 16 RoIs, 50 candidates) and trains one step of batch 1 at a small learning rate: the
configs start from ImageNet weights (commented out here, as nothing is downloaded), and one step
at lr 0.02 from a random R-50 with frozen BatchNorm is a needless NaN risk for a smoke test.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from locconf.data import SyntheticScenes, write_synthetic_coco
from locconf.engine.checkpoint import checkpoint_path
from locconf.postprocess import REQUIRED_SIGNALS
from locconf.engine.train import lr_factor
from locconf.experiment import build_datasets, load_config, load_trained, run_eval, run_train
from locconf.postprocess import METHODS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# name -> (arch, quality head or one-stage head, candidate signals the detector must return)
EXPECTED = {
    "coco_frcnn_r50_1x": ("rcnn", None, ()),
    "coco_dir_r50_1x": ("rcnn", "dir", ("quality",)),
    "coco_cascade_dir_r50_1x": ("rcnn", "dir", ("quality",)),
    "coco_iou_net_r50_1x": ("rcnn", "iou_net", ("quality",)),
    "coco_kl_r50_1x": ("rcnn", "kl", ("variances",)),
    "coco_atss_r50_1x": ("one_stage", "atss", ()),
    "coco_clq_r50_1x": ("one_stage", "clq", ("quality",)),
}
COCO_CAT_IDS = {1: 1, 2: 18, 3: 90}  # synthetic label -> a sparse COCO-style category id
COCO_NAMES = {1: "person", 18: "dog", 90: "toothbrush"}


# every test here runs on one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_coco_configs_are_the_six_of_the_issue_and_cascade_dir():
    assert sorted(p.stem for p in CONFIGS.glob("coco_*.yaml")) == sorted(EXPECTED)


def _drops(train: dict) -> list[int]:
    """Iterations (after warm-up) at which the learning rate is divided."""
    kw = dict(iterations=train["iterations"], warmup_iters=train["warmup_iters"],
              warmup_factor=train["warmup_factor"], schedule=train["schedule"], steps=train["steps"],
              gamma=train["gamma"])
    candidates = [int(s * train["iterations"]) + d for s in train["steps"] for d in (-1, 0, 1)]
    return sorted({i for i in candidates if lr_factor(i, **kw) < lr_factor(i - 1, **kw) - 1e-12})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_papers_settings(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    arch, head, signals = EXPECTED[name]
    m, d, t, e = cfg["model"], cfg["data"], cfg["train"], cfg["eval"]
    assert m["arch"] == arch
    assert m.get("quality" if arch == "rcnn" else "head") == head
    assert (m["backbone"], m["fpn_channels"], m["min_size"], m["max_size"]) == ("resnet50", 256, 800, 1333)
    assert m["norm"] == "frozen" and "weights" not in m  # pretrained weights: documented, commented out
    assert m["frozen_stages"] == 1  # MMDetection's frozen stem and stage 1
    assert m.get("cascade") == ([0.5, 0.6, 0.7] if "cascade" in name else None)
    assert m["candidates_per_image"] == 1000
    assert d == {"source": "coco", "root": "data/coco", "train_json": "annotations/instances_train2017.json",
                 "val_json": "annotations/instances_val2017.json", "train_images": "train2017",
                 "val_images": "val2017", "flips": True, "vertical_flip": False, "rot90": False,
                 "jitter": False}  # the papers' horizontal flips only
    assert (t["iterations"], t["batch_size"] * 8, t["momentum"], t["weight_decay"]) == (90000, 16, 0.9, 1e-4)
    assert (t["warmup_iters"], t["warmup_factor"], t["schedule"], t["gamma"]) == (500, 0.333, "step", 0.1)
    assert t["out_dir"] == f"runs/{name}"
    if arch == "rcnn":  # DIR Sec. 4.2 / MMDetection faster_rcnn_r50_fpn: P2-P6, anchors 32-512, 512 RoIs
        assert m["returned_layers"] == [1, 2, 3, 4] and m["anchor_sizes"] == [32, 64, 128, 256, 512]
        assert (m["box_batch_size_per_image"], m["box_positive_fraction"], m["representation_size"]) == (512, 0.25, 1024)
        assert (m["rpn_post_nms_top_n_train"], m["rpn_post_nms_top_n_test"]) == (2000, 1000)
        assert t["lr"] == 0.02 and _drops(t) == [60000, 82500]  # epochs 8 and 11 of 12
        assert e["method_params"]["nms"] == {"iou_threshold": 0.5}
    else:  # ATSS release: C3-C5 (+P6, P7), lr 0.01, decay at 60k and 80k, test NMS 0.6
        assert (m["returned_layers"], m["extra_levels"]) == ([2, 3, 4], "p6p7")  # P3-P7
        assert m["anchor_sizes"] == [64, 128, 256, 512, 1024] and m["topk"] == 9  # 8 x stride, ATSS top-9
        assert t["lr"] == 0.01 and _drops(t) == [60000, 80000]
        assert e["method_params"]["nms"] == {"iou_threshold": 0.6}
    assert e["methods"][0] == "nms" and set(e["methods"]) <= set(METHODS)
    assert set(e["method_params"]) <= set(e["methods"])
    for method in e["methods"]:  # every method is applicable to this detector's candidates
        assert REQUIRED_SIGNALS[method] in (None, *signals), (name, method)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """A tiny COCO layout: data root with annotations/instances_{train,val}2017.json, ids 1/18/90."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    for split, seed in (("train2017", 0), ("val2017", 1)):
        scenes = SyntheticScenes(2, image_size=96, num_classes=3, min_objects=2, max_objects=4, min_size=16,
                                 max_size=48, seed=seed)
        path = write_synthetic_coco(scenes, root, split, progress=False)
        data = json.loads(path.read_text())
        for ann in data["annotations"]:
            ann["category_id"] = COCO_CAT_IDS[ann["category_id"]]
        for im in data["images"]:  # COCO's file_name has no split folder: data.train_images / val_images
            im["file_name"] = Path(im["file_name"]).name
        assert all((root / split / im["file_name"]).is_file() for im in data["images"])
        data["categories"] = [{"id": cid, "name": COCO_NAMES[cid], "supercategory": "thing"}
                              for cid in COCO_CAT_IDS.values()]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        path.unlink()
    return root


def _shrink(cfg: dict, root: Path, out_dir: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    m = cfg["model"]
    m.update(min_size=64, max_size=96, candidates_per_image=50, num_classes=3)
    if "box_batch_size_per_image" in m:
        m["box_batch_size_per_image"] = 16
    cfg["data"]["root"] = str(root)  # the annotation paths stay the config's own
    cfg["train"].update(iterations=1, batch_size=1, lr=1e-3, warmup_iters=0, num_workers=0, checkpoint_every=0,
                        log_every=1, progress=False, amp=False, device="cpu", out_dir=str(out_dir))
    return cfg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_trains_one_step_and_evaluates(name, coco_root, tmp_path):
    arch, head, signals = EXPECTED[name]
    cfg = _shrink(load_config(CONFIGS / f"{name}.yaml"), coco_root, tmp_path / "run")

    summary = run_train(cfg)
    ckpt = checkpoint_path(tmp_path / "run", 1)
    assert summary["step"] == 1 and ckpt.is_file()
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(record) == 1 and math.isfinite(record[0]["total"])

    model, cfg = load_trained(ckpt, cfg, device="cpu")
    _, val_ds, _ = build_datasets(**cfg["data"])
    assert val_ds.label_to_cat_id == {1: 1, 2: 18, 3: 90}
    with torch.no_grad():
        cand = model.candidates([val_ds[0][0]])[0]
    n = cand["boxes"].shape[0]
    assert cand["boxes"].shape == (n, 4) and cand["scores"].shape == (n,) and cand["labels"].shape == (n,)
    assert n <= 50
    if n:
        assert 1 <= int(cand["labels"].min()) and int(cand["labels"].max()) <= 3
        assert torch.isfinite(cand["boxes"]).all() and torch.isfinite(cand["scores"]).all()
    for signal in signals:
        assert signal in cand, f"{name}: candidates lack {signal!r}"
    if "quality" in signals:
        assert cand["quality"].shape == (n,) and ((cand["quality"] >= 0) & (cand["quality"] <= 1)).all()
    if "variances" in signals:
        assert cand["variances"].shape == (n, 4) and (cand["variances"] > 0).all()

    # the config's eval section as is: every listed method runs on these candidates
    out = run_eval(model, cfg, tmp_path / "eval", device="cpu", progress=False)
    assert list(out["results"]) == cfg["eval"]["methods"]
    assert all(-1 <= out["results"][m]["AP"] <= 1 for m in out["results"])
    assert (tmp_path / "eval" / "results.json").is_file()
