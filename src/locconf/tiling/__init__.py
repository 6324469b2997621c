"""Whole images: tiled prediction, boxes cut by tile borders, and merging the tiles' candidates.

An orthomosaic thousands of pixels wide is cut into square tiles that overlap (:func:`tile_grid`);
the detector runs on batches of tiles and returns its raw candidates (before any NMS); each tile's
candidates are shifted to image coordinates (:func:`shift_candidates`), the candidates cut by an
interior tile border are handled (:func:`resolve_borders`) and everything is merged with a
:mod:`locconf.postprocess` method (:class:`TileMerger`). :func:`predict_tiled` does all of it.

The modules, in the order of the flow (each docstring holds the details):

* :mod:`.grid`: the tile grid (:func:`tile_grid`), a tile's candidates in image coordinates
  (:func:`shift_candidates`) and the sides an interior tile edge cuts (:func:`cut_sides`);
* :mod:`.raster`: reading an image tile by tile (:func:`open_raster`: Pillow, or rasterio for
  GeoTIFFs), with its pixel limit (:data:`DEFAULT_MAX_PIXELS`) and the check of a PNG's pixel data
  (:func:`check_png_data`);
* :mod:`.predict`: the detector over the tiles in batches (:func:`tile_candidates`) and the
  whole pipeline (:func:`predict_tiled`), with the tile size's lower bound (:func:`check_tile_size`);
* :mod:`.borders`: the ``border`` modes for boxes cut by a tile border (:data:`BORDERS`,
  :func:`resolve_borders`);
* :mod:`.merge`: merging all at once (:func:`merge_candidates`) or row by row with bounded memory
  (:class:`TileMerger`);
* :mod:`.writers`: CSV with DeepForest's columns and ``image_path`` (:func:`write_csv`,
  :func:`write_csv_images`), COCO results (:func:`write_coco_results`, :func:`coco_records`) and a
  COCO file of several images (:func:`write_coco_images`), an overview image
  (:func:`draw_overview`), boxes in map units (:func:`map_boxes`) and a set of files written as one
  (:func:`write_together`);
* :mod:`.checks`: the argument checks they share.
"""

from .borders import BORDERS, resolve_borders
from .grid import cut_sides, shift_candidates, tile_grid
from .merge import TileMerger, merge_candidates
from .predict import MIN_TILE_SIZE, check_tile_size, predict_tiled, tile_candidates
from .raster import DEFAULT_MAX_PIXELS, check_png_data, open_raster
from .writers import (
    CSV_COLUMNS,
    coco_records,
    draw_overview,
    map_boxes,
    records_to_dets,
    write_coco_images,
    write_coco_results,
    write_csv,
    write_csv_images,
    write_together,
)

__all__ = [
    "BORDERS",
    "tile_grid",
    "shift_candidates",
    "cut_sides",
    "resolve_borders",
    "merge_candidates",
    "TileMerger",
    "open_raster",
    "DEFAULT_MAX_PIXELS",
    "check_png_data",
    "tile_candidates",
    "predict_tiled",
    "MIN_TILE_SIZE",
    "check_tile_size",
    "CSV_COLUMNS",
    "write_csv",
    "write_csv_images",
    "coco_records",
    "records_to_dets",
    "write_coco_results",
    "write_coco_images",
    "write_together",
    "draw_overview",
    "map_boxes",
]
