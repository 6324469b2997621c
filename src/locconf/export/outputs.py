"""From an exported network's outputs back to locconf: candidates per image, post-processing, and
the boxes in the original images' pixels.

The exported network (:mod:`.network`) stops at padded candidates because post-processing (numba)
cannot be exported. This module is the other half, in plain PyTorch and numpy:

* :func:`prepare_images`: any images -> the network's fixed-size input batch (bilinear resize);
* :func:`candidates_from_outputs`: the padded outputs (numpy arrays from onnxruntime, or tensors)
  -> one :class:`locconf.candidates.Candidates` dict per image, the padding removed, boxes (and
  KL-Loss variances, by the squared ratio) scaled from the network's input size back to each
  original image;
* :func:`postprocess_outputs`: the same, then :func:`locconf.postprocess.postprocess` with a
  method of :data:`locconf.postprocess.METHODS`;
* :class:`OnnxDetector`: an onnxruntime session of an exported file with the three steps above
  (``candidates(images)``, ``detect(images, method)``), reading the file's metadata.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..candidates import Candidates

__all__ = ["prepare_images", "candidates_from_outputs", "postprocess_outputs", "OnnxDetector"]


def prepare_images(images: Sequence[Tensor] | Tensor,
                   image_size: Sequence[int]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Stack images into the exported network's input, resizing each to ``image_size``.

    Args:
        images: (3, h, w) float tensors in [0, 1] (a list, or a (B, 3, h, w) tensor).
        image_size: the network's ``(H, W)`` (its metadata's ``image_size``).

    Returns:
        ``(batch (B, 3, H, W) float32, original sizes [(h, w), ...])``. An image already of size
        (H, W) is passed unchanged; any other is resized bilinearly (``align_corners=False``, no
        antialiasing, as the detectors' own transform resizes). Give the sizes to
        :func:`candidates_from_outputs` to map the boxes back.
    """
    height, width = _size(image_size, "image_size")
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a list of (3, h, w) tensors or a (B, 3, h, w) tensor, "
                             f"got {tuple(images.shape)}")
        images = list(images)
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of (3, h, w) tensors")
    out, sizes = [], []
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"images[{i}] must be a float (3, h, w) tensor in [0, 1], got {shape}")
        sizes.append((int(img.shape[1]), int(img.shape[2])))
        img = img.float()
        if sizes[-1] != (height, width):
            img = F.interpolate(img[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        out.append(img)
    return torch.stack(out), sizes


def candidates_from_outputs(outputs: Mapping[str, Any], original_sizes: Optional[Sequence[Sequence[int]]] = None,
                            image_size: Optional[Sequence[int]] = None) -> list[Candidates]:
    """One candidates dict per image from an exported network's padded outputs.

    Args:
        outputs: name -> array (numpy or torch) as the network returns them: ``boxes`` (B, C, 4),
            ``scores`` (B, C), ``labels`` (B, C), the head's fields and ``num_candidates`` (B,)
            (e.g. ``dict(zip(metadata["output_names"], session.run(None, feeds)))``).
        original_sizes: the ``(h, w)`` of each image before :func:`prepare_images` resized it; with
            ``image_size`` (the network's (H, W)), boxes are scaled by ``(w / W, h / H)`` and
            variances by its square. None: boxes stay in the network's input pixels.
        image_size: the network's ``(H, W)``; needed with ``original_sizes``.

    Returns:
        Per image the first ``num_candidates`` rows of every field as tensors (float32, labels
        int64), best score first: what the detector's ``candidates`` returns for that image, up to
        rounding and the order of tied scores.
    """
    if not isinstance(outputs, Mapping):
        raise ValueError(f"outputs must map output names to arrays, got {type(outputs).__name__}")
    for key in ("boxes", "scores", "labels", "num_candidates"):
        if key not in outputs:
            raise ValueError(f"outputs has no '{key}' (got {', '.join(outputs) or 'nothing'}): give every output "
                             f"of the exported network by name")
    fields = {k: torch.as_tensor(np.asarray(v)) for k, v in outputs.items()}
    counts = fields.pop("num_candidates").reshape(-1).tolist()
    bsz, rows = fields["scores"].shape[:2]
    for name, value in fields.items():
        if value.shape[:2] != (bsz, rows):
            raise ValueError(f"outputs['{name}'] has shape {tuple(value.shape)}; every field must start with "
                             f"(B, C) = {(bsz, rows)}")
    if len(counts) != bsz or any(not 0 <= c <= rows for c in counts):
        raise ValueError(f"outputs['num_candidates'] must hold B = {bsz} counts in [0, {rows}], got {counts}")
    ratios = [None] * bsz
    if original_sizes is not None:
        if image_size is None:
            raise ValueError("image_size (the network's (H, W)) is needed to map boxes to original_sizes")
        height, width = _size(image_size, "image_size")
        if len(original_sizes) < bsz:
            raise ValueError(f"original_sizes has {len(original_sizes)} sizes for {bsz} images")
        ratios = [(w / width, h / height) for h, w in (_size(s, f"original_sizes[{i}]")
                                                        for i, s in enumerate(original_sizes[:bsz]))]
    out = []
    for b, (n, ratio) in enumerate(zip(counts, ratios)):
        cand = {name: value[b, :n] for name, value in fields.items()}
        cand["labels"] = cand["labels"].to(torch.int64)
        if ratio is not None:
            rx, ry = ratio
            scale = torch.tensor([rx, ry, rx, ry], dtype=cand["boxes"].dtype)
            cand["boxes"] = cand["boxes"] * scale
            if "variances" in cand:
                cand["variances"] = cand["variances"] * scale ** 2
        out.append(cand)
    return out


def postprocess_outputs(outputs: Mapping[str, Any], method: str,
                        original_sizes: Optional[Sequence[Sequence[int]]] = None,
                        image_size: Optional[Sequence[int]] = None, max_detections: int = 100,
                        **params: Any) -> list[dict[str, Tensor]]:
    """:func:`candidates_from_outputs`, then :func:`locconf.postprocess.postprocess` of each image
    with ``method`` (a name of :data:`locconf.postprocess.METHODS`, e.g. the file's
    ``default_method``) and its keyword ``params``: the detections, best first, in the original
    images' pixels when ``original_sizes`` is given."""
    from ..postprocess import check_method, postprocess

    check_method(method)
    return [postprocess(c, method, max_detections, **params)
            for c in candidates_from_outputs(outputs, original_sizes, image_size)]


class OnnxDetector:
    """An exported ONNX network in onnxruntime, with locconf's post-processing outside it.

    Args:
        path: the ``.onnx`` file written by ``locconf export --format onnx``
            (:func:`locconf.export.export_onnx`).
        providers: onnxruntime execution providers.
        threads: intra-op threads of the session (None: onnxruntime's default).

    Attributes:
        metadata: the file's description (:func:`locconf.export.formats.network_metadata`):
            ``image_size``, ``batch_size``, ``output_names``, ``default_method``, ``categories``, ...
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: Optional[int] = None) -> None:
        from .formats import read_onnx_metadata, require

        require("onnxruntime", what="OnnxDetector")
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.metadata = read_onnx_metadata(path, self.session)
        self.image_size = tuple(self.metadata["image_size"])
        self.batch_size = int(self.metadata["batch_size"])
        self.output_names = list(self.metadata["output_names"])
        self.input_name = self.metadata["input_name"]

    def run(self, batch: np.ndarray | Tensor) -> dict[str, np.ndarray]:
        """The raw outputs by name for one (batch_size, 3, H, W) float32 batch."""
        x = np.ascontiguousarray(np.asarray(batch.cpu() if isinstance(batch, Tensor) else batch, dtype=np.float32))
        expected = (self.batch_size, 3, *self.image_size)
        if x.shape != expected:
            raise ValueError(f"the ONNX network takes a batch of shape {expected}, got {x.shape}")
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: x})))

    def candidates(self, images: Sequence[Tensor] | Tensor) -> list[Candidates]:
        """Per image its candidates in its own pixels (images of any size, any count: resized by
        :func:`prepare_images`, run ``batch_size`` at a time, the last batch padded with blank images)."""
        batch, sizes = prepare_images(images, self.image_size)
        out: list[Candidates] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            real = len(chunk)
            if real < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - real, *chunk.shape[1:])])
            cands = candidates_from_outputs(self.run(chunk), sizes[start:start + self.batch_size] +
                                            [self.image_size] * (self.batch_size - real), self.image_size)
            out.extend(cands[:real])
        return out

    def detect(self, images: Sequence[Tensor] | Tensor, method: Optional[str] = None, max_detections: int = 100,
               **params: Any) -> list[dict[str, Tensor]]:
        """Detections per image: :meth:`candidates` post-processed with ``method`` (default: the
        head's own, the metadata's ``default_method``)."""
        from ..postprocess import check_method, postprocess

        method = method or self.metadata["default_method"]
        check_method(method)
        return [postprocess(c, method, max_detections, **params) for c in self.candidates(images)]


def _size(value: Any, name: str) -> tuple[int, int]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value))
    if not ok:
        raise ValueError(f"{name} must be (height, width), two ints >= 1, got {value!r}")
    return int(value[0]), int(value[1])
