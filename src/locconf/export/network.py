"""A locconf detector's network as one fixed-shape function up to the candidates: what ONNX and
``torch.export`` can carry.

:func:`export_network` wraps a trained detector (its modules and weights, shared, not copied) in an
``nn.Module`` whose ``forward`` takes one batch tensor and returns padded candidate tensors:

* **input** ``images`` (B, 3, H, W) float32 RGB in [0, 1], B, H and W fixed when the network is
  wrapped (``batch_size``, ``image_size``). The detector's own input transform is inside: the
  normalisation by its mean and standard deviation, the bilinear resize to ``min_size`` /
  ``max_size`` and the zero padding to a multiple of 32, exactly as ``GeneralizedRCNNTransform``
  does them for an image of that size. So the exported file reads raw pixels, and an image of
  another size is resized to (H, W) by the caller (:func:`locconf.export.prepare_images`).
* **outputs** (:attr:`ExportedNetwork.output_names`), for C = ``candidates_per_image`` rows:
  ``boxes`` (B, C, 4) xyxy in the (H, W) input's pixels, ``scores`` (B, C), ``labels`` (B, C)
  int64 in 1..K, the head's fields (``quality`` (B, C) for IoU-Net / DIR / IoU-direct / ATSS /
  CLQ, ``variances`` (B, C, 4) for KL-Loss, ``cls_scores`` (B, C) for ATSS / CLQ) and
  ``num_candidates`` (B,) int64. Row ``i`` of image ``b`` is a candidate when
  ``i < num_candidates[b]``; the candidates come first, best score first, and every padding row
  is zero (label 0, the background). Rows ``:num_candidates[b]`` are what ``model.candidates``
  returns for that image (the same boxes, scores, labels and signals, up to floating-point
  rounding and the order of tied scores).

The computation is the detector's own wherever its shapes are fixed (backbone, FPN, RPN head, box
stage and cascade stages, quality head, dense head, the one-stage candidate selection
``OneStageDetector._padded_candidates``); what eager PyTorch does with data-dependent shapes is
re-expressed with masks of fixed size:

* the RPN's proposal filtering (torchvision's ``filter_proposals``): per level the
  ``pre_nms_top_n`` best anchors, clipped; boxes below ``min_size`` or ``score_thresh`` get the
  score -1, so that they sort after every real box and suppress none (greedy NMS only lets a box
  suppress lower-scored ones); torchvision's NMS per image and level (the one data-dependent
  operator: ONNX ``NonMaxSuppression``), its kept indices scattered into a mask; the
  ``post_nms_top_n`` best kept boxes by ``topk``, with a validity mask;
* the two-stage candidate selection (``RoIHeads._candidates``): every (proposal, class) pair of
  every image scored, the pairs that fail ``score_thresh``, the smallest box size or come from a
  padding proposal set to -1, and ``topk`` of ``candidates_per_image``; DIR's threshold ``a``
  (``quality_thresh``) as a ``where`` (the quality of every pair is predicted, and 0 kept below
  ``a``, which is what eager returns).

What cannot be exported, and why (``ValueError`` from :func:`export_network`):

* IoU-Net's box refinement (``refine_steps > 0``): gradient ascent of the predicted IoU with
  respect to the box coordinates (Algorithm 2), a loop of backward passes that an inference graph
  does not hold; with ``refine_order="after_nms"`` it also runs IoU-guided NMS (numba) inside the
  detector. Export the candidates before refinement (``refine_steps=0``: ``locconf export
  --no-refine``) and refine in PyTorch if needed.
* torchvision's own Faster R-CNN (``arch: torchvision_frcnn``): its evaluation output comes from
  torchvision's ``postprocess_detections``, whose per-image filtering has data-dependent shapes
  that locconf does not re-express; torchvision's model has its own ONNX path.
* A torchvision detector wrapped by ``from_torchvision`` (``arch: torchvision``), for the same
  reason (torchvision's per-image filtering before its NMS), and a post-hoc quality model
  (``arch: posthoc``), whose head pools the boxes through a hook on the frozen detector's pyramid.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import nms

from ..boxes import clip_boxes
from ..heads import RoIBatch

__all__ = ["ExportedNetwork", "RCNNNetwork", "OneStageNetwork", "export_network", "check_exportable"]


def check_exportable(model: nn.Module) -> None:
    """Raise a ``ValueError`` saying why ``model`` cannot be exported up to its candidates (see
    the module docstring), or return when it can."""
    from ..models.one_stage import OneStageDetector
    from ..models.rcnn import RCNN

    if isinstance(model, RCNN):
        heads = model.roi_heads
        if heads.refine_steps > 0:
            raise ValueError(
                f"IoU-Net's box refinement (refine_steps={heads.refine_steps}) cannot be exported: it is gradient "
                "ascent of the predicted IoU in the box coordinates (a loop of backward passes; with "
                "refine_order='after_nms' also IoU-guided NMS in numba), which an ONNX or torch.export inference "
                "graph does not hold. Export the candidates before refinement (refine_steps=0; locconf export "
                "--no-refine) and refine in PyTorch")
        return
    if isinstance(model, OneStageDetector):
        return
    from ..models.from_torchvision import TorchvisionDetector
    from ..models.posthoc import PosthocQuality

    if isinstance(model, PosthocQuality):
        raise ValueError(
            "a post-hoc quality model (arch posthoc) is not exported by locconf: it runs its frozen detector's "
            "candidates, then pools their boxes with a hook on the detector's feature pyramid, which locconf's "
            "exported graphs do not re-express; run it in PyTorch (locconf predict / eval take its checkpoint)")
    if isinstance(model, TorchvisionDetector):
        raise ValueError(
            f"a torchvision detector wrapped by from_torchvision ({type(model.torchvision_model).__name__}) is not "
            "exported by locconf: its candidates come out of torchvision's own per-image filtering (score "
            "threshold, per-level top-k), whose shapes depend on the data and which locconf does not re-express; "
            "torchvision's model has its own ONNX path (torch.onnx.export(model.torchvision_model, ...)), which "
            "returns its final detections")
    try:
        from torchvision.models.detection import FasterRCNN
    except ImportError:  # pragma: no cover
        FasterRCNN = ()
    if isinstance(model, FasterRCNN):
        raise ValueError(
            "torchvision's own Faster R-CNN (arch torchvision_frcnn) is not exported by locconf: its candidates "
            "come out of torchvision's postprocess_detections, whose per-image filtering has data-dependent "
            "shapes that locconf does not re-express; the exportable detectors are build_rcnn's (arch rcnn) and "
            "build_one_stage's (arch one_stage)")
    raise ValueError(f"model must be a locconf detector (build_rcnn or build_one_stage), got {type(model).__name__}")


def export_network(model: nn.Module, image_size: Sequence[int], batch_size: int = 1) -> "ExportedNetwork":
    """Wrap ``model`` (a locconf detector) as a fixed-shape network up to the candidates.

    Args:
        model: from :func:`locconf.models.build_rcnn` or :func:`locconf.models.build_one_stage`
            (trained or not); it is put in evaluation mode and its modules are shared.
        image_size: ``(H, W)`` of the input images.
        batch_size: B, the images per call.

    Returns:
        An :class:`ExportedNetwork` in evaluation mode, on the model's device (module docstring
        for its input and outputs).

    Raises:
        ValueError: for a model that cannot be exported (the message says why) or a bad size.
    """
    from ..models.one_stage import OneStageDetector

    check_exportable(model)
    size = _check_size(image_size, batch_size)
    cls = OneStageNetwork if isinstance(model, OneStageDetector) else RCNNNetwork
    return cls(model.eval(), size, batch_size).eval()


def _check_size(image_size, batch_size) -> tuple[int, int]:
    ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in image_size))
    if not ok:
        raise ValueError(f"image_size must be (height, width), two ints >= 1, got {image_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return int(image_size[0]), int(image_size[1])


class ExportedNetwork(nn.Module):
    """What the two wrappers share: the input transform and the padded outputs.

    Attributes:
        model: the wrapped detector.
        image_size: (H, W) of the input; batch_size: B.
        resized_size: (h, w) of the image the network sees (the transform's resize of (H, W)).
        padded_size: the batch tensor's size (``resized_size`` padded to a multiple of 32).
        output_names: the names of ``forward``'s outputs, in order.
    """

    output_names: tuple[str, ...]

    def __init__(self, model: nn.Module, image_size: tuple[int, int], batch_size: int) -> None:
        super().__init__()
        self.model, self.image_size, self.batch_size = model.eval(), image_size, batch_size
        transform = model.transform  # in evaluation mode: its resize is the fixed min_size rule
        param = next(model.parameters())
        with torch.no_grad():
            probe = transform([torch.zeros(3, *image_size, device=param.device)])[0]
        self.resized_size = tuple(int(v) for v in probe.image_sizes[0])
        self.padded_size = tuple(int(v) for v in probe.tensors.shape[-2:])
        self.register_buffer("mean", torch.tensor(transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the normalised, resized and padded batch (B, 3, *padded_size)."""
        x = (images - self.mean.to(images.device)) / self.std.to(images.device)
        if self.resized_size != self.image_size:
            x = F.interpolate(x, size=self.resized_size, mode="bilinear", align_corners=False)
        pad_h, pad_w = self.padded_size[0] - self.resized_size[0], self.padded_size[1] - self.resized_size[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def _finish(self, fields: dict[str, Tensor], counts: Tensor) -> tuple[Tensor, ...]:
        """Zero the padding rows and order the outputs as :attr:`output_names`."""
        rows = torch.arange(fields["scores"].shape[1], device=counts.device)
        valid = rows[None, :] < counts[:, None]  # (B, C)
        out = {}
        for name, value in fields.items():
            mask = valid.view(*valid.shape, *([1] * (value.dim() - 2)))
            out[name] = torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
        out["num_candidates"] = counts.to(torch.int64)
        return tuple(out[name] for name in self.output_names)

    def outputs_dict(self, outputs: Sequence[Tensor]) -> dict[str, Tensor]:
        """``forward``'s outputs (or onnxruntime's, in the same order) by name."""
        return dict(zip(self.output_names, outputs))


class RCNNNetwork(ExportedNetwork):
    """:class:`locconf.models.rcnn.RCNN` (any quality head, Cascade R-CNN) up to its candidates."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int], batch_size: int) -> None:
        super().__init__(model, image_size, batch_size)
        rpn = model.rpn
        self.pre_nms_top_n, self.post_nms_top_n = rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"]
        with torch.no_grad():
            x = self.preprocess(torch.zeros(batch_size, 3, *image_size, device=self.mean.device))
            features = list(model.backbone(x).values())
            anchors = rpn.anchor_generator(ImageList(x, [self.resized_size] * batch_size), features)[0]
            objectness, _ = rpn.head(features)
        self.register_buffer("anchors", anchors, persistent=False)  # (N, 4), the same for every image
        self.level_counts = [int(o[0].numel()) for o in objectness]  # A * H_l * W_l
        head = model.roi_heads.quality_head
        signal = () if head is None else (head.signal,)
        self.output_names = ("boxes", "scores", "labels", *signal, "num_candidates")

    def proposals(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The RPN's proposals, (B, P, 4), and which rows are proposals (B, P) (the others are
        padding), as torchvision's ``filter_proposals`` selects them (module docstring)."""
        rpn, bsz = self.model.rpn, self.batch_size
        objectness, deltas = rpn.head(features)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = rpn.box_coder.decode(deltas.detach(), [self.anchors] * bsz).view(bsz, -1, 4)
        objectness = objectness.reshape(bsz, -1)
        top, start = [], 0
        for count in self.level_counts:
            top.append(objectness[:, start:start + count].topk(min(self.pre_nms_top_n, count), dim=1).indices + start)
            start += count
        sizes = [t.shape[1] for t in top]
        index = torch.cat(top, dim=1)  # (B, T)
        prob = torch.sigmoid(objectness.gather(1, index))
        boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        h, w = self.resized_size
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh >= rpn.min_size).all(dim=-1) & (prob >= rpn.score_thresh)
        ranked = torch.where(valid, prob, torch.full_like(prob, -1.0))
        kept = []
        for b in range(bsz):
            start = 0
            for n in sizes:
                keep = nms(boxes[b, start:start + n], ranked[b, start:start + n], rpn.nms_thresh)
                kept.append(torch.zeros(n, dtype=prob.dtype, device=prob.device).scatter(0, keep, 1.0))
                start += n
        kept = torch.cat(kept).view(bsz, -1) > 0
        final = torch.where(kept & valid, prob, torch.full_like(prob, -1.0))
        best = final.topk(min(self.post_nms_top_n, final.shape[1]), dim=1)
        proposals = boxes.gather(1, best.indices[..., None].expand(-1, -1, 4))
        return proposals, best.values > -0.5

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        model, heads, bsz = self.model, self.model.roi_heads, self.batch_size
        x = self.preprocess(images)
        features = model.backbone(x)
        proposals, proposal_ok = self.proposals(list(features.values()))
        image_sizes = [self.resized_size] * bsz
        props, pooled, rep, scores, boxes = heads._box_predictions(features, list(proposals.unbind(0)), image_sizes)
        n, k = scores.shape
        per_image = n // bsz
        boxes = boxes.view(n, -1, 4)
        if heads.box_head.box_groups == 1:
            boxes, groups = boxes.expand(n, k, 4), torch.zeros(k, dtype=torch.int64, device=scores.device)
        else:
            boxes, groups = boxes[:, 1:], torch.arange(1, k + 1, device=scores.device)
        boxes = clip_boxes(boxes.reshape(-1, 4), self.resized_size).view(bsz, per_image * k, 4)
        scores = scores.reshape(bsz, per_image * k)
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = (scores > heads.score_thresh) & (wh >= heads.min_box_size).all(dim=-1)
        ok = ok & proposal_ok.repeat_interleave(k, dim=1)
        best = torch.where(ok, scores, torch.full_like(scores, -1.0)).topk(
            min(heads.candidates_per_image, per_image * k), dim=1)
        pair = best.indices  # (B, C) indices into per_image * k
        counts = ok.gather(1, pair).sum(dim=1)
        cand_boxes = boxes.gather(1, pair[..., None].expand(-1, -1, 4))
        labels = pair % k + 1
        fields = {"boxes": cand_boxes, "scores": scores.gather(1, pair), "labels": labels}
        if heads.quality_head is not None:
            rows = (pair // k + torch.arange(bsz, device=pair.device)[:, None] * per_image).reshape(-1)
            batch = RoIBatch(features, image_sizes, props, pooled, rep, list(cand_boxes.unbind(0)), rows,
                             box_class=groups[(labels - 1).reshape(-1)], labels=labels.reshape(-1))
            signal = heads.quality_head.signal
            values = heads.quality_head.predict(batch).float()
            if signal == "quality" and heads.quality_thresh > heads.score_thresh:  # DIR's threshold a
                above = fields["scores"].reshape(-1) > heads.quality_thresh
                values = torch.where(above, values, torch.zeros_like(values))
            fields[signal] = values.view(bsz, -1, *values.shape[1:])
        fields = _to_input_size(fields, self.resized_size, self.image_size)
        return self._finish(fields, counts)


def _to_input_size(fields: dict[str, Tensor], size: tuple[int, int], original: tuple[int, int]) -> dict[str, Tensor]:
    """Two-stage candidates from the resized image's pixels to the input's (as ``RCNN``'s eval output)."""
    from ..models.rcnn import _rescale

    return _rescale(fields, size, original)


class OneStageNetwork(ExportedNetwork):
    """:class:`locconf.models.one_stage.OneStageDetector` (ATSS, GFL, CLQ) up to its candidates."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int], batch_size: int) -> None:
        super().__init__(model, image_size, batch_size)
        with torch.no_grad():
            x = self._network_input(torch.zeros(batch_size, 3, *image_size, device=self.mean.device))
            features = list(model.backbone(x).values())
            anchors = model.anchor_generator(ImageList(x, [self.resized_size] * batch_size), features)[0]
            self.level_counts = [f.shape[-2] * f.shape[-1] * model.head.num_anchors for f in features]
            h, w = x.shape[-2:]
            strides = torch.cat([anchors.new_tensor([w // f.shape[-1], h // f.shape[-2]]).expand(c, 2)
                                 for f, c in zip(features, self.level_counts)])
            fields, _ = model._padded_candidates(model.head(features), anchors, strides, self.level_counts,
                                                 [self.resized_size] * batch_size)
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("strides", strides, persistent=False)
        self.output_names = (*fields, "num_candidates")

    def _network_input(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        return x.contiguous(memory_format=torch.channels_last) if self.model.channels_last else x

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        features = list(model.backbone(self._network_input(images)).values())
        fields, counts = model._padded_candidates(model.head(features), self.anchors, self.strides,
                                                  self.level_counts, [self.resized_size] * self.batch_size)
        bsz, c = fields["boxes"].shape[:2]
        boxes = resize_boxes(fields["boxes"].reshape(-1, 4), self.resized_size, self.image_size)
        fields = dict(fields, boxes=boxes.view(bsz, c, 4))
        return self._finish(fields, counts)
