"""Localization-aware post-processing: the NMS family and one entry point that applies a method.

Every function takes the fields of one image's candidates (:mod:`locconf.candidates`: ``boxes``
(N, 4) xyxy, ``scores`` (N,), optional integer ``labels`` (N,), suppression then being per class,
and the signal it reads), and returns the kept indices in selection order
together with the output scores (and boxes, where the method changes them). Empty input gives
empty output; bad input raises a ``ValueError`` that names the argument.

Semantics (see ``docs/design.md`` for the papers behind them):

* ``nms``: a box is suppressed when its IoU with a kept box is **greater than** the threshold
  (as torchvision).
* ``soft_nms`` (Bodla et al. 2017): linear decay by ``1 - IoU`` where ``IoU >= iou_threshold``
  (mmcv's convention); Gaussian decay by ``exp(-IoU^2 / sigma)`` for every overlap. A box is
  dropped as soon as its decayed score falls below ``min_score``; boxes that start below it are
  never output. We return the **decayed** scores (as mmcv; ensemble-boxes returns undecayed ones).
* ``iou_guided_nms`` (IoU-Net): rank by predicted quality, suppress as hard NMS, and give every
  kept box the maximum classification score of the boxes it suppresses (itself included).
* ``quality_nms`` (DIR, PAA): rank and score by ``scores^(1-weight) * quality^weight``.
* ``var_voting`` (KL-Loss): suppression as hard NMS or Gaussian Soft-NMS on the original boxes;
  each selected box is replaced by the per-coordinate average of the candidates still remaining
  when it is selected (itself included) that overlap it (IoU > 0), weighted by
  ``exp(-(1 - IoU)^2 / sigma_t) / variance``. As in the original KL-Loss code, the voted box never
  changes the later suppression.

Ties in the ranking score are broken by the lower input index, so the result is deterministic.
Suppression is per class for any finite coordinates and any integer labels: classes are grouped
by sorting, never by shifting coordinates by a per-class offset (which loses precision).

How the methods stay exact, fast and small
------------------------------------------
All methods are greedy: pick the best remaining box, update its neighbours, repeat (hard NMS is
the case where the update removes). Three facts make them cheap:

1. Only boxes that overlap interact. Overlaps are computed on the fly from the boxes sorted by
   x1 (and, on CPU, split into horizontal bands by y1), never stored, so memory is O(N) whatever
   the number of overlapping pairs (100,000 identical boxes overlap in 5e9 pairs).
2. Hard suppression never changes a score, so its selection order is the initial ranking; with
   decays a lazy max-heap finds the best remaining box (its keys bound the current scores).
3. A box whose (score, index) key beats that of every remaining neighbour it interacts with is
   selected, with its current score, before any of those neighbours, and the decays that
   different boxes apply to a common neighbour commute. Keys at selection time strictly decrease,
   so the selection order is the order of the output scores.

On CPU a compiled numba kernel runs the greedy loop; each IoU and decay uses the operations of
the plain sequential algorithm, so its output scores are bit-identical to it. The kernel is
cached on disk (see the kernel section below for where). On other devices (CUDA) a vectorised
torch version selects, in each round, every box that beats all its remaining neighbours at once
(exact by fact 3), enumerating the candidate pairs in chunks of at most ``_PAIR_CHUNK`` and
keeping the overlapping ones across rounds only while there are at most ``_PAIR_STORE``; it
synchronises with the host a few times per round, never per box, and reconstructs the selection
times that voting needs from the round results. Hard NMS on the torch backend uses torchvision
where shifting classes apart is exact (checked), else the rounds. Both backends can be chosen
explicitly with ``backend="numba" | "torch"``.

Layout: :mod:`.methods` (the table of named methods), :mod:`.entry` (:func:`postprocess`),
:mod:`.functions` (the public functions), :mod:`.checks` (argument validation; the candidate
tensors are checked by :func:`locconf.candidates.check_fields`), :mod:`.greedy`
(backend dispatch, hard NMS), :mod:`.kernel` (numba, CPU), :mod:`.rounds` (torch, CUDA).
"""

from .entry import postprocess
from .functions import iou_guided_nms, nms, quality_nms, soft_nms, var_voting
from .methods import METHODS, REQUIRED_SIGNALS, SIGNALS, Method, check_method

__all__ = [
    "nms",
    "soft_nms",
    "iou_guided_nms",
    "quality_nms",
    "var_voting",
    "postprocess",
    "METHODS",
    "Method",
    "check_method",
    "SIGNALS",
    "REQUIRED_SIGNALS",
]
