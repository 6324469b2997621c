"""Detector builders.

Until locconf's own detectors exist, :func:`build_torchvision_frcnn` gives a small torchvision
Faster R-CNN with the same training/evaluation API (``model(images, targets)`` returns a dict of
losses in training and a list of detection dicts in evaluation).
"""

from .torchvision_rcnn import build_torchvision_frcnn

__all__ = ["build_torchvision_frcnn"]
