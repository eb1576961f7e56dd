"""Time grids: hand-made spacings (grids.py), diffusers' integer spacings, and the optimized steps of Xue et
al. (objective.py: order patterns and the objective; optimize.py: the optimizer; cache.py: the shipped cache)."""
from jaxdiff.timesteps.grids import (FINALS, GRIDS, check_grid, diffusers_indices, grid_from_indices, karras,
                                     make_grid, time_quadratic, uniform_logsnr, uniform_t)

__all__ = ["FINALS", "GRIDS", "check_grid", "diffusers_indices", "grid_from_indices", "karras", "make_grid",
           "time_quadratic", "uniform_logsnr", "uniform_t"]
# grids is loaded first: jaxdiff.solvers (which objective.py asks for DPM-Solver++'s default order rule)
# imports jaxdiff.timesteps.grids. The function names `objective` and `optimize` shadow their submodules as
# package attributes (bound last, on purpose); import the modules with importlib where needed.
from jaxdiff.timesteps.cache import optimized_grid  # noqa: E402,F401
from jaxdiff.timesteps.objective import objective, order_pattern  # noqa: E402,F401
from jaxdiff.timesteps.optimize import optimize  # noqa: E402,F401
