"""The post-processing methods by name: the one table that every caller reads.

:func:`locconf.postprocess.postprocess`, the evaluator (:mod:`locconf.evaluation.coco`), the
``locconf`` command, :mod:`locconf.postprocess_files` and the detectors' ``detect`` take a method
by its name here, and learn from its row which function runs, with which fixed keywords, on which
candidate signals, and whether it moves the boxes.

Adding a method is one row (plus its test). A row's function is called as
``function(boxes, scores, *signals, labels, **fixed, **params)``, ``signals`` being the
candidates' fields named in ``needs`` in that order (among :data:`locconf.candidates.SIGNALS`),
and returns the kept indices ``keep``, ``(keep, scores)`` or, where ``moves_boxes``,
``(keep, boxes, scores)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

from ..candidates import SIGNALS  # noqa: F401  (re-exported)
from .functions import iou_guided_nms, nms, quality_nms, soft_nms, var_voting


class Method(NamedTuple):
    """One row of :data:`METHODS`."""

    function: Callable
    fixed: Mapping[str, Any]  # keyword arguments that the name fixes (passing them again is an error)
    needs: tuple[str, ...] = ()  # candidate signals it reads beyond boxes/scores/labels, in argument order
    moves_boxes: bool = False  # it returns new boxes: (keep, boxes, scores)


#: name -> :class:`Method`, in the order tables and command help list them.
METHODS: dict[str, Method] = {
    "nms": Method(nms, {}),
    "soft-linear": Method(soft_nms, {"method": "linear"}),
    "soft-gaussian": Method(soft_nms, {"method": "gaussian"}),
    "iou-guided": Method(iou_guided_nms, {}, ("quality",)),
    "quality": Method(quality_nms, {"soft": None}, ("quality",)),
    "quality+soft-linear": Method(quality_nms, {"soft": "linear"}, ("quality",)),
    "quality+soft-gaussian": Method(quality_nms, {"soft": "gaussian"}, ("quality",)),
    "var-voting": Method(var_voting, {"suppression": "hard"}, ("variances",), moves_boxes=True),
    "var-voting+soft": Method(var_voting, {"suppression": "soft"}, ("variances",), moves_boxes=True),
}

# SIGNALS (every candidate signal a method may read, in a fixed order) is part of the candidates
# contract, locconf.candidates; every row's ``needs`` are among them (tests/test_candidates.py).

#: The candidate field each method needs beyond boxes/scores/labels (None: nothing); the
#: one-signal view of :data:`METHODS` that existing callers read.
REQUIRED_SIGNALS: dict[str, Optional[str]] = {name: (m.needs[0] if m.needs else None) for name, m in METHODS.items()}


def check_method(method: Any, what: str = "method") -> Method:
    """The row of ``method``; a ``ValueError`` naming ``what`` if there is none."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{what} must be one of {', '.join(METHODS)}; got {method!r}")
    return METHODS[method]
