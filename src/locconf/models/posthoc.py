"""A localization-quality head added after the fact to a trained, frozen detector (issue 27, item 4).

IoU-Net (Jiang et al., ECCV 2018, Sec. 3.1) trains its IoU predictor on boxes jittered around the
ground truth, not on the detector's own boxes, and presents it as a module "dropped into" existing
detectors; DIR (seed 002) predicts Purity and Integrity in *hindsight*, from features pooled at each
regressed box itself. Neither needs the detector to change: both pool the FPN features at a box and
predict its IoU. :class:`PosthocQuality` does exactly that for any detector that has

* ``candidates(images)`` (:class:`locconf.candidates.Candidates`, input-image coordinates), and
* a ``transform`` (torchvision's ``GeneralizedRCNNTransform``: resize, normalise, batch) and a
  ``backbone`` returning the FPN maps (an ``OrderedDict``), called by ``candidates``:

locconf's :class:`~locconf.models.rcnn.RCNN` and :class:`~locconf.models.one_stage.OneStageDetector`,
and torchvision's Faster R-CNN / RetinaNet / FCOS wrapped by :func:`locconf.models.from_torchvision`
(a DeepForest model is a torchvision RetinaNet). The detector runs once: forward hooks on its
``transform`` and ``backbone`` keep the resized image sizes and the FPN maps of that very run
(no second backbone pass), and the head pools them at each candidate's box.

Coordinate frames: candidates are in input-image coordinates, the FPN maps in the frame of the
resized images (``transform``'s ``image_sizes``). Boxes (and, in training, the ground truth) are
scaled by ``(w_resized / w_input, h_resized / h_input)`` before pooling, the inverse of the
rescaling the detectors apply to their output.

The heads are locconf's own (one home for each idea), fed the same :class:`~locconf.heads.common.RoIBatch`
as in the two-stage detector:

* ``head="dir"`` (:class:`~locconf.heads.dir.DIRHead`): Purity and Integrity, BCE on the three of
  Eq. 9. Training rows as DIR's hindsight (Sec. 3.2-3.3): the detector's *regressed boxes* that
  are positive, with their matched ground truth. The paper's positives are the regressed boxes of
  the positive proposals (IoU >= 0.5 with a ground truth); the candidates contract carries no
  proposal, so here a candidate is positive when its own box has IoU >= ``positive_iou`` (0.5,
  Faster R-CNN's foreground threshold) with a ground-truth box of its class, and is matched to the
  best such box. At most ``max_boxes_per_image`` positives per image (a uniform random subset,
  torch's global generator) bound the memory. Pooling: RoIAlign (the paper's) or ``pool="prroi"``.
* ``head="iou_net"`` (:class:`~locconf.heads.iou_net.IoUNetHead`): IoU-Net's training boxes, jittered
  around the ground truth with IoU >= 0.5 and balanced over IoU (Sec. 3.1), Precise RoI Pooling
  (required: it makes the predicted IoU differentiable in the box, which IoU-Net's refinement,
  Algorithm 2, climbs: ``refine_steps > 0``).
* ``head="iou_direct"`` (:class:`~locconf.heads.iou_direct.DirectIoUHead`): DIR's one-branch
  ablation on the same rows as ``"dir"``, RoIAlign.

Frozen detector: the detector's parameters have ``requires_grad=False`` and it stays in evaluation
mode whatever :meth:`train` is called with (its BatchNorm statistics never move; its own
candidate selection runs as at inference). In training, ``model(images, targets)`` returns only
the head's losses. ``train.freeze: detector`` (:func:`locconf.engine.train.train`) states it in a
configuration (``model.arch: posthoc``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..candidates import Candidates
from ..heads.common import RoIBatch
from ..heads.dir import DIRHead
from ..heads.iou_direct import DirectIoUHead
from ..heads.iou_net import IoUNetHead
from ..postprocess import check_method, postprocess
from .from_torchvision import _eval_mode  # one context manager for "run in eval mode, restore"

__all__ = ["PosthocQuality", "POSTHOC_HEADS", "POSTHOC_POOLS", "detector_parts", "freeze_detector"]

#: ``head=`` names and their classes.
POSTHOC_HEADS = {"dir": DIRHead, "iou_net": IoUNetHead, "iou_direct": DirectIoUHead}
#: ``pool=`` names: torchvision's RoIAlign or locconf's Precise RoI Pooling.
POSTHOC_POOLS = ("roi_align", "prroi")
#: The pooling each head's paper uses (the default of ``pool``).
_DEFAULT_POOL = {"dir": "roi_align", "iou_net": "prroi", "iou_direct": "roi_align"}


def detector_parts(detector: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(transform, backbone)`` of a detector: its own attributes, or those of the torchvision model a
    :func:`~locconf.models.from_torchvision` wrapper holds; a ``ValueError`` names what is missing."""
    if not callable(getattr(detector, "candidates", None)):
        raise ValueError(f"detector ({type(detector).__name__}) has no candidates(images) method: use a locconf "
                         "detector, or wrap a torchvision one with locconf.models.from_torchvision")
    inner = getattr(detector, "torchvision_model", detector)
    transform, backbone = getattr(detector, "transform", None), getattr(inner, "backbone", None)
    if not isinstance(transform, nn.Module) or not isinstance(backbone, nn.Module):
        raise ValueError(f"detector ({type(detector).__name__}) needs a 'transform' (resize and normalise) and a "
                         "'backbone' (FPN maps) module, as locconf's and torchvision's detectors have")
    return transform, backbone


def freeze_detector(detector: nn.Module) -> None:
    """``requires_grad=False`` on every parameter of ``detector`` and evaluation mode (BatchNorm
    statistics frozen); :class:`PosthocQuality` keeps it in evaluation mode afterwards."""
    for p in detector.parameters():
        p.requires_grad_(False)
    detector.eval()


class PosthocQuality(nn.Module):
    """A frozen detector plus a localization-quality head trained on its FPN features (module docstring).

    Args:
        detector: a trained detector (see the module docstring for what it needs); frozen here.
        head: ``"dir"`` (default), ``"iou_net"`` or ``"iou_direct"``.
        pool: ``"roi_align"`` or ``"prroi"`` (default: the head's paper's: RoIAlign for DIR and
            IoU-direct, PrRoIPool for IoU-Net, which requires it).
        featmap_names: the FPN levels to pool from (default: every level the backbone returns
            except torchvision's extra ``"pool"`` level, which Faster R-CNN's RoI pooling skips too).
        pool_size: pooled size S (7).
        representation_size: width of the head's hidden layers (1024 in both papers).
        positive_iou: DIR / IoU-direct training rows: candidates whose IoU with a ground truth of
            their class is at least this (0.5).
        max_boxes_per_image: the most training rows per image for DIR / IoU-direct (512).
        head_options: more keyword arguments of the head class (e.g. DIR's ``confidence``,
            IoU-Net's ``boxes_per_gt``, ``max_boxes_per_image``, ``iou_loss``).
        refine_steps, refine_step_size, refine_top_k: IoU-Net's refinement in :meth:`detect`
            (``head="iou_net"`` only): after IoU-guided NMS, the ``refine_top_k`` best kept boxes
            climb the predicted IoU for ``refine_steps`` steps (Algorithm 2; 0: off).
        chunk_size: the most boxes pooled at once at inference (bounds the memory).
    """

    def __init__(self, detector: nn.Module, head: str = "dir", pool: Optional[str] = None, *,
                 featmap_names: Optional[Sequence[str]] = None, pool_size: int = 7, representation_size: int = 1024,
                 positive_iou: float = 0.5, max_boxes_per_image: int = 512,
                 head_options: Optional[Mapping[str, Any]] = None, refine_steps: int = 0,
                 refine_step_size: float = 0.5, refine_top_k: int = 100, chunk_size: int = 4096) -> None:
        super().__init__()
        if head not in POSTHOC_HEADS:
            raise ValueError(f"head must be one of {tuple(POSTHOC_HEADS)}, got {head!r}")
        pool = _DEFAULT_POOL[head] if pool is None else pool
        if pool not in POSTHOC_POOLS:
            raise ValueError(f"pool must be one of {POSTHOC_POOLS}, got {pool!r}")
        if head == "iou_net" and pool != "prroi":
            raise ValueError("pool: head 'iou_net' pools with Precise RoI Pooling ('prroi'), whose output is "
                             "differentiable in the box (IoU-Net's refinement climbs it)")
        if head == "iou_direct" and pool != "roi_align":
            raise ValueError("pool: head 'iou_direct' pools with RoIAlign ('roi_align') only")
        if not 0.0 < float(positive_iou) <= 1.0:
            raise ValueError(f"positive_iou must be in (0, 1], got {positive_iou!r}")
        for name, value, low in (("max_boxes_per_image", max_boxes_per_image, 1), ("pool_size", pool_size, 1),
                                 ("representation_size", representation_size, 1), ("refine_steps", refine_steps, 0),
                                 ("refine_top_k", refine_top_k, 1), ("chunk_size", chunk_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if refine_steps and head != "iou_net":
            raise ValueError(f"refine_steps needs head 'iou_net' (the refinement climbs IoU-Net's prediction), "
                             f"got head {head!r}")
        if refine_step_size < 0:
            raise ValueError(f"refine_step_size must be >= 0, got {refine_step_size!r}")
        options = dict(head_options or {})
        if head == "dir":
            for key in ("train_features", "inference_features"):
                if options.get(key, "boxes") != "boxes":
                    raise ValueError(f"head_options.{key}: a post-hoc DIR head has no proposals' features: only "
                                     f"'boxes' (hindsight), got {options[key]!r}")
            options["pool"] = pool
        transform, backbone = detector_parts(detector)
        names, channels = _pyramid(transform, backbone, featmap_names)
        self.detector = detector
        freeze_detector(detector)
        try:
            self.head = POSTHOC_HEADS[head](channels, names, pool_size, representation_size, **options)
        except TypeError as e:
            raise ValueError(f"head_options: {e}") from None
        self.head_name, self.pool_name, self.featmap_names = head, pool, names
        self.positive_iou, self.max_boxes_per_image = float(positive_iou), max_boxes_per_image
        self.refine_steps, self.refine_step_size, self.refine_top_k = refine_steps, float(refine_step_size), refine_top_k
        self.chunk_size = chunk_size
        self.num_classes = getattr(detector, "num_classes", None)
        self.categories = getattr(detector, "categories", None)
        self.max_detections = getattr(detector, "max_detections", 100)

    @property
    def default_method(self) -> str:
        """The post-processing of the head's paper: ``"quality"`` (DIR) or ``"iou-guided"`` (IoU-Net)."""
        return self.head.default_method

    @property
    def transform(self) -> nn.Module:
        """The detector's ``transform``."""
        return detector_parts(self.detector)[0]

    def train(self, mode: bool = True) -> "PosthocQuality":
        """Set the head's mode; the frozen detector stays in evaluation mode."""
        super().train(mode)
        self.detector.eval()
        return self

    # -- running the detector ------------------------------------------------------------------------

    @torch.no_grad()
    def _detector_run(self, images: Sequence[Tensor]):
        """``(candidates in input coordinates, FPN maps, resized sizes, input sizes)`` of one detector pass."""
        transform, backbone = detector_parts(self.detector)
        seen: dict[str, Any] = {}

        def keep_sizes(module, args, output):
            seen["sizes"] = [(int(h), int(w)) for h, w in output[0].image_sizes]

        def keep_features(module, args, output):
            seen["features"] = {"0": output} if isinstance(output, Tensor) else dict(output)

        with contextlib.ExitStack() as stack:
            for module, hook in ((transform, keep_sizes), (backbone, keep_features)):
                stack.callback(module.register_forward_hook(hook).remove)
            self.detector.eval()
            cands = self.detector.candidates(list(images))
        if "sizes" not in seen or "features" not in seen:
            raise ValueError(f"detector ({type(self.detector).__name__}): its candidates() did not call its "
                             "transform and backbone, so their features cannot be pooled")
        original = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        features = {k: seen["features"][k] for k in self.featmap_names}
        return [dict(c) for c in cands], features, seen["sizes"], original

    def _roi_batch(self, features: dict[str, Tensor], sizes, boxes: list[Tensor], labels: Optional[list[Tensor]] = None,
                   **training) -> RoIBatch:
        first = next(iter(features.values()))
        n = sum(len(b) for b in boxes)
        return RoIBatch(features, sizes, boxes, first.new_zeros((0,)), first.new_zeros((0,)), boxes,
                        torch.arange(n, device=first.device),
                        labels=None if labels is None else torch.cat(labels), **training)

    def _quality(self, features: dict[str, Tensor], sizes, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """Per image the head's quality (n_i,) of ``boxes`` (resized frame), ``chunk_size`` boxes at a time."""
        out = []
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            feats = {k: v[i:i + 1] for k, v in features.items()}
            parts = [self.head.predict(self._roi_batch(feats, [sizes[i]], [bc], [lc])).float()
                     for bc, lc in zip(b.split(self.chunk_size), lab.split(self.chunk_size))]
            out.append(torch.cat(parts) if parts else b.new_zeros((0,)))
        return out

    # -- the detector API ---------------------------------------------------------------------------

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None):
        """Training: the head's dict of losses. Evaluation: :meth:`detect` (final detections)."""
        if not self.training:
            return self.detect(images)
        if targets is None or len(targets) != len(images):
            raise ValueError("targets: training needs one target dict (boxes, labels) per image")
        cands, features, sizes, original = self._detector_run(images)
        gts = [_scaled(t["boxes"].to(features[self.featmap_names[0]].dtype), o, s)
               for t, o, s in zip(targets, original, sizes)]
        if self.head_name == "iou_net":  # jittered ground truth (IoU-Net, Sec. 3.1)
            scaled = [dict(t, boxes=g) for t, g in zip(targets, gts)]
            return self.head.loss(self._roi_batch(features, sizes, [g[:0] for g in gts], targets=scaled))
        rows = [self._positives(_scaled(c["boxes"], o, s), c["labels"], g, t["labels"])
                for c, o, s, g, t in zip(cands, original, sizes, gts, targets)]
        boxes, matched = [r[0] for r in rows], [r[1] for r in rows]
        positive = [torch.ones(len(b), dtype=torch.bool, device=b.device) for b in boxes]
        return self.head.loss(self._roi_batch(features, sizes, boxes, gt_boxes=matched, positive=positive))

    def _positives(self, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """DIR's hindsight rows of one image: ``(boxes (k, 4), matched ground truth (k, 4))``, the
        candidates with IoU >= ``positive_iou`` with a ground truth of their class (the best one),
        at most ``max_boxes_per_image`` of them (uniformly at random)."""
        if len(boxes) == 0 or len(gt_boxes) == 0:
            return boxes[:0], boxes[:0]
        iou = box_iou(boxes, gt_boxes) * (labels[:, None] == gt_labels[None, :].to(labels.device))
        best, which = iou.max(dim=1)
        keep = (best >= self.positive_iou).nonzero().squeeze(1)
        if len(keep) > self.max_boxes_per_image:
            keep = keep[torch.randperm(len(keep), device=keep.device)[:self.max_boxes_per_image].sort().values]
        return boxes[keep].detach(), gt_boxes[which[keep]]

    @torch.no_grad()
    def candidates(self, images: Sequence[Tensor]) -> list[Candidates]:
        """The detector's candidates (input-image coordinates) with the head's ``quality`` (N,) in [0, 1]
        (a detector's own ``quality``, e.g. FCOS's centerness, is replaced)."""
        with _eval_mode(self):
            cands, features, sizes, original = self._detector_run(images)
            boxes = [_scaled(c["boxes"], o, s) for c, o, s in zip(cands, original, sizes)]
            quality = self._quality(features, sizes, boxes, [c["labels"] for c in cands])
        for c, q in zip(cands, quality):
            c["quality"] = q
        return cands

    @torch.no_grad()
    def score_boxes(self, images: Sequence[Tensor], boxes: Sequence[Tensor],
                    labels: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
        """The head's quality of given boxes: per image (n_i,) in [0, 1], for ``boxes`` (n_i, 4) xyxy in
        input-image coordinates (``labels`` (n_i,) 1..K for a class-aware head; default all 1)."""
        if len(boxes) != len(images) or (labels is not None and len(labels) != len(images)):
            raise ValueError(f"boxes (and labels) must hold one tensor per image: {len(images)} images, "
                             f"{len(boxes)} box tensors")
        with _eval_mode(self):
            _, features, sizes, original = self._detector_run(images)
            dtype = features[self.featmap_names[0]].dtype
            scaled = [_scaled(b.to(dtype), o, s) for b, o, s in zip(boxes, original, sizes)]
            labels = [torch.ones(len(b), dtype=torch.int64, device=b.device) for b in boxes] if labels is None \
                else list(labels)
            return self._quality(features, sizes, scaled, labels)

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], method: Optional[str] = None, max_detections: Optional[int] = None,
               **params) -> list[dict[str, Tensor]]:
        """Final detections: the candidates post-processed with ``method`` (default: the head's paper's,
        :attr:`default_method`); with ``refine_steps > 0`` (IoU-Net) the ``refine_top_k`` best
        detections are then refined by gradient ascent of the predicted IoU (Algorithm 2) and carry
        their refined predicted IoU as ``quality``."""
        method = method or self.default_method
        check_method(method)
        max_detections = self.max_detections if max_detections is None else max_detections
        with _eval_mode(self):
            cands, features, sizes, original = self._detector_run(images)
            boxes = [_scaled(c["boxes"], o, s) for c, o, s in zip(cands, original, sizes)]
            for c, q in zip(cands, self._quality(features, sizes, boxes, [c["labels"] for c in cands])):
                c["quality"] = q
            dets = [postprocess(c, method, max_detections, **params) for c in cands]
            if self.refine_steps:
                self._refine(dets, features, sizes, original)
        return dets

    def _refine(self, dets: list[dict], features: dict[str, Tensor], sizes, original) -> None:
        """IoU-Net's Algorithm 2 on the ``refine_top_k`` first detections of each image, in place."""
        k = self.refine_top_k
        heads = [_scaled(d["boxes"][:k], o, s) for d, o, s in zip(dets, original, sizes)]
        with torch.enable_grad():
            refined, iou = self.head.refine(features, heads, sizes, self.refine_steps, self.refine_step_size,
                                            labels=[d["labels"][:k] for d in dets])
        for d, b, q, o, s in zip(dets, refined, iou, original, sizes):
            n = len(b)
            d["boxes"] = torch.cat([_scaled(b.detach(), s, o).to(d["boxes"].dtype), d["boxes"][n:]])
            d["quality"] = torch.cat([q.detach().to(d["quality"].dtype), d["quality"][n:]])


def _scaled(boxes: Tensor, from_size, to_size) -> Tensor:
    """Boxes (N, 4) from an image of ``from_size`` (h, w) to one of ``to_size``."""
    ry, rx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([rx, ry, rx, ry])


def _pyramid(transform: nn.Module, backbone: nn.Module,
             featmap_names: Optional[Sequence[str]]) -> tuple[list[str], int]:
    """The levels to pool from and their channels C, read from the backbone's output on one small image."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            param = next(backbone.parameters(), None)
            x = torch.zeros(1, 3, 64, 64, device=None if param is None else param.device)
            out = backbone(x)
    finally:
        backbone.train(was_training)
    out = {"0": out} if isinstance(out, Tensor) else dict(out)
    names = [k for k in out if k != "pool"] if featmap_names is None else [str(k) for k in featmap_names]
    unknown = [k for k in names if k not in out]
    if unknown or not names:
        raise ValueError(f"featmap_names: {unknown or names} are not among the backbone's levels {list(out)}")
    channels = {int(out[k].shape[1]) for k in names}
    if len(channels) != 1:
        raise ValueError(f"featmap_names: the levels {names} have different channel counts {sorted(channels)}")
    return names, channels.pop()
