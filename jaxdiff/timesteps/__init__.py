"""Time grids: hand-made spacings and the step-order rule (grids.py), diffusers' integer spacings, and the
optimized steps of Xue et al. (objective.py: order patterns and the objective; optimize.py: the optimizer;
cache.py: the shipped cache); learned.py: learned grids as files (`save_grid`, `load_grid`; the learning
itself runs solvers and is `jaxdiff.solvers.learn_grid`).

The functions `objective` and `optimize` are bound here over their submodules' names; import the modules as
`jaxdiff.timesteps.objective` / `.optimize` with `importlib` where the module itself is needed.
"""
from jaxdiff.timesteps.cache import optimized_grid
from jaxdiff.timesteps.grids import (FINALS, GRIDS, check_grid, diffusers_indices, grid_from_indices, karras,
                                     make_grid, order_schedule, time_quadratic, uniform_logsnr, uniform_t)
from jaxdiff.timesteps.learned import load_grid, save_grid, tree_hash
from jaxdiff.timesteps.objective import objective, order_pattern
from jaxdiff.timesteps.optimize import optimize

__all__ = ["FINALS", "GRIDS", "check_grid", "diffusers_indices", "grid_from_indices", "karras", "load_grid",
           "make_grid", "objective", "optimize", "optimized_grid", "order_pattern", "order_schedule", "save_grid",
           "time_quadratic", "tree_hash", "uniform_logsnr", "uniform_t"]
