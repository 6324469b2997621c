"""The FPN's stages (``returned_layers``): one check, :func:`locconf.models.backbone.check_returned_layers`,
that every detector builder goes through, so each rejects the same inputs with the same message."""

from __future__ import annotations

import pytest

from locconf.models import build_one_stage, build_rcnn, build_torchvision_frcnn
from locconf.models.backbone import build_fpn_backbone, check_returned_layers


def test_check_returned_layers_sorts_distinct_stages():
    assert check_returned_layers((4, 2, 3)) == [2, 3, 4]
    assert check_returned_layers([1, 2, 3, 4]) == [1, 2, 3, 4]
    assert check_returned_layers((3.0,)) == [3]


BAD = [(), (0, 1), (2, 5), (2, 2, 3), (True, 2), (2.5, 3)]


@pytest.mark.parametrize("layers", BAD)
def test_every_builder_rejects_the_same_returned_layers(layers):
    builders = [
        lambda: check_returned_layers(layers),
        lambda: build_fpn_backbone("resnet18", returned_layers=layers),
        lambda: build_torchvision_frcnn(1, returned_layers=layers),
        lambda: build_rcnn(1, returned_layers=layers),
        lambda: build_one_stage(1, head="atss", fpn_channels=16, head_norm_groups=8, returned_layers=layers),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="returned_layers must be distinct stages in 1..4"):
            build()
