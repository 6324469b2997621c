"""The closed sets of values the command line offers, without importing torch (``--help`` stays fast).

Each tuple mirrors the library's own (named beside it); ``tests/test_cli.py`` keeps them equal.
"""

#: :data:`locconf.postprocess.METHODS`, plus ``none`` where the command allows no post-processing.
METHODS = ("nms", "soft-linear", "soft-gaussian", "iou-guided", "quality", "quality+soft-linear",
           "quality+soft-gaussian", "var-voting", "var-voting+soft")
#: :data:`locconf.tiling.BORDERS`.
BORDERS = ("none", "drop", "down-weight")
#: :data:`locconf.fusion.WEIGHTS`.
WEIGHTS = ("score", "quality", "variance")
#: :data:`locconf.fusion.CONF_TYPES`.
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
#: :data:`locconf.experiment.SECTIONS`.
SECTIONS = ("model", "data", "train", "eval")
#: :data:`locconf.experiment.ARCHS`.
ARCHS = ("rcnn", "one_stage", "torchvision_frcnn", "torchvision", "posthoc")
#: :data:`locconf.io.FORMATS` (the file formats of ``--format``, ``--gt-format``, ``--out-format``).
FORMATS = ("json", "jsonl", "csv", "geojson", "gpkg", "shp")
#: :data:`locconf.export.FORMATS`.
EXPORT_FORMATS = ("pretrained", "onnx", "torch-export")
#: :data:`locconf.tta.TTA_SETS` (test-time augmentation: the identity, three flips, or all eight symmetries).
TTA = ("none", "flips", "all")
#: :data:`locconf.tta.MERGES`.
TTA_MERGES = ("concat", "fuse-score", "fuse-quality", "fuse-variance")
