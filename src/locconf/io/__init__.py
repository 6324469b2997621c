"""Detection and annotation files: the one home of the formats locconf reads and writes.

Formats (:mod:`.formats`; by extension, overridable):

* COCO: results (``.json`` array or ``.jsonl`` lines of ``{image_id, category_id, bbox [x, y, w, h],
  score, quality?, variance?}``) and instances (ground truth: ``images``, ``annotations``,
  ``categories``);
* CSV (:mod:`.csvfile`): DeepForest's columns read by name (``image_path, xmin, ymin, xmax, ymax,
  label`` + ``score`` or ``scores``, ``quality``, ``var_x1 .. var_y2``); locconf writes
  ``image_path, xmin, ymin, xmax, ymax, label, score`` [+ ``quality``, ``var_x1, var_y1, var_x2, var_y2``];
* GeoJSON, GeoPackage, ESRI shapefile (:mod:`.vector`, :mod:`.geo`): polygons or boxes in map
  coordinates, converted to and from the pixel boxes of a raster through its geotransform and CRS
  (``pip install "locconf[geo]"``: rasterio, pyogrio, shapely).

COCO is what everything inside locconf reads: CSV and vector files are converted as they are read
(:func:`read_annotations` for ground truth; :func:`detection_records` for detections, which
:mod:`locconf.postprocess_files` streams COCO results files beside). Image keys that are strings
(paths) and labels that are names are mapped to COCO's integer ids consistently across every file
of a run (:mod:`.keys`). Records keep the fields locconf does not use.

Writing: :func:`write_detections` (one image's detections, any format; the GIS output of a
georeferenced image); ``locconf postprocess --out`` writes any format too
(:mod:`locconf.postprocess_files.write`).
"""

from .annotations import check_instances, read_annotations
from .detections import detection_records, write_detections
from .formats import FORMATS, SUFFIXES, VECTOR_FORMATS, format_of
from .geo import GeoDependencyError
from .keys import Categories, ImageFinder, ImageKeys

__all__ = ["FORMATS", "VECTOR_FORMATS", "SUFFIXES", "format_of", "read_annotations", "check_instances",
           "detection_records", "write_detections", "read_detections", "ImageKeys", "Categories", "ImageFinder",
           "GeoDependencyError"]


def read_detections(path, format=None, *, images=None, gt=None, gt_format=None):
    """Every detection of a file (any format) as checked COCO result records, in image order.

    String image keys and label names are mapped to integer ids (through the ground truth ``gt``
    when given, see :mod:`.keys`); records keep their other fields. Loads the whole file: for
    small files and tests (``locconf postprocess`` streams). Same as
    :func:`locconf.postprocess_files.read_detections`.
    """
    from ..postprocess_files import read_detections as _read

    return _read(path, format=format, images=images, gt=gt, gt_format=gt_format)
