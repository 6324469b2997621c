"""The one-stage heads' registry and protocol (locconf.models.dense): names, the parameters that
checkpoints hold, how build_one_stage passes options, and a new head plugged in with one line."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from locconf.losses import giou_loss, sigmoid_focal_loss
from locconf.models import build_one_stage, dense, one_stage
from locconf.models.dense import HEADS, ATSSHead, CLQHead, DenseHead, DenseScores, GFLHead, Positives
from locconf.models.dense.common import weighted_loss
from locconf.models.dense.gfl import DFL_TARGET_EPS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(fpn_channels=16, head_convs=1, head_norm_groups=8, min_size=64, max_size=64)


def test_registry_names_the_head_classes():
    assert HEADS == {"atss": ATSSHead, "clq": CLQHead, "gfl": GFLHead}
    assert all(issubclass(cls, DenseHead) and cls.name == name for name, cls in HEADS.items())
    assert one_stage.HEADS == ("atss", "clq", "gfl")


# The head's parameters in the order of model.parameters(): checkpoints store them by these names
# (model) and in this order (optimizer state); the heads' split into classes kept both.
SHARED = ["cls_tower.0.weight", "cls_tower.0.bias", "cls_tower.1.weight", "cls_tower.1.bias",
          "reg_tower.0.weight", "reg_tower.0.bias", "reg_tower.1.weight", "reg_tower.1.bias",
          "cls_logits.weight", "cls_logits.bias", "bbox_pred.weight", "bbox_pred.bias"]
SCALES = [f"scales.{i}.scale" for i in range(4)]
QUALITY = ["quality_pred.weight", "quality_pred.bias"]
HEAD_PARAMETERS = {"atss": SHARED + QUALITY + SCALES, "gfl": SHARED + SCALES,
                   "clq": SHARED + QUALITY + SCALES + ["lqe.0.weight", "lqe.0.bias", "lqe.2.weight", "lqe.2.bias"]}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_parameter_names_and_order_are_those_of_saved_checkpoints(head):
    model = build_one_stage(2, head=head, **TINY)
    names = [n[len("head."):] for n, _ in model.named_parameters() if n.startswith("head.")]
    assert names == HEAD_PARAMETERS[head]
    assert model.head_type == head and isinstance(model.head, HEADS[head])


def test_build_one_stage_passes_each_head_the_options_its_constructor_names():
    model = build_one_stage(2, head="clq", qfl_beta=1.5, quality_loss_weight=0.5, lqe_channels=8,
                            focal_alpha=0.4, box_loss_weight=3.0, **TINY)
    head = model.head
    assert (head.qfl_beta, head.quality_loss_weight, head.box_loss_weight) == (1.5, 0.5, 3.0)
    assert head.lqe[0].out_channels == 8 and not hasattr(head, "focal_alpha")
    everything = dict(focal_alpha=0.3, qfl_beta=1.0, gfl_box="delta", reg_max=8, dfl_weight=1.0, lqe_channels=4)
    assert GFLHead.options(everything) == dict(qfl_beta=1.0, gfl_box="delta", reg_max=8, dfl_weight=1.0)
    assert ATSSHead.options(everything) == dict(focal_alpha=0.3)
    with pytest.raises(ValueError, match="gfl_box"):
        GFLHead(16, 1, 2, 4, norm_groups=8, gfl_box="corners")


def test_positives_targets_and_the_weighted_box_loss():
    pos = Positives(image=torch.tensor([0, 1]), anchor=torch.tensor([2, 0]), gt_boxes=torch.zeros(2, 4),
                    labels=torch.tensor([1, 0]), anchors=torch.tensor([[0.0, 0, 4, 2], [2, 2, 4, 4]]),
                    strides=torch.ones(2, 2), box_out=torch.zeros(2, 4), boxes=torch.zeros(2, 4), num_pos=2)
    targets = pos.class_targets(torch.ones(2, 3, 2), torch.tensor([0.5, 0.25]))
    expected = torch.zeros(2, 3, 2)
    expected[0, 2, 1], expected[1, 0, 0] = 0.5, 0.25
    assert torch.equal(targets, expected)
    assert torch.equal(pos.centers, torch.tensor([[2.0, 1.0], [3.0, 3.0]]))
    assert torch.equal(pos.at(torch.arange(6.0).view(2, 3)), torch.tensor([2.0, 3.0]))
    loss = weighted_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]), 2.0)
    assert loss.item() == pytest.approx(2.0 * 10.0 / 4.0)
    assert weighted_loss(torch.zeros(0), torch.zeros(0), 2.0).item() == 0.0


class PlainHead(DenseHead):
    """A RetinaNet-like head for the test: focal loss, unweighted GIoU, score = class probability."""

    name = "plain"

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_levels: int, *,
                 focal_alpha: float = 0.25, **common) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_levels, **common)
        self.focal_alpha = focal_alpha

    def loss(self, out: dict[str, Tensor], pos: Positives) -> dict[str, Tensor]:
        cls_logits = out["cls_logits"].float()
        focal = sigmoid_focal_loss(cls_logits, pos.class_targets(cls_logits, 1.0), self.focal_alpha, 2.0)
        box = weighted_loss(giou_loss(pos.boxes, pos.gt_boxes), torch.ones_like(pos.labels, dtype=torch.float), 1.0)
        return {"loss_cls": focal / pos.num_pos, "loss_box": box}

    def predict(self, out: dict[str, Tensor]) -> DenseScores:
        cls = torch.sigmoid(out["cls_logits"].float())
        return DenseScores(select=cls, scores=cls, class_fields={"cls_scores": cls})


def test_a_new_head_is_one_class_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(dense.HEADS, PlainHead.name, PlainHead)
    torch.manual_seed(0)
    model = build_one_stage(2, head="plain", focal_alpha=0.5, score_thresh=0.0, candidates_per_image=20, **TINY)
    assert model.head.focal_alpha == 0.5 and model.head.quality_pred is None
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([2])}
    losses = model.train()([torch.rand(3, 64, 64)], [target])
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        cand = model.eval().candidates([torch.rand(3, 64, 64)])[0]
    assert set(cand) == {"boxes", "scores", "labels", "cls_scores"} and cand["boxes"].shape == (20, 4)
    torch.testing.assert_close(cand["scores"], cand["cls_scores"])
    samples = model.positive_samples([torch.rand(3, 64, 64)], [target])[0]
    assert samples["boxes"].shape[0] >= 1 and set(samples) == {"boxes", "iou", "labels", "scores", "cls_scores"}
    monkeypatch.undo()
    with pytest.raises(ValueError, match="head"):
        build_one_stage(2, head="plain", **TINY)


def test_gfl_dfl_targets_are_clamped_at_reg_max_minus_0_1():
    """GFL's DFL target of a side beyond the last bin is ``reg_max - 0.1`` (GFL's and MMDetection's
    ``bbox2distance``, ``eps=0.1``), checked against a brute-force DFL of one hand-made positive."""
    assert DFL_TARGET_EPS == 0.1
    head = GFLHead(16, 1, 2, 4, reg_max=4, num_convs=1, norm_groups=8)
    # one positive: anchor centred at (50, 50), stride 8; its ground truth 50 px left / right
    # (6.25 strides, clamped) and 10 px up / down (1.25 strides)
    dist = torch.arange(5.0).repeat(1, 4, 1)  # (1, 4, 5) logits 0..4 on every side
    pos = Positives(image=torch.tensor([0]), anchor=torch.tensor([0]), gt_boxes=torch.tensor([[0.0, 40, 100, 60]]),
                    labels=torch.tensor([1]), anchors=torch.tensor([[46.0, 46, 54, 54]]),
                    strides=torch.tensor([[8.0, 8.0]]), box_out=dist, boxes=torch.tensor([[10.0, 42, 90, 58]]),
                    num_pos=1)
    out = {"cls_logits": torch.tensor([[[-1.0, 2.0]]]), "bbox_dist": dist[None]}
    loss = head.loss(out, pos)["loss_dfl"]
    log_s = [j - math.log(sum(math.exp(k) for k in range(5))) for j in range(5)]

    def dfl(y):  # -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1})
        i = int(math.floor(y))
        return -((i + 1 - y) * log_s[i] + (y - i) * log_s[i + 1])

    expected = 0.25 * (2 * dfl(4 - 0.1) + 2 * dfl(1.25)) / 4  # dfl_weight x mean of the 4 sides
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - 0.25 * (2 * dfl(4 - 0.01) + 2 * dfl(1.25)) / 4) > 1e-3  # the clamp matters here
