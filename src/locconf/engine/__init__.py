"""Training and checkpoints; the evaluation names re-exported from their home, :mod:`locconf.evaluation`."""

from ..evaluation import METRICS, collect_candidates, evaluate_methods, format_table
from ..postprocess import REQUIRED_SIGNALS

__all__ = ["METRICS", "REQUIRED_SIGNALS", "collect_candidates", "evaluate_methods", "format_table"]
