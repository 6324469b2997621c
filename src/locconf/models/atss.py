"""Former home of the ATSS assignment and the centerness targets, kept so that
``locconf.models.atss`` still imports: the assignment is now :mod:`locconf.models.dense.assign`
(shared by every one-stage head), the centerness targets :mod:`locconf.models.dense.atss` (ATSS's
head, their only user)."""

from .dense.assign import _atss_assign, atss_assign  # noqa: F401
from .dense.atss import centerness_targets

__all__ = ["atss_assign", "centerness_targets"]
