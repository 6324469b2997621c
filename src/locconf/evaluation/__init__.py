"""Evaluation: how good are a detector's candidates, and how much is its localization confidence worth?

Everything here reads candidates (:class:`locconf.candidates.Candidates`), collected once per
model and data set:

* :mod:`.collect`: :func:`collect_candidates` runs the detector once over a data loader;
* :mod:`.coco`: :func:`evaluate_methods` post-processes the same candidates with each method and
  scores each with COCO (:func:`load_coco`, :func:`coco_metrics`, :func:`format_table`);
* :mod:`.precision_recall`: DeepForest's box precision and recall at an IoU threshold
  (:func:`box_precision_recall`, one-to-one matching per image: :func:`match_one_to_one`);
* :mod:`.matching`: the true IoU of every box (:func:`match_to_ground_truth`) and the confidence
  signals read beside it (:data:`CONFIDENCE_SIGNALS`: score, quality, combined);
* :mod:`.correlation`: how well each signal ranks boxes by their true IoU
  (:func:`confidence_correlation`, Pearson / Spearman);
* :mod:`.calibration`: whether a signal's values mean the IoU they predict (reliability diagrams,
  ECE) and the isotonic maps that make them (:class:`Calibration`);
* :mod:`.plots`: confidence scatter, reliability diagrams, detections on an image;
* :mod:`.report`: the self-contained HTML page of ``locconf eval --html``.
"""

from . import calibration
from .calibration import (  # noqa: F401  (in __all__ through calibration.__all__)
    CALIBRATED_SIGNALS,
    Calibration,
    calibrate_out_of_fold,
    calibration_bins,
    evaluate_calibration,
    fit_calibration,
    isotonic_regression,
    reliability_diagram,
)
from .coco import METRICS, coco_metrics, evaluate_methods, format_table, load_coco
from .collect import collect_candidates
from .correlation import confidence_correlation, pearson, rankdata, spearman
from .matching import CONFIDENCE_SIGNALS, match_to_ground_truth
from .precision_recall import PR_METRICS, box_precision_recall, match_one_to_one
from .plots import draw_detections, plot_confidence, plot_reliability
from .report import detections_png, render_report, write_report

__all__ = [
    "collect_candidates",
    "evaluate_methods",
    "format_table",
    "load_coco",
    "coco_metrics",
    "METRICS",
    "PR_METRICS",
    "box_precision_recall",
    "match_one_to_one",
    "CONFIDENCE_SIGNALS",
    "match_to_ground_truth",
    "rankdata",
    "pearson",
    "spearman",
    "confidence_correlation",
    *calibration.__all__,
    "plot_confidence",
    "plot_reliability",
    "draw_detections",
    "write_report",
    "render_report",
    "detections_png",
]
