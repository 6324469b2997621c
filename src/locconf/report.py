"""Moved to :mod:`locconf.evaluation.report`; this module keeps the old import path."""

from .evaluation.report import METRIC_COLUMNS, detections_png, render_report, write_report

__all__ = ["write_report", "render_report", "detections_png", "METRIC_COLUMNS"]
