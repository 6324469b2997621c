"""One-stage detectors (ATSS, GFL, CLQ): API, candidates, empty images, training, joint-score quality,
and one training step for every shipped one-stage config."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from locconf.evaluation import confidence_correlation, pearson
from locconf.data import SyntheticScenes, build_transforms
from locconf.postprocess import REQUIRED_SIGNALS
from locconf.engine.train import train
from locconf.experiment import build_model, load_config
from locconf.models import build_one_stage
from locconf.losses import distribution_focal_loss
from locconf.models.dense import iou_statistics
from locconf.models.dense.common import distribution_expectation
from locconf.models.one_stage import HEADS, OneStageDetector
from locconf.postprocess import postprocess

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ONE_STAGE_CONFIGS = ["neon_atss_r18", "neon_clq_r18", "neon_gfl_r18", "synthetic_clq_r18"]
# candidate fields beyond boxes / scores / labels, per head
EXTRA_FIELDS = {"atss": {"quality", "cls_scores"}, "clq": {"quality", "cls_scores"}, "gfl": set()}


# every test here runs on one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(head: str, num_classes: int = 3, size: int = 96, **kw) -> OneStageDetector:
    opts = dict(fpn_channels=16, head_convs=1, head_norm_groups=8, min_size=size, max_size=size)
    opts.update(kw)
    return build_one_stage(num_classes, head=head, **opts)


def scenes(n: int, size: int = 96, seed: int = 0, **kw) -> SyntheticScenes:
    return SyntheticScenes(n, image_size=size, num_classes=kw.pop("num_classes", 3), min_size=size // 8,
                           max_size=size * 3 // 8, max_objects=5, seed=seed, **kw)


def empty_target() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


# -- building ---------------------------------------------------------------------------------


def test_build_through_experiment_and_the_package():
    model = build_model(arch="one_stage", num_classes=2, head="clq", candidates_per_image=77, fpn_channels=16,
                        head_norm_groups=8)
    assert isinstance(model, OneStageDetector)
    assert (model.head_type, model.num_classes, model.candidates_per_image) == ("clq", 2, 77)
    assert model.default_method == "nms"
    with pytest.raises(ValueError, match="headd"):
        build_model(arch="one_stage", num_classes=2, headd="clq")
    p6p7 = tiny("atss", extra_levels="p6p7")
    assert len(p6p7.head.scales) == 5 and len(tiny("atss", extra_levels="none").head.scales) == 3


@pytest.mark.parametrize("bad, name", [
    (dict(head="fcos"), "head"),
    (dict(num_classes=0), "num_classes"),
    (dict(fpn_channels=0), "fpn_channels"),
    (dict(anchor_sizes=[16, 32]), "anchor_sizes"),
    (dict(anchor_sizes=[16, 32, -64, 128]), "anchor_sizes"),
    (dict(aspect_ratios=[]), "aspect_ratios"),
    (dict(topk=0), "topk"),
    (dict(score_thresh=1.5), "score_thresh"),
    (dict(score_thresh=float("nan")), "score_thresh"),
    (dict(candidates_per_image=0), "candidates_per_image"),
    (dict(topk_candidates=0), "topk_candidates"),
    (dict(head_norm_groups=5), "head_norm_groups"),
    (dict(head_convs=-1), "head_convs"),
    (dict(extra_levels="p6"), "extra_levels"),
    (dict(min_size=96, max_size=64), "max_size"),
    (dict(backbone="not_a_timm_model"), "backbone"),
    (dict(norm="layer"), "norm"),
    (dict(focal_alpha=2.0), "focal_alpha"),
    (dict(qfl_beta=-1.0), "qfl_beta"),
    (dict(returned_layers=(0, 1)), "returned_layers"),
    (dict(lqe_channels=0), "lqe_channels"),
    (dict(gfl_box="corners"), "gfl_box"),
    (dict(reg_max=0), "reg_max"),
    (dict(dfl_weight=-0.25), "dfl_weight"),
])
def test_bad_arguments_name_the_argument(bad, name):
    kw = dict(num_classes=3, head="atss", fpn_channels=16, head_norm_groups=8)
    kw.update(bad)
    with pytest.raises(ValueError, match=name):
        build_one_stage(kw.pop("num_classes"), **kw)


# -- candidates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_candidates_fields_shapes_and_image_coordinates(head):
    torch.manual_seed(0)
    model = tiny(head, score_thresh=0.0, candidates_per_image=300, topk_candidates=200).eval()
    # a 48 x 64 image is resized to 96 x 128 inside the model: boxes must come back in 48 x 64 pixels
    images = [torch.rand(3, 48, 64), torch.rand(3, 96, 96)]
    with torch.no_grad():
        cands = model.candidates(images)
    assert len(cands) == 2
    for cand, (h, w) in zip(cands, [(48, 64), (96, 96)]):
        assert set(cand) == {"boxes", "scores", "labels"} | EXTRA_FIELDS[head]
        n = cand["boxes"].shape[0]
        assert n == 300  # every pair passes score_thresh 0, the cap applies
        assert cand["boxes"].shape == (n, 4) and cand["boxes"].dtype == torch.float32
        assert all(cand[k].shape == (n,) for k in cand if k != "boxes")
        assert cand["labels"].dtype == torch.int64 and cand["labels"].min() >= 1 and cand["labels"].max() <= 3
        b = cand["boxes"]
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert (b[:, 2:] >= b[:, :2]).all()
        assert ((cand["scores"] > 0) & (cand["scores"] <= 1)).all()
        if "quality" in cand:
            assert ((cand["quality"] >= 0) & (cand["quality"] <= 1)).all()
        if head == "atss":  # score = cls x centerness
            torch.testing.assert_close(cand["scores"], cand["cls_scores"] * cand["quality"])
        if head == "clq":  # joint score = cls x LQE score, LQE in (0, 1)
            assert (cand["scores"] <= cand["cls_scores"]).all()
    # per-level top-k: at most topk_candidates pairs per level survive before the image-wide cap
    few = tiny(head, score_thresh=0.0, candidates_per_image=10**6, topk_candidates=7).eval()
    with torch.no_grad():
        assert few.candidates([images[1]])[0]["boxes"].shape[0] == 7 * len(few.head.scales)


@pytest.mark.parametrize("head", HEADS)
def test_no_candidates_are_correctly_shaped_and_detect_works(head):
    torch.manual_seed(0)
    model = tiny(head, score_thresh=0.999).eval()  # an untrained model scores ~0.01
    with torch.no_grad():
        cand = model.candidates([torch.rand(3, 80, 96)])[0]
    assert cand["boxes"].shape == (0, 4) and cand["scores"].shape == (0,) and cand["labels"].shape == (0,)
    assert cand["labels"].dtype == torch.int64
    model.train()
    det = model.detect([torch.rand(3, 80, 96)])[0]
    assert model.training  # detect restores the mode
    assert det["boxes"].shape == (0, 4)


def test_detect_applies_the_default_method_and_checks_it():
    torch.manual_seed(0)
    model = tiny("clq", score_thresh=0.0, candidates_per_image=200).eval()
    images = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        cand = model.candidates(images)[0]
    expected = postprocess(cand, "nms", max_detections=20)
    got = model.detect(images, max_detections=20)[0]
    torch.testing.assert_close(got["boxes"], expected["boxes"])
    torch.testing.assert_close(got["scores"], expected["scores"])
    quality = model.detect(images, method="quality", max_detections=20)[0]
    assert quality["boxes"].shape[0] <= 20 and "quality" in quality
    with pytest.raises(ValueError, match="variances"):
        model.detect(images, method="var-voting")
    with pytest.raises(ValueError, match="method"):
        model.detect(images, method="bogus")
    with pytest.raises(ValueError, match="quality"):
        tiny("gfl").detect(images, method="iou-guided")


def test_channels_last_gives_the_same_candidates():
    torch.manual_seed(0)
    a = tiny("atss", score_thresh=0.0, candidates_per_image=50).eval()
    b = tiny("atss", score_thresh=0.0, candidates_per_image=50, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    images = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        ca, cb = a(images)[0], b(images)[0]
    torch.testing.assert_close(ca["scores"], cb["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ca["boxes"], cb["boxes"], rtol=1e-4, atol=1e-3)


# -- training ---------------------------------------------------------------------------------


LOSS_NAMES = {"atss": {"loss_cls", "loss_box", "loss_centerness"}, "gfl": {"loss_cls", "loss_box", "loss_dfl"},
              "clq": {"loss_cls", "loss_box", "loss_iou"}}


@pytest.mark.parametrize("head", HEADS)
def test_losses_on_empty_and_mixed_images(head):
    torch.manual_seed(0)
    model = tiny(head).train()
    ds = scenes(2, min_objects=2)
    images = [ds[0][0], ds[1][0]]
    losses = model(images, [ds[0][1], empty_target()])
    assert set(losses) == LOSS_NAMES[head]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert all(v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # only empty images: classification (all negatives) only, finite, and backward works
    model.zero_grad()
    losses = model(images, [empty_target(), empty_target()])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"] > 0 and all(v == 0 for k, v in losses.items() if k != "loss_cls")
    sum(losses.values()).backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("head", HEADS)
def test_losses_under_mixed_precision(head):
    """Autocast (bfloat16 on the CPU, as float16 on CUDA, where train() turns it on by default):
    half-precision logits take the float32 soft IoU targets, and the losses stay finite. A GPU run
    found GFL and CLQ failing here ("Index put requires the source and destination dtypes match")."""
    torch.manual_seed(0)
    model = tiny(head).train()
    ds = scenes(2, min_objects=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([ds[0][0], ds[1][0]], [ds[0][1], ds[1][1]])
    assert set(losses) == LOSS_NAMES[head]
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()


def test_clq_joint_loss_trains_the_lqe_branch_and_not_the_predicted_iou():
    """The LQE score is embedded in the classification output: the joint loss trains the class
    output, the LQE branch and the regression tower it sees; the predicted IoU that guides the LQE
    branch is detached there and is trained by its own loss only."""
    torch.manual_seed(0)
    model = tiny("clq").train()
    ds = scenes(1, min_objects=2)
    losses = model(*map(list, zip(ds[0])))
    losses["loss_cls"].backward(retain_graph=True)
    for module in (model.head.cls_logits, model.head.lqe, model.head.reg_tower):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.quality_pred.parameters())
    model.zero_grad()
    losses["loss_iou"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.quality_pred.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.head.lqe.parameters())


def test_iou_statistics_hand_computed():
    p = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])[None, None]  # (1, 1, 2, 3)
    stats = iou_statistics(p)
    assert stats.shape == (1, 3, 2, 3)
    torch.testing.assert_close(stats[0, 0], p[0, 0])
    torch.testing.assert_close(stats[0, 1], torch.tensor([[0.5, 0.6, 0.6], [0.5, 0.6, 0.6]]))
    # means over the neighbours inside the map: corners see 4 values, the middle column 6
    mean = torch.tensor([[(0.1 + 0.2 + 0.4 + 0.5) / 4, 2.1 / 6, (0.2 + 0.3 + 0.5 + 0.6) / 4],
                         [(0.1 + 0.2 + 0.4 + 0.5) / 4, 2.1 / 6, (0.2 + 0.3 + 0.5 + 0.6) / 4]])
    torch.testing.assert_close(stats[0, 2], mean)


def test_distribution_expectation_hand_computed():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]))  # (1/6, 1/3, 1/2) and a point mass at 0
    torch.testing.assert_close(distribution_expectation(logits), torch.tensor([1 / 3 + 1.0, 0.0]))


def test_gfl_decodes_the_expected_distances_in_strides_and_its_dfl():
    """With a zero box layer every side distribution is uniform over 0..16: expectation 8 strides,
    so every positive's box is its anchor centre +- 8 strides, and the DFL of each side is log 17
    whatever the target (both bracketing bins have probability 1/17)."""
    torch.manual_seed(0)
    model = tiny("gfl")
    assert model.head.bbox_pred.out_channels == 4 * 17
    with torch.no_grad():
        model.head.bbox_pred.weight.zero_()
        model.head.bbox_pred.bias.zero_()
    ds = scenes(2, min_objects=2)
    images, targets = map(list, zip(*[ds[i] for i in range(2)]))
    samples = model.positive_samples(images, targets)
    strides = {8, 16, 32, 64}  # P3-P6 of the tiny model
    for sample in samples:
        wh = sample["boxes"][:, 2:] - sample["boxes"][:, :2]
        assert len(wh) > 0 and torch.equal(wh[:, 0], wh[:, 1])
        assert set((wh[:, 0] / 16).round().tolist()) <= strides
        torch.testing.assert_close(wh[:, 0] / 16, (wh[:, 0] / 16).round())
        centers = (sample["boxes"][:, :2] + sample["boxes"][:, 2:]) / 2
        stride = (wh[:, :1] / 16)
        torch.testing.assert_close(centers / stride, (centers / stride).round())  # anchor centres: k * stride
    model.train()
    losses = model(images, targets)
    assert losses["loss_dfl"].item() == pytest.approx(0.25 * math.log(17), rel=1e-5)
    assert distribution_focal_loss(torch.zeros(1, 17), torch.tensor([3.3])).item() == pytest.approx(math.log(17))


def test_gfl_delta_box_branch_is_kept_as_an_option():
    torch.manual_seed(0)
    model = tiny("gfl", gfl_box="delta").train()
    assert model.head.bbox_pred.out_channels == 4 and model.head.reg_max is None
    ds = scenes(1, min_objects=2)
    assert set(model(*map(list, zip(ds[0])))) == {"loss_cls", "loss_box"}
    assert tiny("atss", gfl_box="distribution").head.reg_max is None  # only gfl has the distribution
    assert tiny("gfl", reg_max=8).head.bbox_pred.out_channels == 4 * 9


def test_bad_inputs_name_the_argument():
    model = tiny("atss").train()
    image = torch.rand(3, 96, 96)
    good = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match="targets"):
        model([image])
    with pytest.raises(ValueError, match="labels"):
        model([image], [{"boxes": good["boxes"], "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="labels"):
        model([image], [{"boxes": good["boxes"], "labels": torch.tensor([4])}])
    with pytest.raises(ValueError, match="boxes"):
        model([image], [{"boxes": torch.tensor([[40.0, 10.0, 10.0, 40.0]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="boxes"):
        model([image], [{"boxes": torch.zeros(1, 3), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="images"):
        model([], [])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model([torch.rand(96, 96)], [good])


# Short training runs, shared by the loss test and the correlation test: 8 synthetic scenes (96 px,
# 2 classes), 150 SGD steps of 4 images, one run per head from the same seed.
TRAIN_SEED, TRAIN_ITERS = 0, 150


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kw = dict(num_classes=2, seed=TRAIN_SEED)
    train_ds = scenes(8, transforms=build_transforms(True, jitter=False), **kw)
    val = scenes(8, **kw)  # the same scenes, without augmentation
    images, targets = map(list, zip(*[val[i] for i in range(len(val))]))
    runs = {}
    try:
        for head in HEADS:
            torch.manual_seed(TRAIN_SEED)
            model = tiny(head, num_classes=2)
            out = tmp_path_factory.mktemp(head)
            train(model, train_ds, iterations=TRAIN_ITERS, batch_size=4, lr=0.02, warmup_iters=20, out_dir=out,
                  log_every=1, checkpoint_every=10**6, clip_grad_norm=10.0, seed=TRAIN_SEED, progress=False)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            model.eval()
            with torch.no_grad():
                candidates = model.candidates(images)
            runs[head] = {"records": [r for r in records if r["type"] == "train"], "candidates": candidates,
                          "positives": model.positive_samples(images, targets)}
    finally:
        torch.set_num_threads(threads)
    return runs, targets


@pytest.mark.parametrize("head", HEADS)
def test_training_losses_are_finite_and_fall(trained, head):
    records = trained[0][head]["records"]
    assert len(records) == TRAIN_ITERS
    for name in LOSS_NAMES[head] | {"total"}:
        values = [r[name] for r in records]
        assert all(math.isfinite(v) for v in values), name
    totals = [r["total"] for r in records]
    first, last = np.mean(totals[:10]), np.mean(totals[-10:])
    assert last < 0.6 * first, (head, first, last)
    # every term falls, not only the sum; except GFL's QFL: its soft target is the IoU of the
    # predicted box, which starts near 0 (uniform side distributions decode to boxes about four
    # times the anchor), so the QFL starts near 0 and grows as the boxes improve
    for name in LOSS_NAMES[head] - ({"loss_cls"} if head == "gfl" else set()):
        values = [r[name] for r in records]
        assert np.mean(values[-10:]) < np.mean(values[:10]), (head, name)


def _pearson_positives(samples: list[dict], field: str) -> tuple[float, int]:
    iou = torch.cat([s["iou"] for s in samples])
    return pearson(torch.cat([s[field] for s in samples]), iou), int(iou.numel())


# The comparison is made where the three losses differ: on the boxes predicted by the anchors that
# ATSS assigns to a ground truth (the same assignment for every head). ATSS's focal loss pushes the
# class score of all of them to 1 whatever the IoU of their boxes; QFL (gfl) and CLQ's joint loss
# push it to that IoU. Over seeds 0-9 of exactly this setting the joint scores led ATSS's class score
# by 0.07-0.31 (gfl) and 0.11-0.33 (clq) in Pearson r (n = 73-135 positives), measured with GFL's
# former delta box branch and CLQ's former 1-D LQE branch. With GFL's distribution + DFL and CLQ's
# feature-seeing LQE branch (issue 13), seed 0 gave gfl 0.72 and clq 0.70 against ATSS's 0.49
# (n = 132; seeds 1-9 not rerun). MARGIN asks for a clear lead, below the smallest one seen.
MARGIN = 0.05


@pytest.mark.parametrize("head", ["gfl", "clq"])
def test_joint_score_tracks_the_iou_better_than_atss_classification(trained, head):
    runs, targets = trained
    atss_r, n = _pearson_positives(runs["atss"]["positives"], "cls_scores")
    joint_r, n_joint = _pearson_positives(runs[head]["positives"], "scores")
    print(f"\n[{head}] Pearson with the IoU on ATSS positives (n={n}): joint score {joint_r:.3f}, "
          f"ATSS class score {atss_r:.3f}")  # shown by pytest -s; the README quotes it
    assert n == n_joint >= 50  # the same ATSS positives, enough of them for a meaningful r
    assert joint_r > atss_r + MARGIN, (head, joint_r, atss_r)
    # on all candidates with IoU > 0.5 (DIR, Fig. 4) every score is informative about the IoU
    stats = confidence_correlation(runs[head]["candidates"], targets, min_iou=0.5)
    assert stats["score"]["pearson"] > 0.3 and stats["score"]["n"] >= 50, stats
    if head == "clq":  # the predicted IoU that guides the LQE branch is itself informative
        assert stats["quality"]["pearson"] > 0.3, stats


def test_positive_samples_are_the_atss_positives_with_their_iou():
    torch.manual_seed(0)
    model = tiny("clq").train()
    ds = scenes(2, min_objects=2)
    images, targets = map(list, zip(*[ds[i] for i in range(2)]))
    images[1] = torch.nn.functional.interpolate(images[1][None], size=(64, 80))[0]  # another size and scale
    targets[1] = dict(targets[1], boxes=targets[1]["boxes"] * torch.tensor([80 / 96, 64 / 96] * 2))
    targets.append(empty_target())
    images.append(torch.rand(3, 96, 96))
    samples = model.positive_samples(images, targets)
    assert model.training and len(samples) == 3
    assert samples[2]["boxes"].shape == (0, 4) and samples[2]["iou"].shape == (0,)
    for sample, target in zip(samples[:2], targets[:2]):
        n = sample["boxes"].shape[0]
        assert n >= target["boxes"].shape[0]  # ATSS gives every (visible, not tiny) object positives
        assert set(sample) == {"boxes", "iou", "labels", "scores", "quality", "cls_scores"}
        assert all(v.shape[0] == n for v in sample.values())
        # `iou` is the IoU of the returned box (input coordinates) with a ground truth of its class
        from locconf.boxes import box_iou

        iou = box_iou(sample["boxes"], target["boxes"])
        same = sample["labels"][:, None] == target["labels"][None, :]
        assert ((iou - sample["iou"][:, None]).abs().lt(1e-4) & same).any(dim=1).all()


# -- one training step per shipped config ---------------------------------------------------------


@pytest.mark.parametrize("name", ONE_STAGE_CONFIGS)
def test_config_builds_and_trains_one_step(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    model_cfg = copy.deepcopy(cfg["model"])
    assert model_cfg["arch"] == "one_stage"
    # shrink the sizes only; every other key of the config is kept
    model_cfg.update(fpn_channels=16, head_norm_groups=8, min_size=96, max_size=96)
    torch.manual_seed(0)
    model = build_model(num_classes=3, **model_cfg)
    ds = scenes(2, min_objects=1)
    images, targets = zip(*[ds[i] for i in range(2)])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["train"].get("lr", 0.01) * 0.1, momentum=0.9)
    model.train()
    losses = model(list(images), list(targets))
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # every evaluation method of the config can run on this detector's candidates
    model.eval()
    with torch.no_grad():
        cand = model.candidates([images[0]])[0]
    for method in cfg["eval"].get("methods", []):
        need = REQUIRED_SIGNALS[method]
        assert need is None or need in cand, (name, method)
        postprocess(cand, method)
