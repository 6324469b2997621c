"""Detection data: COCO-format datasets, transforms, NEON tree crowns and synthetic scenes."""

from . import transforms
from .coco import CocoDetection, collate_fn, load_image
from .neon import convert_voc_to_coco, fetch_deepforest_data, neon_trees
from .synthetic import SyntheticScenes, write_synthetic_coco
from .transforms import (  # noqa: F401  (in __all__ through transforms.__all__)
    ColorJitter,
    Compose,
    RandomHorizontalFlip,
    RandomRot90,
    RandomScaleJitter,
    RandomVerticalFlip,
    Resize,
    build_transforms,
    resize_scale,
)

__all__ = [
    "CocoDetection",
    "collate_fn",
    "load_image",
    "neon_trees",
    "fetch_deepforest_data",
    "convert_voc_to_coco",
    "SyntheticScenes",
    "write_synthetic_coco",
    *transforms.__all__,
]
