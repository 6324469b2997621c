"""The two-stage detector with quality heads: API, shapes, edge cases, and what each head learns.

The learning tests share one from-scratch baseline (trained once per session on synthetic scenes)
and fine-tune each head from it for a short budget at a low learning rate, so that the quality
heads learn on a detector whose boxes already mean something. Measured on this 2-core CPU
(single thread, seed 0; ``pytest -s -k learns`` prints it): the predicted quality's Pearson
correlation with the true IoU of the candidates exceeded the classification score's by 0.105
(DIR-foresight) to 0.216 (IoU-Net); the tests demand 0.05.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from locconf.evaluation import confidence_correlation, match_to_ground_truth, pearson
from locconf.boxes import elementwise_box_iou, elementwise_integrity, elementwise_purity, iou_from_purity_integrity
from locconf.data import SyntheticScenes
from locconf.engine.train import train
from locconf.heads import DirectIoUHead, DIRHead, RoIBatch, kl_loss
from locconf.models import build_rcnn
from locconf.models.rcnn import DEFAULT_METHODS, QUALITY_HEADS
from locconf.postprocess import METHODS

HEADS = [q for q in QUALITY_HEADS if q is not None]
TINY = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=128, rpn_post_nms_top_n_test=200,
            candidates_per_image=150)
SMALL = dict(fpn_channels=32, representation_size=128, min_size=128, max_size=128, box_batch_size_per_image=64,
             rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=100, candidates_per_image=100)


# every test here runs on one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _images_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 112, generator=g)]
    targets = [dict(boxes=torch.tensor([[10.0, 10, 40, 50], [50, 20, 90, 70]]), labels=torch.tensor([1, 2])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))]
    return images, targets


# -- API -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agnostic", [True, False])
@pytest.mark.parametrize("quality", QUALITY_HEADS)
def test_losses_and_candidates(quality, agnostic):
    torch.manual_seed(0)
    model = build_rcnn(2, quality=quality, class_agnostic_box=agnostic, **TINY)
    assert model.roi_heads.box_head.bbox_pred.out_features == (4 if agnostic else 12)
    images, targets = _images_targets()  # the second image has no object
    losses = model(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier"}
    expected |= {None: {"loss_box_reg"}, "iou_net": {"loss_box_reg", "loss_iou_net"},
                 "dir": {"loss_box_reg", "loss_purity", "loss_integrity", "loss_quality_iou"},
                 "dir_foresight": {"loss_box_reg", "loss_purity", "loss_integrity", "loss_quality_iou"},
                 "iou_direct": {"loss_box_reg", "loss_quality_iou"}, "kl": {"loss_box_kl"}}[quality]
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = model.roi_heads.quality_head
    if head is not None:  # the head is trained by its loss
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())

    model.eval()
    with torch.no_grad():
        out = model.candidates(images)
    assert len(out) == 2
    signal = {None: None, "kl": "variances"}.get(quality, "quality")
    for cand, img in zip(out, images):
        n = len(cand["boxes"])
        assert 0 < n <= 150
        assert set(cand) == {"boxes", "scores", "labels"} | ({signal} if signal else set())
        assert cand["scores"].shape == cand["labels"].shape == (n,)
        assert cand["labels"].dtype == torch.int64 and set(cand["labels"].tolist()) <= {1, 2}
        assert bool((cand["scores"] > 0.05).all()) and bool((cand["scores"][:-1] >= cand["scores"][1:]).all())
        h, w = img.shape[-2:]  # candidates are in the input image's coordinates, clipped to it
        b = cand["boxes"]
        assert bool((b[:, 0] >= 0).all() & (b[:, 2] <= w + 1e-3).all() & (b[:, 3] <= h + 1e-3).all())
        if signal == "quality":
            assert cand["quality"].shape == (n,) and bool(((cand["quality"] >= 0) & (cand["quality"] <= 1)).all())
        if signal == "variances":
            assert cand["variances"].shape == (n, 4) and bool((cand["variances"] > 0).all())
    dets = model.detect(images)
    assert not model.training
    for d in dets:
        assert len(d["boxes"]) <= 100 and bool((d["scores"][:-1] >= d["scores"][1:]).all())


def test_agnostic_boxes_shared_by_classes():
    """With class-agnostic regression every class's candidate of one proposal has the same box."""
    images, _ = _images_targets()
    torch.manual_seed(0)
    model = build_rcnn(3, class_agnostic_box=True, score_thresh=0.0, candidates_per_image=10**6, **{
        k: v for k, v in TINY.items() if k != "candidates_per_image"}).eval()
    with torch.no_grad():
        cand = model.candidates(images[:1])[0]
    boxes = cand["boxes"]
    per_class = [boxes[cand["labels"] == c] for c in (1, 2, 3)]
    assert per_class[0].shape == per_class[1].shape == per_class[2].shape
    key = [set(map(tuple, b.round(decimals=3).tolist())) for b in per_class]
    assert key[0] == key[1] == key[2]
    # class-specific: different regressors give different boxes for the classes of one proposal
    torch.manual_seed(0)
    model = build_rcnn(3, class_agnostic_box=False, score_thresh=0.0, candidates_per_image=10**6, **{
        k: v for k, v in TINY.items() if k != "candidates_per_image"}).eval()
    with torch.no_grad():
        model.roi_heads.box_head.bbox_pred.bias.copy_(torch.linspace(-1, 1, 16))
        cand = model.candidates(images[:1])[0]
    key = [set(map(tuple, cand["boxes"][cand["labels"] == c].round(decimals=3).tolist())) for c in (1, 2, 3)]
    assert key[0] != key[1] and key[1] != key[2]


def test_empty_images_train_and_evaluate():
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    empty = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64)) for _ in images]
    for quality in QUALITY_HEADS:
        model = build_rcnn(1, quality=quality, **TINY)
        losses = model(images, empty)
        assert all(torch.isfinite(v) for v in losses.values()), quality
        sum(losses.values()).backward()
        model.eval()
        model.roi_heads.score_thresh = 0.999  # nothing passes: correctly shaped empty candidates
        with torch.no_grad():
            out = model.candidates(images)
        for cand in out:
            assert cand["boxes"].shape == (0, 4) and cand["scores"].shape == (0,)
            if quality in ("dir", "iou_net"):
                assert cand["quality"].shape == (0,)
            if quality == "kl":
                assert cand["variances"].shape == (0, 4)


def test_train_eval_switch_and_detect_restores_mode():
    images, targets = _images_targets()
    model = build_rcnn(2, quality="dir", **TINY)
    assert isinstance(model(images, targets), dict)
    model.eval()
    assert isinstance(model(images), list)
    model.train()
    dets = model.detect(images, method="nms")
    assert model.training and len(dets) == 2
    assert model.default_method == "quality" == DEFAULT_METHODS["dir"]
    with pytest.raises(ValueError, match="method must be one of"):  # before the network runs
        model.detect(images, method="quality+soft-cubic")
    assert model.training


def test_default_methods_read_the_signal_their_head_predicts():
    for quality in QUALITY_HEADS:
        head = build_rcnn(2, quality=quality, **TINY).roi_heads.quality_head
        assert set(METHODS[DEFAULT_METHODS[quality]].needs) == ({head.signal} if head is not None else set())


def test_quality_threshold_a():
    """DIR predicts quality only above the class-score threshold ``a``; others get 0."""
    images, _ = _images_targets()
    torch.manual_seed(0)
    model = build_rcnn(2, quality="dir", **TINY).eval()
    with torch.no_grad():
        full = model.candidates(images)
        model.roi_heads.quality_thresh = float(full[0]["scores"].median())
        part = model.candidates(images)
    a = model.roi_heads.quality_thresh
    for f, p in zip(full, part):
        above = p["scores"] > a
        assert torch.allclose(p["quality"][above], f["quality"][above], atol=1e-6)
        assert bool((p["quality"][~above] == 0).all())


def test_refinement_raises_predicted_iou():
    images, _ = _images_targets()
    torch.manual_seed(0)
    model = build_rcnn(2, quality="iou_net", **TINY).eval()
    with torch.no_grad():
        plain = model.candidates(images)
    model.roi_heads.refine_steps = 3
    model.roi_heads.refine_order = "before_nms"  # every candidate refined (test_refine_order: the paper's order)
    model.roi_heads.quality_head.refine_keep_best = True  # the option that returns the best box visited
    with torch.no_grad():
        refined = model.candidates(images)
    for p, r in zip(plain, refined):
        assert r["boxes"].shape == p["boxes"].shape
        assert bool((r["quality"] >= p["quality"] - 1e-5).all())  # never below the starting box
    # the paper's Algorithm 2 (the default) may end a box below its start by at most max_drop per step
    model.roi_heads.quality_head.refine_keep_best = False
    with torch.no_grad():
        paper = model.candidates(images)
    assert all(r["boxes"].shape == p["boxes"].shape for p, r in zip(plain, paper))


def test_mask_rcnn_with_quality_head():
    images, targets = _images_targets()
    for t, img in zip(targets, images):
        h, w = img.shape[-2:]
        masks = torch.zeros(len(t["boxes"]), h, w, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(t["boxes"].long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        t["masks"] = masks
    torch.manual_seed(0)
    model = build_rcnn(2, quality="dir", mask=True, **TINY)
    losses = model(images, targets)
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    dets = model.detect(images)
    for d, img in zip(dets, images):
        assert d["masks"].shape == (len(d["boxes"]), 1, *img.shape[-2:])
    with pytest.raises(ValueError, match="masks"):
        model.train()
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])


def test_bad_input():
    model = build_rcnn(2, **TINY)
    images, targets = _images_targets()
    with pytest.raises(ValueError, match="images"):
        model([], targets)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model([torch.rand(1, 32, 32)], targets[:1])
    with pytest.raises(ValueError, match="x2 > x1"):
        model(images[:1], [dict(boxes=torch.tensor([[5.0, 5, 2, 9]]), labels=torch.tensor([1]))])
    with pytest.raises(ValueError, match="labels"):
        model(images[:1], [dict(boxes=torch.tensor([[1.0, 1, 9, 9]]), labels=torch.tensor([3]))])
    with pytest.raises(ValueError, match="target"):
        model(images, targets[:1])
    with pytest.raises(ValueError, match="quality"):
        build_rcnn(2, quality="iou")
    with pytest.raises(ValueError, match="refine_steps"):
        build_rcnn(2, quality="dir", refine_steps=5)
    with pytest.raises(ValueError, match="num_classes"):
        build_rcnn(0)
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_rcnn(1, anchor_sizes=(16, 32))


# -- losses against hand-written references --------------------------------------------------------


def test_kl_loss_hand_computed():
    # |d| = 0.05 < beta: 0.5 d^2 / beta; |d| = 2 > beta: |d| - beta / 2
    beta = 1 / 9
    d = torch.tensor([0.05, 2.0])
    alpha = torch.tensor([0.0, math.log(4.0)])
    expected = torch.tensor([0.5 * 0.05**2 / beta, (2 - beta / 2) / 4 + 0.5 * math.log(4.0)])
    assert torch.allclose(kl_loss(d, alpha, torch.zeros(2), beta), expected)
    # minimising over alpha gives sigma^2 = 2 * smoothL1: the variance learns the error
    err = 2 - beta / 2
    alphas = torch.linspace(-3, 3, 6001)
    best = alphas[kl_loss(torch.full_like(alphas, 2.0), alphas, torch.zeros_like(alphas), beta).argmin()]
    assert math.isclose(math.exp(best), 2 * err, rel_tol=1e-2)
    with pytest.raises(ValueError, match="shape"):
        kl_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_dir_loss_matches_eq9_reference():
    torch.manual_seed(0)
    head = DIRHead(4, ["0"], pool_size=2, representation_size=8)
    feats = {"0": torch.rand(1, 4, 16, 16)}
    boxes = [torch.tensor([[2.0, 2, 10, 10], [4, 4, 12, 14], [1, 1, 5, 5]])]
    gts = [torch.tensor([[3.0, 3, 11, 11], [4, 4, 12, 12], [0, 0, 1, 1]])]
    positive = [torch.tensor([True, True, False])]
    batch = RoIBatch(feats, [(64, 64)], boxes, torch.zeros(3, 4, 2, 2), torch.zeros(3, 8), boxes,
                     torch.arange(3), gts, positive)
    losses = head.loss(batch)
    s, t, c = head(head.pool(feats, [boxes[0][:2]], [(64, 64)]))
    p = elementwise_purity(boxes[0][:2], gts[0][:2])
    i = elementwise_integrity(boxes[0][:2], gts[0][:2])

    def bce(x, y):
        return float(-(y * torch.log(x) + (1 - y) * torch.log(1 - x)).mean().detach())

    assert math.isclose(losses["loss_purity"].item(), bce(s, p), rel_tol=1e-5)
    assert math.isclose(losses["loss_integrity"].item(), bce(t, i), rel_tol=1e-5)
    assert math.isclose(losses["loss_quality_iou"].item(), bce(c, iou_from_purity_integrity(p, i)), rel_tol=1e-5)
    # no positive: zero losses that still reach every parameter (DDP needs all of them used)
    batch.positive = [torch.zeros(3, dtype=torch.bool)]
    zero = head.loss(batch)
    assert all(v.item() == 0 for v in zero.values())
    sum(zero.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_direct_iou_head_builds_one_branch_and_matches_its_bce_reference():
    torch.manual_seed(0)
    head = DirectIoUHead(4, ["0"], pool_size=2, representation_size=8, loss_weight=0.5)
    # only the pooling and the IoU branch: no Purity / Integrity modules built and dropped
    assert [n for n, _ in head.named_children()] == ["pool", "iou"]
    assert all(k.startswith("iou.") for k in head.state_dict()) and len(head.state_dict()) == 6
    assert head.signal == "quality"
    feats = {"0": torch.rand(1, 4, 16, 16)}
    boxes = [torch.tensor([[2.0, 2, 10, 10], [4, 4, 12, 14], [1, 1, 5, 5]])]
    gts = [torch.tensor([[3.0, 3, 11, 11], [4, 4, 12, 12], [0, 0, 1, 1]])]
    batch = RoIBatch(feats, [(64, 64)], boxes, torch.zeros(3, 4, 2, 2), torch.zeros(3, 8), boxes,
                     torch.arange(3), gts, [torch.tensor([True, True, False])])
    losses = head.loss(batch)
    assert set(losses) == {"loss_quality_iou"}
    c = head(head.pool(feats, [boxes[0][:2]], [(64, 64)]))[2]
    y = elementwise_box_iou(boxes[0][:2], gts[0][:2])
    ref = float(-(y * torch.log(c) + (1 - y) * torch.log(1 - c)).mean().detach())
    assert math.isclose(losses["loss_quality_iou"].item(), 0.5 * ref, rel_tol=1e-5)
    assert torch.equal(head.predict(batch), head(head.pool(feats, boxes, [(64, 64)]))[2])
    batch.positive = [torch.zeros(3, dtype=torch.bool)]
    zero = head.loss(batch)["loss_quality_iou"]
    assert zero.item() == 0
    zero.backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="loss_weight"):
        DirectIoUHead(4, ["0"], loss_weight=-1.0)


# -- learning ---------------------------------------------------------------------------------------


def _scenes(n, seed):
    return SyntheticScenes(n, image_size=128, num_classes=1, min_size=16, max_size=56, seed=seed)


def _train(model, iterations, lr, tmp_path):
    summary = train(model, _scenes(64, 0), iterations=iterations, batch_size=2, lr=lr, warmup_iters=20,
                    clip_grad_norm=10.0, out_dir=tmp_path, progress=False, log_every=10, checkpoint_every=10**6,
                    seed=0)
    return [json.loads(line) for line in open(summary["metrics_file"])]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A plain Faster R-CNN trained from scratch for 300 iterations (about a minute)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_rcnn(1, **SMALL)
    log = _train(model, 300, 0.02, tmp_path_factory.mktemp("baseline"))
    return model.state_dict(), log


def _window(log, key, first, size=3, skip=0):
    rows = log[skip:skip + size] if first else log[-size:]
    return sum(r[key] for r in rows) / len(rows)


def test_baseline_losses_fall(baseline):
    _, log = baseline
    keys = [k for k in log[0] if k.startswith("loss")]
    assert set(keys) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for k in keys:  # 5-window means; the first window (before any RoI is positive) is no reference
        assert all(math.isfinite(r[k]) for r in log)
        assert _window(log, k, False, size=5) < _window(log, k, True, size=5, skip=1), k


@pytest.mark.parametrize("quality", HEADS)
def test_head_learns_localization_quality(quality, baseline, tmp_path):
    state, _ = baseline
    torch.manual_seed(0)
    model = build_rcnn(1, quality=quality, **SMALL)
    if quality == "kl":  # corner-coded regressor: a new box regressor
        state = {k: v for k, v in state.items() if "bbox_pred" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("quality_head" in k or "bbox_pred" in k for k in missing)
    log = _train(model, 100, 0.005, tmp_path)
    head_terms = {"iou_net": ["loss_iou_net"], "dir": ["loss_purity", "loss_integrity", "loss_quality_iou"],
                  "dir_foresight": ["loss_purity", "loss_integrity", "loss_quality_iou"],
                  "iou_direct": ["loss_quality_iou"], "kl": ["loss_box_kl"]}[quality]
    for k in [k for k in log[0] if k.startswith("loss")]:
        assert all(math.isfinite(r[k]) for r in log), k
    for k in head_terms:
        assert _window(log, k, False) < _window(log, k, True), k

    val = _scenes(16, 1)
    model.eval()
    with torch.no_grad():
        cands = [model.candidates([val[i][0]])[0] for i in range(len(val))]
    targets = [val[i][1] for i in range(len(val))]
    if quality == "kl":
        # the predicted spread (relative to the box size) falls as the true IoU rises
        ious = torch.cat(match_to_ground_truth(cands, targets))
        rel = torch.cat([(c["variances"].sqrt() / (c["boxes"][:, 2:] - c["boxes"][:, :2]).clamp(min=1).repeat(1, 2))
                         .mean(dim=1) for c in cands])
        keep = ious > 0.5
        r = pearson(-rel[keep], ious[keep])
        print(f"\n[kl] Pearson(-sigma / size, IoU) = {r:.3f}, n={int(keep.sum())}")  # pytest -s shows it
        assert keep.sum() > 100
        assert r > 0.1
        return
    corr = confidence_correlation(cands, targets)
    print(f"\n[{quality}] Pearson with the IoU (n={corr['quality']['n']}): quality {corr['quality']['pearson']:.3f}, "
          f"score {corr['score']['pearson']:.3f}")  # pytest -s shows it; the README quotes it
    assert corr["quality"]["n"] > 100
    assert corr["quality"]["pearson"] > corr["score"]["pearson"] + 0.05, corr


def test_giou_box_loss_matches_torchvision_on_the_decoded_positives():
    """box_loss="giou": giou_weight x sum over positives of 1 - GIoU(decoded box, ground truth), / N,
    against torchvision's generalized_box_iou_loss as the independent reference."""
    from torchvision.ops import generalized_box_iou_loss

    torch.manual_seed(0)
    model = build_rcnn(num_classes=2, box_loss="giou", giou_weight=10.0, min_size=64, max_size=64,
                       representation_size=16, fpn_channels=8)
    heads = model.roi_heads
    n = 6
    proposals = torch.tensor([[10.0, 10, 40, 50]]).repeat(n, 1) + torch.arange(n)[:, None]
    gt = proposals + torch.tensor([2.0, -3, 5, 1])
    labels = torch.tensor([1, 0, 2, 1, 0, 2])
    deltas = torch.randn(n, 4) * 0.1
    logits = torch.randn(n, 3)
    losses = heads._box_losses(logits, deltas, torch.zeros_like(deltas), labels, proposals, gt)
    pos = labels > 0
    expected = 10.0 * generalized_box_iou_loss(heads.decode(deltas[pos], proposals[pos]), gt[pos],
                                               reduction="sum") / n
    assert torch.allclose(losses["loss_box_reg"], expected, atol=1e-5)
    # and the default is smooth-L1 on the deltas, as before
    plain = build_rcnn(num_classes=2, min_size=64, max_size=64, representation_size=16, fpn_channels=8).roi_heads
    target = torch.randn(n, 4) * 0.1
    expected = torch.nn.functional.smooth_l1_loss(deltas[pos], target[pos], beta=1 / 9, reduction="sum") / n
    assert torch.allclose(plain._box_losses(logits, deltas, target, labels, proposals, gt)["loss_box_reg"], expected)
    with pytest.raises(ValueError, match="box_loss"):
        build_rcnn(num_classes=2, box_loss="l2")


def test_every_two_stage_head_is_built_by_its_name_from_one_table():
    """The head protocol (heads/common.py): name, default_method, signal, from_options; build_rcnn
    reads QUALITY_HEADS and DEFAULT_METHODS from TWO_STAGE_HEADS, so a new head is one file and its line."""
    from locconf.heads import TWO_STAGE_HEADS

    assert QUALITY_HEADS == (None, *(h.name for h in TWO_STAGE_HEADS))
    assert len(set(QUALITY_HEADS)) == len(QUALITY_HEADS)
    for head in TWO_STAGE_HEADS:
        assert DEFAULT_METHODS[head.name] == head.default_method
        assert set(METHODS[head.default_method].needs) == {head.signal}
        torch.manual_seed(0)
        model = build_rcnn(2, quality=head.name, **TINY)
        assert type(model.roi_heads.quality_head) is head
