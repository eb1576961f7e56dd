"""Time grids: hand-made spacings (grids.py) and diffusers' integer spacings."""
from jaxdiff.timesteps.grids import (FINALS, GRIDS, check_grid, diffusers_indices, grid_from_indices, karras,
                                     make_grid, time_quadratic, uniform_logsnr, uniform_t)

__all__ = ["FINALS", "GRIDS", "check_grid", "diffusers_indices", "grid_from_indices", "karras", "make_grid",
           "time_quadratic", "uniform_logsnr", "uniform_t"]
from jaxdiff.timesteps.optimize import objective, optimize, optimized_grid, order_pattern  # noqa: E402,F401
