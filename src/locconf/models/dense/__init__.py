"""The heads of the one-stage detectors, one file per method, on a shared dense head.

=========  ==================================================================  ==================
name       method                                                              ``quality``
=========  ==================================================================  ==================
``atss``   ATSS: focal loss, score = class x centerness                        centerness
``clq``    CLQ on ATSS: joint class x LQE score guided by a predicted IoU      predicted IoU
``gfl``    GFL: quality focal loss on a joint score, general distribution box  none
=========  ==================================================================  ==================

:func:`locconf.models.build_one_stage` builds the head that :data:`HEADS` names. What the heads
share (towers, box branch, decoding) and the protocol every head follows are in :mod:`.common`; the
ATSS assignment they are all trained with is in :mod:`.assign`. A new head is one file with a
:class:`~.common.DenseHead` subclass and one line in :data:`HEADS`.
"""

from .assign import assign_batch, atss_assign
from .atss import ATSSHead, centerness_targets
from .clq import CLQHead, iou_statistics
from .common import DenseHead, DenseScores, Positives
from .gfl import GFL_BOXES, GFLHead

HEADS: dict[str, type[DenseHead]] = {cls.name: cls for cls in (ATSSHead, CLQHead, GFLHead)}

__all__ = ["HEADS", "DenseHead", "DenseScores", "Positives", "ATSSHead", "CLQHead", "GFLHead", "GFL_BOXES",
           "assign_batch", "atss_assign", "centerness_targets", "iou_statistics"]
