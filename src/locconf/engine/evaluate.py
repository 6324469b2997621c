"""Moved to :mod:`locconf.evaluation` (:mod:`.collect` and :mod:`.coco`); this module keeps the old import path.

``REQUIRED_SIGNALS`` is :data:`locconf.postprocess.REQUIRED_SIGNALS`; ``_load_coco`` and
``_coco_metrics`` are the old names of :func:`locconf.evaluation.load_coco` and
:func:`locconf.evaluation.coco_metrics`.
"""

from ..evaluation.coco import METRICS, _ap_at_iou, coco_metrics, evaluate_methods, format_table, load_coco  # noqa: F401
from ..evaluation.collect import collect_candidates
from ..postprocess import REQUIRED_SIGNALS

_load_coco = load_coco
_coco_metrics = coco_metrics

__all__ = ["collect_candidates", "evaluate_methods", "format_table", "METRICS", "REQUIRED_SIGNALS"]
