"""Precise RoI Pooling (PrRoIPool, IoU-Net), exact and differentiable, on CPU and CUDA.

Each output bin is the exact integral of the bilinearly interpolated feature map over the bin,
divided by the bin's area. Feature pixel ``F[i, j]`` sits at the continuous point ``(x=j, y=i)``
and the map is zero outside, so the interpolant fades linearly to zero over the one pixel beyond
the border (on ``[-1, 0]`` and ``[W-1, W]``) and is exactly zero further out.
A bin of zero area gives 0.

Modules:

* :mod:`.pool`: :func:`prroi_pool` on one feature map and its module :class:`PrRoIPool2d`;
* :mod:`.multi_scale`: :class:`MultiScalePrRoIPool` over an FPN pyramid (the level rules
  :func:`infer_scales`, :func:`map_levels`);
* :mod:`._integral`: the computation, in closed form (quadratic B-spline interpolation of 2-D
  prefix sums in float64) with hand-written exact backwards; its docstring derives it;
* :mod:`._args`: the argument checks.
"""

from .multi_scale import MultiScalePrRoIPool, infer_scales, map_levels
from .pool import PrRoIPool2d, prroi_pool

__all__ = ["prroi_pool", "PrRoIPool2d", "MultiScalePrRoIPool", "infer_scales", "map_levels"]
