"""A torchvision detector as a locconf detector: its candidates just before its own NMS.

:func:`from_torchvision` wraps a torchvision ``FasterRCNN`` (``MaskRCNN`` too), ``RetinaNet`` or
``FCOS`` instance (the ``_v2`` builders' instances included) without changing it: the same
weights, the same pre-processing (its ``GeneralizedRCNNTransform``), the same modules. What the
wrapper adds is the one step torchvision keeps inside ``postprocess_detections``: it returns the
**candidates** (:class:`locconf.candidates.Candidates`) the model has right before its
``batched_nms``, so that every locconf post-processing method, the evaluation, the calibration and
tiled prediction work on a user's own detector.

What "right before its NMS" is, per family (torchvision 0.29's ``postprocess_detections``):

* Faster R-CNN / Mask R-CNN: the boxes of every proposal decoded for every class, clipped to the
  (resized) image, the background column dropped, then the (proposal, class) pairs whose softmax
  score is above ``roi_heads.score_thresh`` and whose box is at least 0.01 px wide and high,
  proposal-major, class-minor.
* RetinaNet: per pyramid level, the (anchor, class) pairs whose sigmoid score is above
  ``score_thresh``, the ``topk_candidates`` best of them, decoded and clipped; levels concatenated.
* FCOS: the same with the score ``sqrt(sigmoid(class logit) * sigmoid(centerness))``; the
  candidates also carry ``quality`` (the predicted centerness, as locconf's ATSS) and
  ``cls_scores`` (the class probability), so quality-aware methods apply.

These steps are written here, vectorised over the images of a batch (torchvision loops over
images and levels), and read the model's own settings and box coder at every call, so a changed
``score_thresh`` or ``topk_candidates`` is honoured. Hard NMS at the model's ``nms_thresh`` keeping
``detections_per_img`` boxes then gives the torchvision model's own output
(``tests/test_from_torchvision.py`` checks it for the three families, random and trained weights);
:meth:`TorchvisionDetector.detect` runs it on the resized images' coordinates, as torchvision does,
while :meth:`TorchvisionDetector.candidates` returns the candidates in the input images'
coordinates (the contract), where an IoU within float rounding of the threshold could decide
otherwise.

Labels: locconf numbers object classes ``1..K`` (0 is the background). Faster R-CNN's softmax has
a background column 0, so its labels are kept. RetinaNet and FCOS have one sigmoid per class and
two conventions are in use: torchvision's (``num_classes`` counts a background column 0 that no
target uses, as in its COCO weights) and DeepForest's (no background column: logit 0 is the first
class, ``label_dict = {"Tree": 0}``). ``background=True`` keeps torchvision's labels and drops
candidates of class 0; ``background=False`` adds 1 to every label (and subtracts 1 from the
training targets' labels). With one logit there is no choice (``False``); with several it must be
said.

Calling convention (torchvision's): ``model(images, targets)`` in training returns the torchvision
model's dict of losses; ``model(images)`` in evaluation returns final detections
(:meth:`TorchvisionDetector.detect`, hard NMS at ``nms_thresh``, ``detections_per_img`` kept);
:meth:`TorchvisionDetector.candidates` returns the candidates.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.roi_heads import maskrcnn_inference

from ..candidates import Candidates
from ..postprocess import check_method, postprocess
from .inputs import check_detection_inputs

__all__ = ["from_torchvision", "TorchvisionDetector", "FAMILIES"]

#: The torchvision classes :func:`from_torchvision` wraps, by family name.
FAMILIES = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}

#: Faster R-CNN drops boxes narrower or lower than this (``remove_small_boxes(boxes, 1e-2)``).
_MIN_BOX_SIDE = 1e-2


def family_of(model: nn.Module) -> str:
    """The family name of a torchvision detector instance (a ``ValueError`` for any other)."""
    if isinstance(model, KeypointRCNN):
        raise ValueError("model: a torchvision KeypointRCNN is not supported (its keypoints have no place in "
                         "locconf's candidates); wrap a FasterRCNN, MaskRCNN, RetinaNet or FCOS")
    for name in ("mask_rcnn", "faster_rcnn", "retinanet", "fcos"):  # MaskRCNN before its base class
        if isinstance(model, FAMILIES[name]):
            return name
    raise ValueError(f"model must be a torchvision FasterRCNN, MaskRCNN, RetinaNet or FCOS instance, "
                     f"got {type(model).__name__}")


def class_logits(model: nn.Module) -> int:
    """How many class outputs a torchvision detector has (Faster R-CNN's include the background)."""
    if isinstance(model, FasterRCNN):
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    return int(model.head.classification_head.num_classes)


def from_torchvision(model: nn.Module, *, background: Optional[bool] = None,
                     candidates_per_image: Optional[int] = None) -> "TorchvisionDetector":
    """Wrap a torchvision detector into a locconf detector (see the module docstring).

    Args:
        model: a torchvision ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` or ``FCOS`` instance; kept
            as is, as the wrapper's ``torchvision_model``.
        background: RetinaNet / FCOS only: whether class logit 0 is a background column that no
            target uses (torchvision's convention, e.g. its COCO weights: labels kept, class-0
            candidates dropped) or the first class (DeepForest's: labels + 1). Required when the
            model has several class logits; with one it is ``False``. Faster R-CNN always has a
            background column.
        candidates_per_image: keep at most this many candidates per image, the highest scoring
            (None: all of them, as torchvision's NMS sees them).
    """
    return TorchvisionDetector(model, background=background, candidates_per_image=candidates_per_image)


class TorchvisionDetector(nn.Module):
    """A torchvision detector with locconf's detector API (:func:`from_torchvision` builds it).

    Attributes:
        torchvision_model: the wrapped model, unchanged (its weights are this module's, under the
            ``torchvision_model.`` prefix; plain torchvision keys load too).
        family: ``"faster_rcnn"``, ``"mask_rcnn"``, ``"retinanet"`` or ``"fcos"``.
        num_classes: object classes K (labels ``1..K``).
        label_offset: added to torchvision's labels to give locconf's (0 or 1).
        default_method: ``"nms"``; :meth:`detect` uses the model's own ``nms_thresh`` with it.
        categories: ``[{"id", "name"}, ...]`` in label order when known (set by the loaders), else None.
    """

    default_method = "nms"

    def __init__(self, model: nn.Module, *, background: Optional[bool] = None,
                 candidates_per_image: Optional[int] = None) -> None:
        super().__init__()
        self.family = family_of(model)
        logits = class_logits(model)
        if self.family in ("faster_rcnn", "mask_rcnn"):
            if background is False:
                raise ValueError("background=False: Faster R-CNN's class 0 is always the background (softmax)")
            offset, num_classes = 0, logits - 1
        else:
            if background is None and logits > 1:
                raise ValueError(f"background: this {type(model).__name__} has {logits} class logits; say whether "
                                 f"logit 0 is an unused background column (True, torchvision's convention and its "
                                 f"COCO weights) or the first class (False, DeepForest's convention)")
            offset, num_classes = (0, logits - 1) if background else (1, logits)
        if num_classes < 1:
            raise ValueError(f"the model has {logits} class logits: no object class is left once the background is "
                             f"set aside")
        if candidates_per_image is not None and (isinstance(candidates_per_image, bool)
                                                 or not isinstance(candidates_per_image, int)
                                                 or candidates_per_image < 1):
            raise ValueError(f"candidates_per_image must be None or an int >= 1, got {candidates_per_image!r}")
        self.torchvision_model = model
        self.num_classes, self.label_offset = num_classes, offset
        self.candidates_per_image = candidates_per_image
        self.categories = None
        self.register_load_state_dict_pre_hook(_accept_plain_keys)
        self.train(model.training)  # the wrapper starts in the model's mode

    # -- the model's own settings ----------------------------------------------------------------

    @property
    def transform(self) -> nn.Module:
        """The wrapped model's ``GeneralizedRCNNTransform`` (resizing and normalisation), as locconf's detectors have."""
        return self.torchvision_model.transform

    def _settings(self) -> tuple[float, int]:
        """``(nms_thresh, detections_per_img)`` of the wrapped model, read at each call."""
        tv = self.torchvision_model
        owner = tv.roi_heads if self.family in ("faster_rcnn", "mask_rcnn") else tv
        return float(owner.nms_thresh), int(owner.detections_per_img)

    @property
    def nms_thresh(self) -> float:
        """The wrapped model's NMS IoU threshold (the default ``iou_threshold`` of :meth:`detect`'s ``nms``)."""
        return self._settings()[0]

    @property
    def max_detections(self) -> int:
        """The wrapped model's ``detections_per_img`` (the default of :meth:`detect`); setting it sets the model's."""
        return self._settings()[1]

    @max_detections.setter
    def max_detections(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_detections must be an int >= 0, got {value!r}")
        tv = self.torchvision_model
        (tv.roi_heads if self.family in ("faster_rcnn", "mask_rcnn") else tv).detections_per_img = value

    # -- the calling convention --------------------------------------------------------------------

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None):
        """Training: the torchvision model's losses. Evaluation: :meth:`detect` (final detections)."""
        if not self.training:
            return self.detect(images)
        check_detection_inputs(images, targets, self.num_classes, need_targets=True)
        if self.label_offset:
            targets = [dict(t, labels=t["labels"] - self.label_offset) for t in targets]
        return self.torchvision_model(list(images), [dict(t) for t in targets])

    @torch.no_grad()
    def candidates(self, images: Sequence[Tensor]) -> list[Candidates]:
        """Per image, the candidates the torchvision model has just before its NMS, in input-image
        coordinates (``boxes``, ``scores``, ``labels`` 1..K; FCOS also ``quality`` and
        ``cls_scores``). Runs in evaluation mode; the module's mode is restored."""
        with _eval_mode(self):
            return self._rescaled(*self._run(images)[:3])

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], method: Optional[str] = None, max_detections: Optional[int] = None,
               **params) -> list[dict[str, Tensor]]:
        """Final detections: the candidates post-processed with ``method``.

        Args:
            images: list of (3, H, W) float images in [0, 1].
            method: a name of :data:`locconf.postprocess.METHODS` (default ``"nms"``); ``"nms"``
                defaults its ``iou_threshold`` to the model's own ``nms_thresh``.
            max_detections: per image (default: the model's ``detections_per_img``).
            **params: keywords of the method.

        With the defaults this is the torchvision model's own output (its boxes, scores and
        labels, the labels numbered as locconf's); a Mask R-CNN adds its ``masks`` (n, 1, H, W)
        for the detections, as torchvision does.
        """
        method = self.default_method if method is None else method
        check_method(method)  # before running the network
        nms_thresh, per_image = self._settings()
        if method == "nms":
            params.setdefault("iou_threshold", nms_thresh)
        max_detections = per_image if max_detections is None else max_detections
        with _eval_mode(self):
            cands, sizes, original, features = self._run(images)
            # post-processed in the resized images' coordinates and then rescaled, as torchvision does
            dets = [postprocess(c, method, max_detections, **params) for c in cands]
            if self.family == "mask_rcnn":
                self._add_masks(dets, features, sizes)
            return self._rescaled(dets, sizes, original)  # also pastes the masks into the input images

    # -- inference ---------------------------------------------------------------------------------

    def _run(self, images: Sequence[Tensor]):
        """``(candidates in resized-image coordinates, resized sizes, input sizes, features)``; in eval mode."""
        check_detection_inputs(images, None, self.num_classes, need_targets=False)
        tv = self.torchvision_model
        original = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, _ = tv.transform(list(images), None)
        features = tv.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        if self.family in ("faster_rcnn", "mask_rcnn"):
            cands = self._rcnn_candidates(batch, features)
        else:
            cands = self._dense_candidates(batch, list(features.values()))
        return self._finish(cands), batch.image_sizes, original, features

    def _rescaled(self, cands: list[dict], sizes, original) -> list[Candidates]:
        """Candidates in input-image coordinates, rescaled exactly as torchvision rescales its output."""
        return self.torchvision_model.transform.postprocess([dict(c) for c in cands], sizes, original)

    def _rcnn_candidates(self, batch, features) -> tuple[dict[str, Tensor], Tensor, int]:
        """Faster R-CNN's (proposal, class) pairs before its NMS, for the whole batch."""
        tv = self.torchvision_model
        heads = tv.roi_heads
        proposals, _ = tv.rpn(batch, features)
        pooled = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        logits, deltas = heads.box_predictor(pooled)
        return self._rcnn_select(logits, deltas, proposals, batch.image_sizes)

    def _rcnn_select(self, logits: Tensor, deltas: Tensor, proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> tuple[dict[str, Tensor], Tensor, int]:
        """What ``roi_heads.postprocess_detections`` does before its NMS, from the same inputs."""
        heads = self.torchvision_model.roi_heads
        num_classes = logits.shape[-1]
        boxes = heads.box_coder.decode(deltas, proposals)  # (R, C, 4)
        scores = torch.softmax(logits, -1)
        counts = torch.tensor([len(p) for p in proposals], device=boxes.device)
        image = torch.repeat_interleave(torch.arange(len(proposals), device=boxes.device), counts)  # (R,)
        boxes = _clip(boxes, image_sizes, image)
        boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)  # background column dropped
        labels = torch.arange(1, num_classes, device=boxes.device).repeat(len(image))
        image = image.repeat_interleave(num_classes - 1)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (scores > heads.score_thresh) & (wh >= _MIN_BOX_SIDE).all(dim=1)
        fields = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
        return fields, image[keep], len(proposals)

    def _dense_candidates(self, batch, features: list[Tensor]) -> tuple[dict[str, Tensor], Tensor, int]:
        """RetinaNet's / FCOS's (anchor, class) pairs before the NMS, for the whole batch."""
        tv = self.torchvision_model
        out = tv.head(features)
        anchors = tv.anchor_generator(batch, features)[0]  # the same grid for every image of the batch
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        per_level = [n * (out["cls_logits"].shape[1] // sum(per_level)) for n in per_level]  # x anchors per place
        return self._dense_select(out, anchors, per_level, batch.image_sizes)

    def _dense_select(self, out: dict[str, Tensor], anchors: Tensor, per_level: list[int],
                      image_sizes: list[tuple[int, int]]) -> tuple[dict[str, Tensor], Tensor, int]:
        """What RetinaNet's / FCOS's ``postprocess_detections`` does before its NMS, from the head's
        outputs (B, N, ...), the anchors (N, 4) and the number of anchors of each level.

        The scores and the selection (threshold, then the ``topk_candidates`` best of each level)
        run image by image and level by level on the same tensors as torchvision's: ``topk``
        orders exactly tied scores by its input (float32 ties are common among thousands of
        scores), the order of tied candidates decides which one the NMS keeps, and a vectorised
        ``sigmoid`` may round differently with another memory alignment. Decoding and clipping
        are batched over images and levels (elementwise, the same values).
        """
        tv = self.torchvision_model
        fcos = self.family == "fcos"
        bsz, _, num_classes = out["cls_logits"].shape
        starts = [sum(per_level[:i]) for i in range(len(per_level))]
        images, flats, values = [], [], []
        for b in range(bsz):
            for start, n in zip(starts, per_level):
                level = torch.sigmoid(out["cls_logits"][b, start:start + n])
                if fcos:  # computed as torchvision does, so that the scores are bit for bit its own
                    level = torch.sqrt(level * torch.sigmoid(out["bbox_ctrness"][b, start:start + n]))
                level = level.flatten()
                keep = torch.where(level > tv.score_thresh)[0]
                value, top = level[keep].topk(min(tv.topk_candidates, keep.shape[0]))
                images.append(torch.full_like(top, b))
                flats.append(keep[top] + start * num_classes)
                values.append(value)
        image, flat, value = torch.cat(images), torch.cat(flats), torch.cat(values)
        anchor, label = flat // num_classes, flat % num_classes
        regression = out["bbox_regression"][image, anchor]
        if fcos:
            boxes = tv.box_coder.decode(regression, anchors[anchor])
        else:
            boxes = tv.box_coder.decode_single(regression, anchors[anchor])
        fields = {"boxes": _clip(boxes, image_sizes, image), "scores": value, "labels": label}
        if fcos:
            fields["quality"] = torch.sigmoid(out["bbox_ctrness"][image, anchor, 0])
            fields["cls_scores"] = torch.sigmoid(out["cls_logits"][image, anchor, label])
        return fields, image, bsz

    def _finish(self, cands: tuple[dict[str, Tensor], Tensor, int]) -> list[dict[str, Tensor]]:
        """The batch's candidates split per image: locconf labels, background dropped, capped."""
        fields, image, bsz = cands
        fields["labels"] = fields["labels"] + self.label_offset
        if self.label_offset == 0 and self.family in ("retinanet", "fcos"):
            real = fields["labels"] > 0  # torchvision's convention: logit 0 is no class
            fields, image = {k: v[real] for k, v in fields.items()}, image[real]
        if self.candidates_per_image is not None:
            order = torch.sort(fields["scores"], descending=True, stable=True).indices
            order = order[torch.sort(image[order], stable=True).indices]  # per image, best first
            image = image[order]
            rank = torch.arange(len(order), device=image.device) - _first_of_group(image, bsz)[image]
            order = order[rank < self.candidates_per_image]
            fields, image = {k: v[order] for k, v in fields.items()}, image[order]
        counts = torch.bincount(image, minlength=bsz).tolist()  # one host sync for the batch
        split = {k: v.split(counts) for k, v in fields.items()}
        return [{k: split[k][b] for k in fields} for b in range(bsz)]

    def _add_masks(self, dets: list[dict], features, sizes) -> None:
        """Mask R-CNN's mask probabilities (n, 1, M, M) for the detections (resized-image coordinates)."""
        heads = self.torchvision_model.roi_heads
        boxes = [d["boxes"] for d in dets]
        pooled = heads.mask_head(heads.mask_roi_pool(features, boxes, sizes))
        probs = maskrcnn_inference(heads.mask_predictor(pooled), [d["labels"] - self.label_offset for d in dets])
        for d, p in zip(dets, probs):
            d["masks"] = p


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Run a block with ``module`` in evaluation mode, restoring its mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _clip(boxes: Tensor, image_sizes: list[tuple[int, int]], image: Tensor) -> Tensor:
    """``clip_boxes_to_image`` row by row: ``boxes`` (N, 4) or (N, C, 4) of the images ``image`` (N,)."""
    if boxes.dim() == 3:
        image = image[:, None]
    hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)[image]  # (..., 2)
    x = boxes[..., 0::2].clamp(min=0).minimum(hw[..., 1:2])
    y = boxes[..., 1::2].clamp(min=0).minimum(hw[..., 0:1])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def _first_of_group(image: Tensor, bsz: int) -> Tensor:
    """(B,) the index of each image's first row in ``image`` (sorted)."""
    counts = torch.bincount(image, minlength=bsz)
    return torch.cumsum(counts, 0) - counts


def _accept_plain_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """Let a plain torchvision state dict (no ``torchvision_model.`` prefix) load into the wrapper."""
    inner = prefix + "torchvision_model."
    if any(k.startswith(inner) for k in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
