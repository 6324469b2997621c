"""Localization-quality heads of the two-stage detector, one file per method.

=================  ===========================================================  ==============
name               method                                                       signal
=================  ===========================================================  ==============
``iou_net``        IoU-Net: IoU from PrRoIPool features, jittered-GT training   ``quality``
``dir``            DIR: Purity and Integrity in hindsight, IoU by Eq. 5         ``quality``
``dir_foresight``  DIR ablation: Purity and Integrity from proposal features    ``quality``
``iou_direct``     DIR ablation: IoU in hindsight from one branch               ``quality``
``kl``             KL-Loss: log-variance of each box coordinate                 ``variances``
=================  ===========================================================  ==============

:func:`locconf.models.build_rcnn` builds the head of ``TWO_STAGE_HEADS`` whose ``name`` is its
``quality`` argument; the interface every head follows is documented in :mod:`.common`. A new head
is one new file and its line here.
"""

from .common import HeadContext, RoIBatch
from .dir import DIRHead
from .dir_foresight import ForesightDIRHead
from .iou_direct import DirectIoUHead
from .iou_net import IoUNetHead
from .kl import KLHead, kl_loss

#: The two-stage quality heads, in the order of ``locconf.models.rcnn.QUALITY_HEADS``.
TWO_STAGE_HEADS = (IoUNetHead, DIRHead, ForesightDIRHead, DirectIoUHead, KLHead)

__all__ = ["TWO_STAGE_HEADS", "HeadContext", "RoIBatch", "DIRHead", "ForesightDIRHead", "DirectIoUHead", "IoUNetHead", "KLHead", "kl_loss"]
