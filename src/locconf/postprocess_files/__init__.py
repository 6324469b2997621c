"""Post-process (or fuse) any detector's candidates from files: what ``locconf postprocess`` runs.

Input: COCO results, the format MMDetection, detectron2 and ultralytics export, one record per
candidate box (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``, and optional
``quality`` and ``variance``), as one JSON array or as JSON Lines; or DeepForest's CSV, or a
GeoJSON / GeoPackage / shapefile of boxes (:mod:`locconf.io`). Each image's candidates go through
:func:`locconf.postprocess.postprocess` (or, with several inputs, :func:`locconf.fusion.fuse`) and
are written in the output's format; with a ground truth (COCO, CSV or vector) the output and the
inputs are scored (COCO metrics, DeepForest's box precision and recall).

The modules, in the order of the flow (each docstring holds the details):

* :mod:`.source`: one input file, its records grouped by image (JSON arrays loaded whole, JSON
  Lines grouped in two passes with bounded memory);
* :mod:`.parse`: one image's records checked into candidate tensors (errors name the file, the
  record and the key);
* :mod:`.method`: the methods accepted on files (:data:`FILE_METHODS`), thresholding, the method
  and the cap on one image, the calibration;
* :mod:`.write`: result records as COCO, CSV or vector files, written to a temporary file renamed
  only on success;
* :mod:`.scoring`: COCO metrics and the correlation of each signal with the true IoU
  (:func:`format_correlation`);
* :mod:`.entry`: :func:`postprocess_file`, :func:`fuse_files` and :func:`read_detections`.
"""

from .entry import fuse_files, postprocess_file, read_detections
from .method import FILE_METHODS
from .scoring import format_correlation, format_sites

__all__ = ["postprocess_file", "fuse_files", "read_detections", "FILE_METHODS", "format_correlation", "format_sites"]
