"""Test-time augmentation by the symmetries of an image: flips, rotations by 90 degrees, transposes.

An aerial image has no "up": a tree crown seen from above is a tree crown after any flip or
rotation by a multiple of 90 degrees. These are the eight symmetries of a square (the dihedral
group D4), :data:`TRANSFORMS`. Test-time augmentation runs the detector on each transformed image
(one *pass* per transform), maps each pass's candidates back to the original image and merges
the passes.

Each symmetry is written as three steps applied in order, :data:`SPECS` ``(swap, flip_x, flip_y)``:
transpose (swap x and y), then mirror left-right, then mirror top-bottom. With an image of
``(H, W)`` pixels and a box ``(x1, y1, x2, y2)`` (pixel edges, so a box of the whole image is
``(0, 0, W, H)``):

* swap: ``(y1, x1, y2, x2)``, the image becoming ``(W, H)``;
* flip_x: ``(W - x2, y1, W - x1, y2)``; flip_y: ``(x1, H - y2, x2, H - y1)``.

=================  =====================  ================================================
name               (swap, flip_x, flip_y)  on the image tensor (..., H, W)
=================  =====================  ================================================
``identity``       (no, no, no)            unchanged
``hflip``          (no, yes, no)           ``flip(-1)`` (left-right)
``vflip``          (no, no, yes)           ``flip(-2)`` (top-bottom)
``rot180``         (no, yes, yes)          ``rot90(k=2)``
``transpose``      (yes, no, no)           ``transpose(-2, -1)`` (the main diagonal)
``rot90``          (yes, no, yes)          ``torch.rot90(image, 1, dims=(-2, -1))``
``rot270``         (yes, yes, no)          ``torch.rot90(image, 3, dims=(-2, -1))``
``antitranspose``  (yes, yes, yes)         the anti-diagonal
=================  =====================  ================================================

Mapping back (:func:`inverse_boxes`) undoes the steps in reverse order; every step is its own
inverse. A predicted variance belongs to a coordinate, so it moves with it
(:func:`inverse_variances`): after a left-right flip the detector's ``x1`` is the original's
``x2``, so the variance it gives for ``x1`` is the original ``x2``'s; after a transpose its ``x1``
is the original's ``y1``. Scores, labels and the predicted quality (an IoU, which every symmetry
preserves) are unchanged.

The sets offered by ``--tta`` (:data:`TTA_SETS`): ``none`` (the identity alone), ``flips`` (the
identity, ``hflip`` and ``vflip``: the three passes of ``benchmarks/fusion_neon.py``'s flip TTA)
and ``all`` (the eight symmetries).

Merging the passes (:data:`MERGES`):

* ``concat``: the passes' candidates are pooled into one candidate set (each row keeps the index
  of its pass in ``tta_pass``), which any post-processing method then merges like the candidates
  of one pass (``locconf predict --method``; each of ``locconf eval``'s methods).
* ``fuse-score``, ``fuse-quality``, ``fuse-variance``: each pass is first post-processed by the
  method, and the passes' detections are fused with localization-aware weighted boxes fusion
  (:func:`locconf.fusion.fuse` with ``weight`` score, quality or variance; IoU threshold 0.55 and
  ``conf_type="avg"`` by default, so a box found by one pass of eight keeps 1/8 of its score).

:func:`tta_candidates` runs the passes and maps them back; :func:`pool_passes` and
:func:`fuse_passes` merge them; :class:`TestTimeAugmentation` wraps a detector so that anything
that runs a detector (tiled prediction, :func:`locconf.evaluation.collect_candidates`) runs the
augmented one; :func:`evaluate_fused` scores fused passes for ``locconf eval``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .candidates import candidates_of

__all__ = [
    "TRANSFORMS",
    "SPECS",
    "TTA_SETS",
    "MERGES",
    "check_transforms",
    "transform_image",
    "transform_boxes",
    "inverse_boxes",
    "transform_variances",
    "inverse_variances",
    "map_back",
    "tta_candidates",
    "pool_passes",
    "split_passes",
    "fuse_passes",
    "TestTimeAugmentation",
    "tta_model",
    "evaluate_fused",
]

#: ``name: (swap, flip_x, flip_y)``, the steps of each symmetry in the order they are applied.
SPECS: dict[str, tuple[bool, bool, bool]] = {
    "identity": (False, False, False),
    "hflip": (False, True, False),
    "vflip": (False, False, True),
    "rot180": (False, True, True),
    "transpose": (True, False, False),
    "rot90": (True, False, True),
    "rot270": (True, True, False),
    "antitranspose": (True, True, True),
}

#: The eight symmetries of an image, in a fixed order (the identity first).
TRANSFORMS: tuple[str, ...] = tuple(SPECS)

#: The transform sets of ``--tta``.
TTA_SETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "hflip", "vflip"),
    "all": TRANSFORMS,
}

#: How the passes are merged (see the module docstring); ``fuse-<weight>`` uses ``locconf.fusion.fuse``.
MERGES: tuple[str, ...] = ("concat", "fuse-score", "fuse-quality", "fuse-variance")

# Coordinate permutations of (x1, y1, x2, y2) for each step: position i of the result takes input[perm[i]].
_SWAP, _FLIP_X, _FLIP_Y = [1, 0, 3, 2], [2, 1, 0, 3], [0, 3, 2, 1]


def _spec(name: str) -> tuple[bool, bool, bool]:
    if not isinstance(name, str) or name not in SPECS:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, got {name!r}")
    return SPECS[name]


def check_transforms(transforms: str | Sequence[str]) -> tuple[str, ...]:
    """A transform set: a name of :data:`TTA_SETS` or a sequence of distinct :data:`TRANSFORMS` names."""
    if isinstance(transforms, str):
        if transforms not in TTA_SETS:
            raise ValueError(f"tta must be one of {', '.join(TTA_SETS)} or a list of transforms "
                             f"({', '.join(TRANSFORMS)}), got {transforms!r}")
        return TTA_SETS[transforms]
    names = tuple(transforms)
    if not names:
        raise ValueError("transforms must name at least one transform")
    for name in names:
        _spec(name)
    if len(set(names)) != len(names):
        raise ValueError(f"transforms must be distinct, got {list(names)}")
    return names


def _size(size: Any) -> tuple[float, float]:
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"size must be (height, width) of the original image, got {size!r}")
    return float(size[0]), float(size[1])


def _check_boxes(boxes: Tensor) -> Tensor:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a floating-point (N, 4) tensor (x1, y1, x2, y2), got {shape}")
    return boxes


def transform_image(image: Tensor, name: str) -> Tensor:
    """The image ``(..., H, W)`` under the symmetry ``name``: ``(..., H, W)``, or ``(..., W, H)`` where it swaps."""
    swap, flip_x, flip_y = _spec(name)
    if not isinstance(image, Tensor) or image.dim() < 2:
        raise ValueError(f"image must be a tensor (..., H, W), got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    if swap:
        image = image.transpose(-2, -1)
    if flip_x:
        image = image.flip(-1)
    if flip_y:
        image = image.flip(-2)
    return image


def _flip_x(b: Tensor, width: float) -> Tensor:
    return torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)


def _flip_y(b: Tensor, height: float) -> Tensor:
    return torch.stack([b[:, 0], height - b[:, 3], b[:, 2], height - b[:, 1]], dim=1)


def transform_boxes(boxes: Tensor, name: str, size: Sequence[int]) -> Tensor:
    """Boxes (N, 4) xyxy of an image of ``size = (H, W)`` -> the same boxes in the transformed image."""
    swap, flip_x, flip_y = _spec(name)
    b = _check_boxes(boxes)
    height, width = _size(size)
    if swap:
        b, height, width = b[:, _SWAP], width, height
    if flip_x:
        b = _flip_x(b, width)
    if flip_y:
        b = _flip_y(b, height)
    return b


def inverse_boxes(boxes: Tensor, name: str, size: Sequence[int]) -> Tensor:
    """Boxes (N, 4) found in the image transformed by ``name`` -> boxes of the original image of ``size = (H, W)``."""
    swap, flip_x, flip_y = _spec(name)
    b = _check_boxes(boxes)
    height, width = _size(size)
    if swap:
        height, width = width, height  # the transformed image's size
    if flip_y:
        b = _flip_y(b, height)
    if flip_x:
        b = _flip_x(b, width)
    if swap:
        b = b[:, _SWAP]
    return b


def _check_variances(variances: Tensor) -> Tensor:
    if not isinstance(variances, Tensor) or variances.dim() != 2 or variances.shape[1] != 4:
        shape = tuple(variances.shape) if isinstance(variances, Tensor) else type(variances).__name__
        raise ValueError(f"variances must be an (N, 4) tensor (of x1, y1, x2, y2), got {shape}")
    return variances


def transform_variances(variances: Tensor, name: str) -> Tensor:
    """Per-coordinate variances (N, 4) of boxes of the original image -> those of the transformed boxes."""
    swap, flip_x, flip_y = _spec(name)
    v = _check_variances(variances)
    for step, perm in ((swap, _SWAP), (flip_x, _FLIP_X), (flip_y, _FLIP_Y)):
        if step:
            v = v[:, perm]
    return v


def inverse_variances(variances: Tensor, name: str) -> Tensor:
    """Per-coordinate variances (N, 4) predicted in the transformed image -> those of the original's coordinates."""
    swap, flip_x, flip_y = _spec(name)
    v = _check_variances(variances)
    for step, perm in ((flip_y, _FLIP_Y), (flip_x, _FLIP_X), (swap, _SWAP)):
        if step:
            v = v[:, perm]
    return v


def map_back(candidates: Mapping[str, Any], name: str, size: Sequence[int]) -> dict:
    """One pass's candidates in the original image of ``size = (H, W)``: ``boxes`` and ``variances`` mapped
    back (:func:`inverse_boxes`, :func:`inverse_variances`), every other field unchanged (a new dict)."""
    if not isinstance(candidates, Mapping) or not isinstance(candidates.get("boxes"), Tensor):
        raise ValueError("candidates must be a dict with a tensor 'boxes'")
    out = dict(candidates)
    out["boxes"] = inverse_boxes(candidates["boxes"], name, size)
    if isinstance(candidates.get("variances"), Tensor):
        out["variances"] = inverse_variances(candidates["variances"], name)
    return out


def tta_candidates(model: nn.Module, images: Sequence[Tensor], transforms: str | Sequence[str] = "all"
                   ) -> list[list[dict]]:
    """Run ``model`` on every transform of ``images`` and map each pass's candidates back.

    Args:
        model: a detector returning candidates (:func:`locconf.candidates.candidates_of`); its mode
            is left as it is (call ``model.eval()`` first).
        images: (3, H, W) tensors, on the model's device.
        transforms: a name of :data:`TTA_SETS` or a sequence of :data:`TRANSFORMS` names.

    Returns:
        ``out[i][k]``: image ``i``'s candidates of pass ``k`` (the ``k``-th transform), in the
        original image's coordinates. One model call per transform, with all the images.
    """
    names = check_transforms(transforms)
    images = list(images)
    if not images:
        return []
    passes: list[list[dict]] = [[] for _ in images]
    for name in names:
        outputs = candidates_of(model, [transform_image(im, name) for im in images])
        if len(outputs) != len(images):
            raise ValueError(f"model returned {len(outputs)} outputs for {len(images)} images")
        for i, (im, out) in enumerate(zip(images, outputs)):
            passes[i].append(map_back(out, name, tuple(im.shape[-2:])))
    return passes


def _row_fields(cands: Mapping[str, Any]) -> dict[str, Tensor]:
    n = cands["boxes"].shape[0]
    return {k: v for k, v in cands.items() if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n}


def pool_passes(passes: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """One image's passes as one candidate set: the rows of every pass, in pass order, and ``tta_pass``
    (N,) int64, the index of each row's pass. Fields that some pass lacks are dropped (a warning-free
    intersection: every pass of one detector has the same fields)."""
    if not passes:
        raise ValueError("passes must hold at least one pass's candidates")
    fields = [_row_fields(p) for p in passes]
    keys = [k for k in fields[0] if k != "tta_pass" and all(k in f for f in fields[1:])]
    out = {k: torch.cat([f[k] for f in fields]) for k in keys}
    device = fields[0]["boxes"].device
    out["tta_pass"] = torch.cat([torch.full((f["boxes"].shape[0],), k, dtype=torch.int64, device=device)
                                 for k, f in enumerate(fields)])
    return out


def split_passes(pooled: Mapping[str, Any], num_passes: Optional[int] = None) -> list[dict[str, Tensor]]:
    """The inverse of :func:`pool_passes`: one candidate dict per pass, from the ``tta_pass`` of each row.

    ``num_passes`` (default: the largest index + 1) keeps passes with no candidate as empty dicts of tensors.
    """
    if not isinstance(pooled, Mapping) or not isinstance(pooled.get("tta_pass"), Tensor):
        raise ValueError("pooled candidates need a 'tta_pass' tensor (from pool_passes / TestTimeAugmentation)")
    index = pooled["tta_pass"]
    fields = {k: v for k, v in _row_fields(pooled).items() if k != "tta_pass"}
    if num_passes is None:
        num_passes = int(index.max()) + 1 if index.numel() else 1
    return [{k: v[index == k_pass] for k, v in fields.items()} for k_pass in range(num_passes)]


def _fuse_weight(merge: str) -> str:
    if merge not in MERGES or merge == "concat":
        raise ValueError(f"merge must be one of {', '.join(MERGES[1:])} to fuse, got {merge!r}")
    return merge[len("fuse-"):]


def fuse_passes(passes: Sequence[Mapping[str, Any]], merge: str = "fuse-score", method: str = "nms",
                params: Optional[Mapping[str, Any]] = None, max_detections: Optional[int] = None,
                iou_threshold: float = 0.55, conf_type: str = "avg") -> dict[str, Tensor]:
    """Post-process each pass with ``method`` (all of its detections kept) and fuse the passes.

    Args:
        passes: one image's candidates of each pass (:func:`tta_candidates`), or their pool
            (a dict with ``tta_pass``, split back by :func:`split_passes`).
        merge: ``"fuse-score"``, ``"fuse-quality"`` or ``"fuse-variance"``: the weight of
            :func:`locconf.fusion.fuse`.
        method, params: the post-processing of each pass (:func:`locconf.postprocess.postprocess`).
        max_detections: keep the best fused boxes (None: all).
        iou_threshold, conf_type: :func:`locconf.fusion.fuse`'s.

    Returns:
        The fused detections (``boxes``, ``scores``, ``labels`` and ``quality`` / ``variances``
        where every pass has them), best first.
    """
    from .fusion import fuse
    from .postprocess import check_method, postprocess

    weight = _fuse_weight(merge)
    check_method(method)
    if isinstance(passes, Mapping):
        passes = split_passes(passes)
    need = {"quality": "quality", "variance": "variances"}.get(weight)
    lists = []
    for k, p in enumerate(passes):
        if need is not None and not isinstance(p.get(need), Tensor):
            raise ValueError(f"tta merge {merge!r} needs {need!r}, which this detector does not predict "
                             f"(pass {k}); use fuse-score or concat")
        fields = _row_fields(p)
        fields.pop("tta_pass", None)
        det = postprocess(fields, method, max_detections=fields["boxes"].shape[0], **dict(params or {}))
        lists.append({k2: det[k2] for k2 in ("boxes", "scores", "labels", "quality", "variances") if k2 in det})
    fused = fuse(lists, weight=weight, iou_threshold=iou_threshold, conf_type=conf_type)
    if max_detections is not None:
        fused = {k: v[:max_detections] for k, v in fused.items()}
    return fused


class TestTimeAugmentation(nn.Module):
    """A detector run under test-time augmentation: ``TestTimeAugmentation(model, "flips")(images)``.

    Returns, like the detector, one candidate dict per image: with ``merge="concat"`` the pooled
    passes (:func:`pool_passes`, with ``tta_pass``), to be post-processed by any method; with a
    ``fuse-*`` merge the fused detections (:func:`fuse_passes`, each pass post-processed by
    ``method`` with ``params``). It has ``candidates(images)`` too, so it stands wherever a detector does.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, model: nn.Module, transforms: str | Sequence[str] = "all", merge: str = "concat",
                 method: str = "nms", params: Optional[Mapping[str, Any]] = None, iou_threshold: float = 0.55,
                 conf_type: str = "avg"):
        super().__init__()
        self.model = model
        self.transforms = check_transforms(transforms)
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
        if merge != "concat":
            from .fusion import CONF_TYPES
            from .postprocess import check_method

            check_method(method)
            if conf_type not in CONF_TYPES:
                raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
        self.merge, self.method, self.params = merge, method, dict(params or {})
        self.iou_threshold, self.conf_type = iou_threshold, conf_type

    def candidates(self, images: Sequence[Tensor]) -> list[dict]:
        passes = tta_candidates(self.model, images, self.transforms)
        if self.merge == "concat":
            return [pool_passes(p) for p in passes]
        return [fuse_passes(p, self.merge, self.method, self.params, iou_threshold=self.iou_threshold,
                            conf_type=self.conf_type) for p in passes]

    def forward(self, images: Sequence[Tensor]) -> list[dict]:
        return self.candidates(images)


def tta_model(model: nn.Module, tta: str | Sequence[str] = "none", merge: str = "concat", method: str = "nms",
              params: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """``model`` itself for ``tta="none"`` (and merge ``concat``), else :class:`TestTimeAugmentation` around it."""
    if check_transforms(tta) == ("identity",) and merge == "concat":
        return model
    return TestTimeAugmentation(model, tta, merge, method, params)


def evaluate_fused(candidates: Sequence[Mapping[str, Any]], coco_gt: Any, methods: Sequence[str],
                   label_to_cat_id: Mapping[int, int], merge: str = "fuse-score", max_detections: int = 100,
                   method_params: Optional[Mapping[str, dict]] = None, per_site: bool = True,
                   progress: bool = True) -> dict[str, dict]:
    """COCO metrics of each method followed by fusing the passes, as
    :func:`locconf.evaluation.evaluate_methods` scores each method on pooled candidates.

    ``candidates``: per image, the pooled passes (:class:`TestTimeAugmentation` with ``merge="concat"``,
    so each row carries ``tta_pass``) and ``image_id``. For every method: each pass of each image is
    post-processed by the method, the passes are fused (:func:`fuse_passes`, ``merge``), the best
    ``max_detections`` kept and scored as they are. Methods whose signal the candidates lack are
    skipped (as ``evaluate_methods`` does), and so is every method when ``merge`` needs a signal they lack.
    """
    from .evaluation import evaluate_methods
    from .postprocess import REQUIRED_SIGNALS

    weight = _fuse_weight(merge)
    need = {"quality": "quality", "variance": "variances"}.get(weight)
    if need is not None and any(not isinstance(c.get(need), Tensor) for c in candidates):
        raise ValueError(f"tta merge {merge!r} needs {need!r}, which this detector does not predict; "
                         f"use fuse-score or concat")
    results = {}
    for method in methods:
        signal = REQUIRED_SIGNALS.get(method)
        if signal is not None and any(not isinstance(c.get(signal), Tensor) for c in candidates):
            continue  # evaluate_methods logs it
        params = dict((method_params or {}).get(method) or {})
        fused = [dict(fuse_passes(c, merge, method, params, max_detections), image_id=c["image_id"])
                 for c in candidates]
        # the fused boxes are final detections: scored as they are (NMS that suppresses nothing: IoU > 1)
        scored = evaluate_methods(fused, coco_gt, ["nms"], label_to_cat_id, max_detections=max_detections,
                                  method_params={"nms": {"iou_threshold": 1.0}}, per_site=per_site,
                                  progress=progress)
        results[method] = scored["nms"]
    return results
