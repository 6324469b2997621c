"""Detector builders.

- :func:`build_rcnn`: Faster R-CNN FPN (or Mask R-CNN) with a localization-quality head
  (IoU-Net, DIR and its ablations, KL-Loss; :mod:`locconf.heads`).
- :func:`build_one_stage`: one-stage ATSS-style detectors (ATSS, GFL, CLQ).
- :func:`build_torchvision_frcnn`: torchvision's own Faster R-CNN, from scratch, as a reference.
- :func:`from_torchvision`: any torchvision FasterRCNN / MaskRCNN / RetinaNet / FCOS instance as a
  locconf detector; :func:`build_torchvision` builds one by its torchvision builder's name and
  loads a weight file (torchvision, DeepForest).
- :func:`build_fpn_backbone`: the ResNet + FPN they share.
- :func:`save_pretrained` / :func:`from_pretrained`: a trained detector as a folder of safetensors
  weights and its configuration (:mod:`locconf.models.pretrained_io`).

Every detector follows torchvision's calling convention: ``model(images, targets)`` returns a dict
of losses in training and ``model(images)`` the final detections in evaluation (``detect`` with
the head's own post-processing); ``model.candidates(images)`` returns the per-image candidates
before any suppression, which locconf's post-processing and evaluation read.
"""

from .backbone import build_fpn_backbone
from .from_torchvision import TorchvisionDetector, from_torchvision
from .one_stage import build_one_stage
from .pretrained_io import from_pretrained, save_pretrained
from .rcnn import build_rcnn
from .torchvision_builders import build_torchvision
from .torchvision_rcnn import build_torchvision_frcnn

__all__ = ["build_fpn_backbone", "build_one_stage", "build_rcnn", "build_torchvision", "build_torchvision_frcnn",
           "from_pretrained", "from_torchvision", "save_pretrained", "TorchvisionDetector"]
