"""Training, evaluation and checkpoints."""

from .evaluate import METRICS, REQUIRED_SIGNALS, collect_candidates, evaluate_methods, format_table
