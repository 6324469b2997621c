"""Moved to :mod:`locconf.evaluation`; this module keeps the old import path.

Matching and the confidence signals are in :mod:`locconf.evaluation.matching` (``SIGNALS`` here is
its ``CONFIDENCE_SIGNALS``), the correlations in :mod:`locconf.evaluation.correlation`, the
reliability diagrams in :mod:`locconf.evaluation.calibration` and the plots in
:mod:`locconf.evaluation.plots`.
"""

from .evaluation.calibration import calibration_bins, reliability_diagram
from .evaluation.correlation import confidence_correlation, pearson, rankdata, spearman
from .evaluation.matching import CONFIDENCE_SIGNALS as SIGNALS
from .evaluation.matching import match_to_ground_truth
from .evaluation.plots import draw_detections, plot_confidence, plot_reliability

__all__ = [
    "SIGNALS",
    "rankdata",
    "pearson",
    "spearman",
    "match_to_ground_truth",
    "confidence_correlation",
    "calibration_bins",
    "reliability_diagram",
    "plot_confidence",
    "plot_reliability",
    "draw_detections",
]
