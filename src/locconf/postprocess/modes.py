"""The suppression modes of the greedy core, shared by its two backends (numba kernel, torch rounds)."""

_HARD, _LINEAR, _GAUSSIAN = 0, 1, 2  # remove (IoU > threshold), linear decay, Gaussian decay
_SOFT_MODES = {"linear": _LINEAR, "gaussian": _GAUSSIAN}
