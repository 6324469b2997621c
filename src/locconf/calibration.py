"""Moved to :mod:`locconf.evaluation.calibration`; this module keeps the old import path."""

from .evaluation.calibration import (
    CALIBRATED_SIGNALS,
    Calibration,
    calibrate_out_of_fold,
    fit_calibration,
    isotonic_regression,
)
from .evaluation.calibration import evaluate_calibration  # noqa: F401  (importable here, not in __all__, as before)

__all__ = ["isotonic_regression", "Calibration", "fit_calibration", "calibrate_out_of_fold", "CALIBRATED_SIGNALS"]
