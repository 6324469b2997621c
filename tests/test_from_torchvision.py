"""A torchvision detector as a locconf detector (issue 27, items 1, 2, 3 and 8).

The reference everywhere is the torchvision model's own output: the wrapper's candidates, post-
processed by locconf's hard NMS at the model's ``nms_thresh`` keeping ``detections_per_img``, must
give the same boxes, scores and labels, for Faster R-CNN (and Mask R-CNN's masks), RetinaNet and
FCOS, with random and with trained weights. The order of *exactly* tied scores is the one freedom
torchvision's own output has (its per-class NMS ends with an unstable sort), so detections are
compared in a canonical order: score, then label, then box.
"""

from __future__ import annotations

import argparse
import logging
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from locconf.data import SyntheticScenes
from locconf.models import build_torchvision, from_torchvision
from locconf.models.weight_files import load_matched, load_weights, match_state_dict, read_weights
from locconf.postprocess import postprocess

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 128  # the models' min_size and max_size


class TinyBackbone(nn.Module):
    """Three stride-2 stages after a stride-4 stem: maps "0", "1", "2" at strides 8, 16, 32."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())

        self.stem = nn.Sequential(block(3, channels), block(channels, channels))
        self.stages = nn.ModuleList(block(channels, channels) for _ in range(3))
        self.out_channels = channels

    def forward(self, x):
        x = self.stem(x)
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


def tiny_torchvision(family: str, logits: int, seed: int = 0) -> nn.Module:
    """A small torchvision detector of ``family`` with ``logits`` class outputs (R-CNNs: background included)."""
    torch.manual_seed(seed)
    common = dict(min_size=SIZE, max_size=SIZE)
    backbone = TinyBackbone()
    if family in ("faster_rcnn", "mask_rcnn"):
        anchors = AnchorGenerator(((16.0,), (32.0,), (64.0,)), ((0.5, 1.0, 2.0),) * 3)
        parts = dict(rpn_anchor_generator=anchors, box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
                     box_head=TwoMLPHead(32 * 49, 64), box_predictor=FastRCNNPredictor(64, logits),
                     box_score_thresh=0.01, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                     rpn_batch_size_per_image=64, box_batch_size_per_image=64, **common)
        if family == "mask_rcnn":
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

            return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 14, 2),
                            mask_head=MaskRCNNHeads(32, (16, 16), 1), mask_predictor=MaskRCNNPredictor(16, 16, logits),
                            **parts)
        return FasterRCNN(backbone, **parts)
    if family == "retinanet":
        anchors = AnchorGenerator(((16.0, 20.0), (32.0, 40.0), (64.0, 80.0)), ((0.5, 1.0, 2.0),) * 3)
        return RetinaNet(backbone, logits, anchor_generator=anchors, topk_candidates=300, **common)
    anchors = AnchorGenerator(((16.0,), (32.0,), (64.0,)), ((1.0,),) * 3)
    return FCOS(backbone, logits, anchor_generator=anchors, topk_candidates=300, **common)


def randomize_class_head(model: nn.Module) -> None:
    """Random weights score every location alike near the prior (RetinaNet / FCOS: 0.01, under the
    threshold): spread the class logits so that candidates pass, still random."""
    if isinstance(model, (RetinaNet, FCOS)):
        nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.3)
        nn.init.normal_(model.head.classification_head.cls_logits.bias, std=1.0)


def images(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    """Random images; the second is resized (to 85 x 128) and padded in the batch."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *((SIZE, SIZE) if i % 2 == 0 else (100, 150)), generator=g) for i in range(n)]


def canonical(det: dict, n: int | None = None) -> dict:
    """Detections in (score desc, label, box) order; the first ``n``."""
    b = det["boxes"].numpy()
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], det["labels"].numpy(), -det["scores"].numpy()))
    order = torch.from_numpy(order)[:n]
    return {k: v[order] for k, v in det.items()}


def assert_same_detections(ours: dict, theirs: dict, label_offset: int, cut: bool = False) -> None:
    """The same detections in canonical order. With ``cut`` (the output was truncated at the
    detection limit) the boxes of the lowest score are not compared: which of exactly tied
    boxes survive a cut is left to torchvision's unstable sort."""
    n = len(theirs["boxes"])
    assert 0 < n <= len(ours["boxes"]) and (cut or len(ours["boxes"]) == n)
    a, b = canonical(ours, n), canonical({**theirs, "labels": theirs["labels"] + label_offset})
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
    rows = b["scores"] > b["scores"][-1] if cut else torch.ones(n, dtype=torch.bool)
    assert torch.equal(a["labels"][rows], b["labels"][rows])
    torch.testing.assert_close(a["boxes"][rows], b["boxes"][rows], rtol=0, atol=1e-4)
    if "masks" in theirs:
        torch.testing.assert_close(a["masks"][rows], b["masks"][rows], rtol=0, atol=1e-5)


def check_equivalence(tv: nn.Module, background: bool | None, imgs: list[torch.Tensor]) -> None:
    """The wrapper's candidates + hard NMS at the model's settings == the torchvision model's output."""
    tv.eval()
    wrapped = from_torchvision(tv, background=background)
    assert not wrapped.training  # the wrapper starts in the model's mode
    with torch.no_grad():
        reference = tv(imgs)
    nms_thresh, per_image = wrapped.nms_thresh, wrapped.max_detections
    candidates = wrapped.candidates(imgs)
    detections = wrapped.detect(imgs)
    forward = wrapped(imgs)  # item 8: model(images) in evaluation == detect
    for cand, det, fwd, ref in zip(candidates, detections, forward, reference):
        assert len(cand["boxes"]) > len(ref["boxes"])  # the NMS had work to do
        assert cand["labels"].min() >= 1 and cand["labels"].max() <= wrapped.num_classes
        by_hand = postprocess(cand, "nms", per_image, iou_threshold=nms_thresh)
        cut = len(ref["boxes"]) == per_image
        assert_same_detections(by_hand, {k: ref[k] for k in ("boxes", "scores", "labels")}, wrapped.label_offset, cut)
        assert_same_detections(det, ref, wrapped.label_offset, cut)
        for key in det:
            assert torch.equal(det[key], fwd[key])


# -- item 1: the equivalence --------------------------------------------------------------------


@pytest.mark.parametrize("family,logits,background", [
    ("faster_rcnn", 4, None), ("mask_rcnn", 3, None), ("retinanet", 3, False), ("fcos", 3, False)])
def test_random_weights_give_the_torchvision_output(family, logits, background):
    tv = tiny_torchvision(family, logits)
    randomize_class_head(tv)
    check_equivalence(tv, background, images())


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_background_logit_convention(family):
    """torchvision's convention (logit 0 unused): labels kept, class-0 candidates dropped, so the
    output is torchvision's without its class-0 rows, then the next best."""
    tv = tiny_torchvision(family, 3).eval()
    randomize_class_head(tv)
    wrapped = from_torchvision(tv, background=True)
    assert (wrapped.num_classes, wrapped.label_offset) == (2, 0)
    imgs = images()
    with torch.no_grad():
        reference = tv(imgs)
    for det, ref, cand in zip(wrapped.detect(imgs), reference, wrapped.candidates(imgs)):
        assert (cand["labels"] > 0).all()
        real = {k: v[ref["labels"] > 0] for k, v in ref.items()}
        assert len(real["boxes"]) < len(ref["boxes"])  # the random logit 0 did score
        assert_same_detections(det, real, label_offset=0, cut=True)
    with pytest.raises(ValueError, match="background"):
        from_torchvision(tv)  # several logits: the convention must be said


def _train(model: nn.Module, label_offset: int, iterations: int = 20) -> None:
    """A few dozen SGD steps on synthetic scenes, so that scores are those of a model that learnt."""
    data = SyntheticScenes(8, image_size=SIZE, num_classes=2, min_size=16, max_size=48, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    model.train()
    for step in range(iterations):
        batch = [data[(2 * step + j) % len(data)] for j in range(2)]
        targets = [{"boxes": t["boxes"], "labels": t["labels"] - label_offset} for _, t in batch]
        loss = sum(model([im for im, _ in batch], targets).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    model.eval()


@pytest.mark.parametrize("family,logits,background,offset", [
    ("faster_rcnn", 3, None, 0), ("retinanet", 2, False, 1), ("fcos", 2, False, 1)])
def test_trained_weights_give_the_torchvision_output(family, logits, background, offset):
    tv = tiny_torchvision(family, logits, seed=1)
    randomize_class_head(tv)  # a few dozen focal-loss steps from the 0.01 prior leave every score near it
    _train(tv, offset)
    data = SyntheticScenes(2, image_size=SIZE, num_classes=2, min_size=16, max_size=48, seed=4)
    check_equivalence(tv, background, [data[i][0] for i in range(2)])


def test_fcos_candidates_carry_centerness_as_quality():
    tv = tiny_torchvision("fcos", 2).eval()
    randomize_class_head(tv)
    cand = from_torchvision(tv, background=False).candidates(images(1))[0]
    assert {"quality", "cls_scores"} <= set(cand)
    torch.testing.assert_close(cand["scores"], torch.sqrt(cand["cls_scores"] * cand["quality"]))
    quality = postprocess(cand, "quality", 50)  # a quality-aware method runs on a torchvision detector
    assert 0 < len(quality["boxes"]) <= 50


def test_wrapper_trains_with_locconf_labels_and_restores_modes():
    tv = tiny_torchvision("retinanet", 2)
    wrapped = from_torchvision(tv, background=False)
    data = SyntheticScenes(2, image_size=SIZE, num_classes=2, seed=0)
    (img, target), _ = data[0], None
    assert target["labels"].min() >= 1
    losses = wrapped([img], [target])  # labels 1..K become torchvision's 0..K-1
    assert set(losses) == {"classification", "bbox_regression"} and torch.isfinite(sum(losses.values()))
    with pytest.raises(ValueError, match="labels in 1..2"):
        wrapped([img], [dict(target, labels=torch.zeros_like(target["labels"]))])
    wrapped.detect([img])
    assert wrapped.training and tv.training
    other = from_torchvision(tiny_torchvision("retinanet", 2, seed=7), background=False)
    other.load_state_dict(tv.state_dict())  # a plain torchvision state dict (e.g. an old torchvision_frcnn run)
    assert torch.equal(other.torchvision_model.head.classification_head.cls_logits.bias,
                       tv.head.classification_head.cls_logits.bias)
    other.load_state_dict(wrapped.state_dict())  # and the wrapper's own, under torchvision_model.
    wrapped.candidates_per_image = 5
    assert all(len(c["boxes"]) <= 5 for c in wrapped.candidates(images()))
    with pytest.raises(ValueError, match="FasterRCNN, MaskRCNN, RetinaNet or FCOS"):
        from_torchvision(nn.Linear(2, 2))


# -- item 8: model(images) in evaluation == detect, for every locconf family ----------------------


TINY_RCNN = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=96)
TINY_ONE_STAGE = dict(fpn_channels=16, head_convs=1, min_size=96, max_size=96)


@pytest.mark.parametrize("arch,options", [
    ("rcnn", {}), ("rcnn", {"quality": "dir"}), ("rcnn", {"quality": "kl"}),
    ("one_stage", {"head": "atss"}), ("one_stage", {"head": "gfl"}), ("one_stage", {"head": "clq"}),
    ("torchvision_frcnn", {}),
], ids=["rcnn", "rcnn_dir", "rcnn_kl", "atss", "gfl", "clq", "torchvision_frcnn"])
def test_eval_forward_is_detect(arch, options):
    from locconf.experiment import build_model

    torch.manual_seed(0)
    model = build_model(arch=arch, num_classes=2, **(TINY_ONE_STAGE if arch == "one_stage" else TINY_RCNN),
                        **options).eval()
    imgs = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    with torch.no_grad():
        out = model(imgs)
    dets = model.detect(imgs)
    assert len(out) == len(dets) == 2
    for o, d in zip(out, dets):
        assert o.keys() == d.keys()
        for key in o:
            assert torch.equal(o[key], d[key])
        assert len(o["boxes"]) <= model.max_detections
    assert not model.training
    model.max_detections = 3
    assert all(len(o["boxes"]) <= 3 for o in model(imgs))


# -- item 2: weight files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepforest_files(tmp_path_factory):
    """A torchvision RetinaNet as DeepForest saves it: one class ("Tree", label 0), no background
    logit; a plain state_dict (``torch.save(m.model.state_dict())``), a Lightning checkpoint
    (``state_dict`` under the LightningModule's ``model.`` prefix, with ``label_dict``) and a
    Lightning checkpoint that also pickles a Python object (its hyper-parameters)."""
    torch.manual_seed(0)
    tv = _build_deepforest(None).torchvision_model  # a ResNet-18 trunk keeps the files small
    randomize_class_head(tv)
    tv.eval()
    folder = tmp_path_factory.mktemp("deepforest")
    state = tv.state_dict()
    torch.save(state, folder / "plain.pt")
    lightning = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                 "state_dict": OrderedDict(("model." + k, v) for k, v in state.items()),
                 "label_dict": {"Tree": 0}, "numeric_to_label_dict": {0: "Tree"},
                 "hyper_parameters": {"config": {"num_classes": 1, "nms_thresh": 0.05}},
                 "optimizer_states": [], "lr_schedulers": []}
    torch.save(lightning, folder / "deepforest.ckpt")
    torch.save(dict(lightning, hyper_parameters=argparse.Namespace(num_classes=1)), folder / "pickled.ckpt")
    return tv, folder


def _build_deepforest(path, **kw):
    """DeepForest's RetinaNet settings (one class, NMS at 0.05, 300 detections), small images."""
    return build_torchvision(1, name="retinanet_resnet50_fpn", weights=None if path is None else str(path),
                             backbone="resnet18", min_size=SIZE, max_size=SIZE, score_thresh=0.05, nms_thresh=0.05,
                             detections_per_img=300, **kw)


def test_deepforest_checkpoints_load_and_reproduce_the_model(deepforest_files):
    tv, folder = deepforest_files
    imgs = images()
    with torch.no_grad():
        reference = tv(imgs)
    for name in ("plain.pt", "deepforest.ckpt"):
        model = _build_deepforest(folder / name).eval()
        assert (model.num_classes, model.label_offset, model.nms_thresh) == (1, 1, 0.05)  # no background logit
        for key, value in tv.state_dict().items():
            assert torch.equal(model.torchvision_model.state_dict()[key], value), key
        for det, ref in zip(model(imgs), reference):
            # DeepForest's "Tree" (0) is locconf's label 1
            assert_same_detections(det, ref, label_offset=1, cut=len(ref["boxes"]) == 300)
    assert model.categories == [{"id": 1, "name": "Tree"}]  # from the Lightning checkpoint's label_dict


def test_unsafe_file_is_refused_unless_trusted(deepforest_files, caplog):
    tv, folder = deepforest_files
    with pytest.raises(ValueError, match=r"argparse\.Namespace.*trust_weights: true"):
        read_weights(folder / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"argparse\.Namespace"):
        _build_deepforest(folder / "pickled.ckpt")
    with caplog.at_level(logging.WARNING, logger="locconf"):
        model = _build_deepforest(folder / "pickled.ckpt", trust_weights=True)
    assert "weights_only=False" in caplog.text and "argparse.Namespace" in caplog.text
    key = "head.classification_head.cls_logits.bias"
    assert torch.equal(model.torchvision_model.state_dict()[key], tv.state_dict()[key])


def test_mismatched_weights_name_the_keys_and_the_cause(tmp_path):
    retina = tiny_torchvision("retinanet", 2)
    torch.save(retina.state_dict(), tmp_path / "retina.pt")
    # another number of classes: the classification head's shape
    with pytest.raises(ValueError, match=r"(?s)cls_logits\.weight: file \(12, 32, 3, 3\), model \(18, 32, 3, 3\)"
                                         r".*another number of classes"):
        load_weights(tiny_torchvision("retinanet", 3), tmp_path / "retina.pt")
    # another architecture: most keys differ
    with pytest.raises(ValueError, match=r"(?s)missing from the file.*unknown to the model.*another architecture"):
        load_weights(tiny_torchvision("faster_rcnn", 3), tmp_path / "retina.pt")
    # a prefix is found and stripped, whatever it is
    torch.save({"model": {"net.module." + k: v for k, v in retina.state_dict().items()}}, tmp_path / "prefixed.pt")
    state, _ = read_weights(tmp_path / "prefixed.pt")
    matched, prefix, outside = match_state_dict(state, retina)
    assert prefix == "net.module." and not outside and matched.keys() == retina.state_dict().keys()
    load_matched(tiny_torchvision("retinanet", 2, seed=5), matched, "prefixed.pt")
    # files that hold no state dict
    torch.save({"epoch": 1}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="no state dict"):
        read_weights(tmp_path / "nothing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a file written by torch.save"):
        read_weights(tmp_path / "text.pt")


def test_safetensors_and_background_inferred_from_the_file(tmp_path):
    from safetensors.torch import save_file

    from locconf.models.torchvision_builders import TORCHVISION_BUILDERS

    assert TORCHVISION_BUILDERS["fcos_resnet50_fpn"] == "fcos"
    torch.manual_seed(0)
    source = build_torchvision(2, name="fcos_resnet50_fpn", background_class=True, backbone="resnet18",
                               min_size=SIZE, max_size=SIZE)
    state = {k: v.contiguous() for k, v in source.torchvision_model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = build_torchvision(2, name="fcos_resnet50_fpn", weights=str(tmp_path / "model.safetensors"),
                               backbone="resnet18", min_size=SIZE, max_size=SIZE).eval()
    assert loaded.label_offset == 0 and loaded.num_classes == 2  # 3 logits in the file for 2 classes
    source.eval()
    imgs = images(1)
    for a, b in zip(loaded.candidates(imgs), source.candidates(imgs)):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['box_score_thresh'\]"):
        build_torchvision(2, name="fcos_resnet50_fpn", box_score_thresh=0.1)
    with pytest.raises(ValueError, match="model.name must be a torchvision detection builder"):
        build_torchvision(2, name="ssd300_vgg16")


# -- item 3: the commands ------------------------------------------------------------------------------


def test_torchvision_arch_through_train_eval_predict(tmp_path, capsys):
    """`arch: torchvision` through `locconf train`, `eval` (with the checkpoint, and without one from
    a weights file: the config alone), `predict` without a checkpoint and `--trust-weights`."""
    import json

    import yaml

    from locconf.cli import main, run_command
    from locconf.experiment import load_trained

    torch.manual_seed(0)
    model = {"arch": "torchvision", "name": "fcos_resnet50_fpn", "backbone": "resnet18", "min_size": 96,
             "max_size": 96, "score_thresh": 0.01}  # two steps from the prior: scores are low
    cfg = {"model": model,
           "data": {"source": "synthetic", "root": str(tmp_path / "data"),
                    "synthetic": {"num_train": 4, "num_val": 2, "image_size": 96, "num_classes": 2}},
           "train": {"iterations": 2, "batch_size": 2, "lr": 0.001, "warmup_iters": 1, "out_dir": str(tmp_path / "run"),
                     "checkpoint_every": 2, "progress": False},
           "eval": {"methods": ["nms", "quality"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    ckpt = tmp_path / "run" / "checkpoint_0000002.pth"
    trained, _ = load_trained(ckpt)
    assert trained.family == "fcos" and trained.num_classes == 2 and trained.label_offset == 1
    names = [c["name"] for c in trained.categories]
    assert len(names) == 2
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    assert set(json.loads((tmp_path / "ev" / "results.json").read_text())["methods"]) == {"nms", "quality"}

    # the trained weights as a user's torchvision file: eval and predict from the config alone
    torch.save(trained.torchvision_model.state_dict(), tmp_path / "fcos.pt")
    (tmp_path / "file.yaml").write_text(yaml.safe_dump(dict(cfg, model=dict(model, weights=str(tmp_path / "fcos.pt")))))
    assert main(["eval", str(tmp_path / "file.yaml"), "--out", str(tmp_path / "ev2")]) == 0
    assert (json.loads((tmp_path / "ev2" / "results.json").read_text())["methods"]
            == json.loads((tmp_path / "ev" / "results.json").read_text())["methods"])
    image = tmp_path / "data" / "val" / "000000.png"
    assert main(["predict", str(image), "--config", str(tmp_path / "file.yaml"), "--out", str(tmp_path / "vis.png")]) == 0
    assert (tmp_path / "vis.png").stat().st_size > 0
    assert any(name in (tmp_path / "vis.csv").read_text() for name in names)  # named from the data's JSON
    with pytest.raises(ValueError, match="--out is required"):
        run_command(["eval", str(tmp_path / "file.yaml")])
    with pytest.raises(ValueError, match="checkpoint is required"):
        run_command(["eval", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "ev3")])

    # a file that pickles an object: refused, then loaded with --trust-weights
    torch.save({"state_dict": trained.torchvision_model.state_dict(), "hparams": argparse.Namespace(lr=0.1)},
               tmp_path / "pickled.ckpt")
    (tmp_path / "pickled.yaml").write_text(yaml.safe_dump(dict(cfg, model=dict(model, weights=str(tmp_path / "pickled.ckpt")))))
    with pytest.raises(ValueError, match="argparse.Namespace"):
        run_command(["eval", str(tmp_path / "pickled.yaml"), "--out", str(tmp_path / "ev4")])
    assert main(["eval", str(tmp_path / "pickled.yaml"), "--out", str(tmp_path / "ev4"), "--trust-weights"]) == 0
    (tmp_path / "rcnn.yaml").write_text(yaml.safe_dump(dict(cfg, model={"arch": "rcnn"})))
    with pytest.raises(ValueError, match="--trust-weights is for"):
        run_command(["eval", str(tmp_path / "rcnn.yaml"), "--checkpoint", str(ckpt), "--trust-weights"])


def test_bench_torchvision_variants_build_on_the_setting():
    """`locconf bench` variants tv_fasterrcnn / tv_retinanet / tv_fcos: the setting's trunk, image size and
    candidate count under build_torchvision's names, a configuration that checks and builds."""
    from locconf.bench import settings
    from locconf.experiment import build_model, check_config

    setting = settings.synthetic_setting(2)
    for name in ("tv_fasterrcnn", "tv_retinanet", "tv_fcos"):
        cfg = check_config(settings.make_config(setting, settings.EXTRA_VARIANTS[name], 0, "unused", 3))
        model_cfg = cfg["model"]
        assert model_cfg["arch"] == "torchvision" and model_cfg["backbone"] == "resnet18"
        assert (model_cfg["min_size"], model_cfg["max_size"], model_cfg["candidates_per_image"]) == (128, 128, 1000)
        assert "fpn_channels" not in model_cfg and "channels_last" not in model_cfg
        model = build_model(**model_cfg)
        assert model.num_classes == 3 and model.candidates_per_image == 1000
        assert model.torchvision_model.transform.min_size == (128,)
