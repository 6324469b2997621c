"""One-stage detectors with ATSS assignment: the ATSS baseline, GFL and CLQ.

All three share the backbone, the ATSS assignment and the towers; they differ in the
classification-side representation and its loss (and GFL in its box branch):

    images ─► GeneralizedRCNNTransform ─► ResNet+FPN ─► shared dense head ─► ATSS assignment (train)
                                                          │                    or candidates (eval)
                            cls tower (GroupNorm) ────────┤─► class logits C  (A·K per location)
                            reg tower (GroupNorm) ────────┴─► box output, ×Scale per level:
                                                              deltas (A·4) | distribution (A·4·17, gfl)
                                                              + centerness (atss) | predicted IoU
                                                                and LQE (clq)

This module holds what every head shares at the level of the detector: input handling, anchors,
the assignment of the positives, the selection of candidates, ``detect`` and ``positive_samples``,
and :func:`build_one_stage`. The heads (``head=``) are in :mod:`locconf.models.dense`, one file
each, with what each takes from its paper and what is our choice:

* ``"atss"`` (:mod:`locconf.models.dense.atss`): ATSS (Zhang et al., CVPR 2020), focal loss,
  score ``sigmoid(C) x centerness``;
* ``"gfl"`` (:mod:`locconf.models.dense.gfl`): Generalized Focal Loss (Li et al., NeurIPS 2020),
  QFL on a joint class x IoU score, general-distribution box branch with the DFL;
* ``"clq"`` (:mod:`locconf.models.dense.clq`): our reading of CLQ (Liu et al., arXiv 2309.13269)
  on ATSS, a joint class x LQE score guided by a predicted IoU.

The shared dense head and the protocol a head follows (``loss`` / ``predict``, as the two-stage
quality heads of :mod:`locconf.heads`) are in :mod:`locconf.models.dense.common`, the ATSS
assignment in :mod:`locconf.models.dense.assign`.

Default post-processing (``detect``): ``"nms"`` on the score for every head (ATSS's and GFL's own
inference; for CLQ the joint score already carries the localization quality, which is the point of
the joint representation).

Losses are normalised by the number of positive anchors of the batch (at least 1), as in the three
papers, except GFL's box-side losses (see its file); an image without boxes contributes negatives
only, and its box / quality losses are 0.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..boxes import elementwise_box_iou
from ..candidates import Candidates
from ..postprocess import METHODS, postprocess
from .backbone import NORMS, build_fpn_backbone, check_returned_layers
from .dense import GFL_BOXES, HEADS as DENSE_HEADS, DenseHead, DenseScores, Positives, assign_batch
from .dense import iou_statistics  # noqa: F401  (re-exported: it lived here before locconf.models.dense)
from .dense.common import BOX_CODER_WEIGHTS, distribution_expectation  # noqa: F401  (idem)
from .inputs import check_detection_inputs
from .pretrained_io import SavePretrained

__all__ = ["build_one_stage", "OneStageDetector", "DenseHead", "HEADS"]

HEADS = tuple(DENSE_HEADS)  # the names build_one_stage accepts as head=
EXTRA_LEVELS = ("pool", "p6p7", "none")


class OneStageDetector(SavePretrained, nn.Module):
    """A dense detector with ATSS assignment and one head of :mod:`locconf.models.dense`.

    Build it with :func:`build_one_stage`. ``model(images, targets)`` returns the head's losses in
    training (``loss_cls``, ``loss_box`` and ``loss_centerness`` (atss) | ``loss_iou`` (clq) |
    ``loss_dfl`` (gfl with its distribution box branch)); ``model(images)`` in evaluation the final
    detections (:meth:`detect`); :meth:`candidates` one dict of candidates per image (:class:`locconf.candidates.Candidates`: every
    anchor-class pair whose selection score passes ``score_thresh`` among the ``topk_candidates``
    best of its level, at most ``candidates_per_image``, before any NMS), in the input image's
    coordinates, with the head's further fields (:class:`locconf.models.dense.DenseScores`):
    atss ``quality`` = centerness and ``cls_scores``, clq ``quality`` = predicted IoU and
    ``cls_scores``, gfl none. ``detect`` post-processes them (:func:`locconf.postprocess.postprocess`).
    """

    def __init__(self, backbone: nn.Module, anchor_generator: AnchorGenerator, head: DenseHead,
                 transform: GeneralizedRCNNTransform, *, topk: int = 9, score_thresh: float = 0.05,
                 topk_candidates: int = 1000, candidates_per_image: int = 1000, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone, self.anchor_generator, self.head, self.transform = backbone, anchor_generator, head, transform
        self.head_type, self.num_classes = head.name, head.num_classes
        self.topk, self.score_thresh, self.topk_candidates = topk, score_thresh, topk_candidates
        self.candidates_per_image, self.channels_last = candidates_per_image, channels_last
        self.default_method = head.default_method
        self.max_detections = 100  # what detect (and model(images) in evaluation) keeps per image by default

    # -- input checks ---------------------------------------------------------------------

    def _check_inputs(self, images: Sequence[Tensor], targets: Sequence[dict] | None, need_targets: bool) -> None:
        check_detection_inputs(images, targets, self.num_classes, need_targets)

    # -- forward ----------------------------------------------------------------------------

    def _run(self, images: Sequence[Tensor], targets: Sequence[dict] | None):
        """Resize and batch, backbone, head, anchors: what training and inference share.

        Returns ``(image_list, targets, out, anchors (N, 4), strides (N, 2), counts)`` with
        ``strides`` the ``(x, y)`` stride of each anchor's level, as the anchor generator spaces
        them (padded image size // feature size).
        """
        image_list, targets = self.transform(list(images), [dict(t) for t in targets] if targets is not None else None)
        x = image_list.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = list(self.backbone(x).values())
        out = self.head(features)
        anchors = self.anchor_generator(image_list, features)[0]  # (N, 4), the same for every image
        counts = [f.shape[-2] * f.shape[-1] * self.head.num_anchors for f in features]
        h, w = x.shape[-2:]
        strides = torch.cat([anchors.new_tensor([w // f.shape[-1], h // f.shape[-2]]).expand(c, 2)
                             for f, c in zip(features, counts)])
        return image_list, targets, out, anchors, strides, counts

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict] | None = None):
        """Training: the head's losses. Evaluation: the final detections (:meth:`detect` with the
        head's own method), as torchvision's detectors return; :meth:`candidates` gives the
        candidates before post-processing."""
        if not self.training:
            return self.detect(images)
        self._check_inputs(images, targets, need_targets=True)
        _, targets, out, anchors, strides, counts = self._run(images, targets)
        return self._losses(out, anchors, strides, counts, targets)

    @torch.no_grad()
    def candidates(self, images: Sequence[Tensor]) -> list[Candidates]:
        """Per image, every candidate before post-processing (:class:`locconf.candidates.Candidates`)
        in the input images' coordinates. Runs in evaluation mode; the module's mode is restored."""
        self._check_inputs(images, None, need_targets=False)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        was_training = self.training
        self.eval()
        try:
            image_list, _, out, anchors, strides, counts = self._run(images, None)
            cands = self._candidates(out, anchors, strides, counts, image_list.image_sizes)
            return self.transform.postprocess(cands, image_list.image_sizes, original_sizes)  # needs eval mode
        finally:
            self.train(was_training)

    # -- training -----------------------------------------------------------------------------

    def _positives(self, out: dict[str, Tensor], anchors: Tensor, strides: Tensor, counts: list[int],
                   targets: list[dict]) -> Positives:
        """The ATSS positives of the batch with their box outputs and decoded boxes."""
        b_idx, a_idx, gt_boxes, labels = assign_batch(anchors, counts, targets, self.topk)
        pos_anchors, pos_strides = anchors[a_idx], strides[a_idx]
        box_out = self.head.box_output(out)[b_idx, a_idx]
        return Positives(image=b_idx, anchor=a_idx, gt_boxes=gt_boxes, labels=labels, anchors=pos_anchors,
                         strides=pos_strides, box_out=box_out, boxes=self.head.decode(box_out, pos_anchors, pos_strides),
                         num_pos=max(b_idx.numel(), 1))  # known on the host since the assignment's nonzero()

    def _losses(self, out: dict[str, Tensor], anchors: Tensor, strides: Tensor, counts: list[int],
                targets: list[dict]) -> dict[str, Tensor]:
        return self.head.loss(out, self._positives(out, anchors, strides, counts, targets))

    # -- inference ------------------------------------------------------------------------------

    def _top_pairs(self, select: Tensor, counts: list[int]) -> tuple[Tensor, Tensor]:
        """The best (anchor, class) pairs of every image by ``select`` (B, N, K): per level the
        ``topk_candidates`` best, batched over images without a host sync, then at most
        ``candidates_per_image`` of them. Returns their indices into N * K (B, C), sorted by
        ``select``, and how many of each image's pass ``score_thresh`` (B,) (a tensor: no sync)."""
        bsz, _, k = select.shape
        masked = select.masked_fill(select <= self.score_thresh, -1.0)
        flat_idx, start = [], 0
        for c in counts:
            level = masked[:, start:start + c].reshape(bsz, -1)
            top = level.topk(min(self.topk_candidates, level.shape[1]), dim=1).indices
            flat_idx.append(top + start * k)
            start += c
        flat_idx = torch.cat(flat_idx, dim=1)  # (B, T) indices into N * K
        sel = masked.reshape(bsz, -1).gather(1, flat_idx)
        best = sel.topk(min(self.candidates_per_image, sel.shape[1]), dim=1)
        flat_idx = flat_idx.gather(1, best.indices)  # (B, C), sorted by the selection score
        valid_counts = (best.values > self.score_thresh).sum(dim=1)
        return flat_idx, valid_counts

    def _candidates(self, out: dict[str, Tensor], anchors: Tensor, strides: Tensor, counts: list[int],
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        fields, valid_counts = self._padded_candidates(out, anchors, strides, counts, image_sizes)
        valid_counts = valid_counts.tolist()  # one sync for the batch
        return [{name: v[b, :valid_counts[b]] for name, v in fields.items()} for b in range(len(valid_counts))]

    def _padded_candidates(self, out: dict[str, Tensor], anchors: Tensor, strides: Tensor, counts: list[int],
                           image_sizes: list[tuple[int, int]]) -> tuple[dict[str, Tensor], Tensor]:
        """The candidates of every image as fixed-size tensors (B, C, ...), best first, and how many
        rows of each image are candidates (B,): the rows beyond are padding. No host sync and no
        data-dependent shape (what :mod:`locconf.export` exports)."""
        scores: DenseScores = self.head.predict(out)
        bsz, n, k = scores.scores.shape
        flat_idx, valid_counts = self._top_pairs(scores.select, counts)
        anchor_idx, cls_idx = flat_idx // k, flat_idx % k
        box_out = self.head.box_output(out)
        flat = box_out.reshape(bsz, box_out.shape[1], -1)
        picked = flat.gather(1, anchor_idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))
        rows = anchor_idx.reshape(-1)
        boxes = self.head.decode(picked.reshape(-1, *box_out.shape[2:]), anchors[rows], strides[rows])
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # (B, 2) as (h, w)
        limit = sizes.flip(1).repeat(1, 2).repeat_interleave(anchor_idx.shape[1], dim=0)  # (B*C, 4)
        boxes = torch.minimum(boxes.clamp(min=0), limit).reshape(bsz, -1, 4)
        fields = {
            "boxes": boxes,
            "scores": scores.scores.reshape(bsz, -1).gather(1, flat_idx),
            "labels": cls_idx + 1,
        }
        for name, value in scores.anchor_fields.items():
            fields[name] = value.gather(1, anchor_idx)
        for name, value in scores.class_fields.items():
            fields[name] = value.reshape(bsz, -1).gather(1, flat_idx)
        return fields, valid_counts

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], method: str | None = None, max_detections: int | None = None,
               **params) -> list[Candidates]:
        """Final detections: candidates post-processed with ``method`` (default :attr:`default_method`).

        Args:
            images: list of (3, H, W) float images in [0, 1].
            method: one of :data:`locconf.postprocess.METHODS` (``None``: ``"nms"``).
            max_detections: per image (default :attr:`max_detections`, 100).
            **params: keyword arguments of the post-processing method (e.g. ``iou_threshold``).
        """
        method = self.default_method if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        max_detections = self.max_detections if max_detections is None else max_detections
        return [postprocess(c, method, max_detections=max_detections, **params) for c in self.candidates(images)]


    @torch.no_grad()
    def positive_samples(self, images: Sequence[Tensor], targets: Sequence[dict]) -> list[dict[str, Tensor]]:
        """The predictions of the anchors that ATSS assigns to a ground truth: what the losses train.

        Runs the network in evaluation mode (its mode is restored) and returns, per image, for every
        positive anchor: ``boxes`` (P, 4) its predicted box (input image coordinates, not clipped),
        ``iou`` (P,) the IoU of that box with its ground truth (computed at the network's resolution,
        the same up to the rounding of the resize), ``labels`` (P,) the ground truth's
        class, ``scores`` (P,) the detector's score for that class and, where the head has them,
        ``cls_scores`` and ``quality`` (P,). With it one can see, for instance, how well each
        head's score ranks its own training samples by localization accuracy.
        """
        self._check_inputs(images, targets, need_targets=True)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        was_training = self.training
        self.eval()
        try:
            return self._positive_samples(images, targets, original_sizes)
        finally:
            self.train(was_training)

    def _positive_samples(self, images, targets, original_sizes) -> list[dict[str, Tensor]]:
        image_list, targets, out, anchors, strides, counts = self._run(images, targets)
        pos = self._positives(out, anchors, strides, counts, targets)
        scores = self.head.predict(out)
        fields = {"boxes": pos.boxes, "iou": elementwise_box_iou(pos.boxes, pos.gt_boxes), "labels": pos.labels + 1,
                  "scores": scores.scores[pos.image, pos.anchor, pos.labels]}
        for name, value in scores.anchor_fields.items():
            fields[name] = value[pos.image, pos.anchor]
        for name, value in scores.class_fields.items():
            fields[name] = value[pos.image, pos.anchor, pos.labels]
        per_image = torch.bincount(pos.image, minlength=len(images)).tolist()
        split = [dict(zip(fields, values)) for values in zip(*(v.split(per_image) for v in fields.values()))]
        return self.transform.postprocess(split, image_list.image_sizes, original_sizes)  # needs eval mode


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _number(value, name: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not numeric or value < low or value > high or (low_open and value == low) or math.isinf(value):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")
    return float(value)


# build_one_stage's numeric arguments: ints with their minimum, numbers with their range
_INTS = {"fpn_channels": 1, "head_convs": 0, "head_norm_groups": 1, "lqe_channels": 1, "reg_max": 1, "topk": 1,
         "topk_candidates": 1, "candidates_per_image": 1, "min_size": 1}
_NUMBERS = {"focal_alpha": (0.0, 1.0), "focal_gamma": (0.0, 10.0), "qfl_beta": (0.0, 10.0),
            "box_loss_weight": (0.0, 1e6), "quality_loss_weight": (0.0, 1e6), "dfl_weight": (0.0, 1e6),
            "score_thresh": (0.0, 1.0)}


def _check_arguments(a: dict) -> None:
    """Validate the arguments ``a`` (by name) of :func:`build_one_stage` but the pyramid's."""
    _positive_int(a["num_classes"], "num_classes")
    heads = tuple(DENSE_HEADS)  # the registry itself, in case a head was registered after this import
    for name, choices in (("head", heads), ("gfl_box", GFL_BOXES), ("norm", NORMS), ("extra_levels", EXTRA_LEVELS)):
        if a[name] not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {a[name]!r}")
    for name, minimum in _INTS.items():
        _positive_int(a[name], name, minimum=minimum)
    if not isinstance(a["max_size"], int) or a["max_size"] < a["min_size"]:
        raise ValueError(f"max_size must be an int >= min_size ({a['min_size']}), got {a['max_size']!r}")
    if a["fpn_channels"] % min(a["head_norm_groups"], a["fpn_channels"]):
        raise ValueError(f"head_norm_groups ({a['head_norm_groups']}) must divide fpn_channels ({a['fpn_channels']})")
    for name, (low, high) in _NUMBERS.items():
        _number(a[name], name, low, high)
    if a["score_thresh"] >= 1.0:
        raise ValueError(f"score_thresh must be < 1, got {a['score_thresh']}")


def _pyramid(returned_layers: Sequence[int], extra_levels: str, anchor_sizes: Sequence[float] | None,
             aspect_ratios: Sequence[float]) -> tuple[list[int], list[int], list[float], list[float]]:
    """The backbone stages, the strides of the pyramid levels, one anchor size per level and the
    aspect ratios, validated."""
    layers = check_returned_layers(returned_layers)
    num_extra = {"pool": 1, "p6p7": 2, "none": 0}[extra_levels]
    strides = [2 ** (i + 1) for i in layers] + [2 ** (layers[-1] + 1 + j) for j in range(1, num_extra + 1)]
    if anchor_sizes is None:
        anchor_sizes = [4.0 * s for s in strides]
    anchor_sizes = list(anchor_sizes)
    if len(anchor_sizes) != len(strides):
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({len(strides)}), got {len(anchor_sizes)}")
    for s in anchor_sizes:
        _number(s, "anchor_sizes", 0.0, low_open=True)
    aspect_ratios = list(aspect_ratios)
    if not aspect_ratios:
        raise ValueError("aspect_ratios must not be empty")
    for r in aspect_ratios:
        _number(r, "aspect_ratios", 0.0, low_open=True)
    return layers, strides, anchor_sizes, aspect_ratios


def build_one_stage(
    num_classes: int,
    *,
    head: str = "atss",
    backbone: str = "resnet18",
    weights: str | os.PathLike | None = None,
    fpn_channels: int = 128,
    returned_layers: Sequence[int] = (2, 3, 4),
    extra_levels: str = "pool",
    norm: str = "batch",
    norm_groups: int = 16,
    frozen_stages: int = -1,
    head_convs: int = 4,
    head_norm_groups: int = 32,
    anchor_sizes: Sequence[float] | None = None,
    aspect_ratios: Sequence[float] = (1.0,),
    topk: int = 9,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    qfl_beta: float = 2.0,
    box_loss_weight: float = 2.0,
    quality_loss_weight: float = 1.0,
    lqe_channels: int = 64,
    gfl_box: str = "distribution",
    reg_max: int = 16,
    dfl_weight: float = 0.25,
    min_size: int = 400,
    max_size: int = 1333,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    candidates_per_image: int = 1000,
    channels_last: bool = False,
) -> OneStageDetector:
    """Build a randomly initialised one-stage detector (the heads: :mod:`locconf.models.dense`).

    Args:
        num_classes: object classes ``K`` (labels ``1..K``; sigmoid outputs, no background class).
        head: a name of :data:`locconf.models.dense.HEADS`: ``"atss"`` | ``"clq"`` | ``"gfl"``.
        backbone, weights, fpn_channels, returned_layers, norm, norm_groups, frozen_stages: the
            backbone + FPN of :func:`locconf.models.backbone.build_fpn_backbone` (a torchvision ResNet
            or any timm model; ``weights="imagenet"`` for ``efficientnet_lite0`` .. ``lite2``).
        extra_levels: FPN levels above the last stage: ``"pool"`` (one max-pooled level, as the
            two-stage models; P3-P6 for stages 2-4), ``"p6p7"`` (two stride-2 convolutions on P5,
            RetinaNet / ATSS; P3-P7) or ``"none"``.
        head_convs: convolutions per head tower (4 in ATSS / GFL; 0 allowed).
        head_norm_groups: GroupNorm groups of the towers (capped at ``fpn_channels``; must divide it).
        anchor_sizes: one anchor size per level; default ``4 x stride`` (32, 64, 128, ... for
            P3, P4, P5, ...), half of ATSS's COCO setting (8 x stride), for small objects.
        aspect_ratios: anchors per location (h / w); ATSS uses one square anchor.
        topk: ATSS candidates per level (9).
        focal_alpha, focal_gamma: Focal Loss of ``atss`` (0.25, 2).
        qfl_beta: the exponent of the quality focal loss of ``gfl`` and ``clq`` (2).
        box_loss_weight: weight of the GIoU loss (2, as ATSS and GFL).
        quality_loss_weight: weight of the centerness (atss) / predicted-IoU (clq) loss.
        lqe_channels: hidden width of CLQ's LQE branch.
        gfl_box: the box branch of ``head="gfl"``: ``"distribution"`` (GFL's general distribution
            of the four side distances, ``reg_max + 1`` bins each, with the DFL; the paper's) or
            ``"delta"`` (ATSS's deltas, so that ``atss`` / ``gfl`` / ``clq`` differ only in the
            score representation). Ignored by the other heads.
        reg_max: largest distance of the distribution, in strides (16 in GFL: 17 bins per side).
        dfl_weight: weight of the Distribution Focal Loss (0.25 in GFL).
        min_size, max_size: the resize rule of ``GeneralizedRCNNTransform``.
        score_thresh: candidates need a score above this (for ``atss`` the class probability).
        topk_candidates: best (anchor, class) pairs kept per level before merging levels.
        candidates_per_image: at most this many candidates per image.
        channels_last: run the network in ``torch.channels_last`` memory format (faster on CPU).

    The model's ``model_config`` holds these arguments with ``arch="one_stage"``: the ``model``
    section of a configuration that rebuilds it (what :func:`locconf.models.save_pretrained` writes).
    """
    arguments = dict(locals())
    _check_arguments(arguments)
    layers, strides, anchor_sizes, aspect_ratios = _pyramid(returned_layers, extra_levels, anchor_sizes, aspect_ratios)
    extra = {"pool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(fpn_channels, fpn_channels), "none": None}[extra_levels]
    body = build_fpn_backbone(backbone, fpn_channels=fpn_channels, returned_layers=layers, norm=norm,
                              norm_groups=norm_groups, extra_blocks=extra, weights=weights,
                              frozen_stages=frozen_stages)
    if extra_levels == "none":  # build_fpn_backbone's default is a pooled level; remove it
        body.fpn.extra_blocks = None
    anchor_gen = AnchorGenerator(sizes=tuple((float(s),) for s in anchor_sizes),
                                 aspect_ratios=(tuple(float(r) for r in aspect_ratios),) * len(strides))
    head_type = DENSE_HEADS[head]
    options = dict(focal_alpha=focal_alpha, focal_gamma=focal_gamma, qfl_beta=qfl_beta, lqe_channels=lqe_channels,
                   quality_loss_weight=quality_loss_weight, gfl_box=gfl_box, reg_max=reg_max, dfl_weight=dfl_weight)
    dense = head_type(fpn_channels, len(aspect_ratios), num_classes, len(strides), num_convs=head_convs,
                      norm_groups=min(head_norm_groups, fpn_channels), box_loss_weight=box_loss_weight,
                      **head_type.options(options))
    transform = GeneralizedRCNNTransform(min_size, max_size, image_mean=list(body.image_mean),
                                         image_std=list(body.image_std))
    model = OneStageDetector(body, anchor_gen, dense, transform, topk=topk, score_thresh=score_thresh,
                             topk_candidates=topk_candidates, candidates_per_image=candidates_per_image,
                             channels_last=channels_last)
    model.model_config = {"arch": "one_stage", **arguments}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
