"""jaxdiff: diffusion models in JAX.

Layers (each imports only those before it): noise -> predictions -> losses -> timesteps -> solvers
-> analytic; then nn (Flax NNX) -> convert -> data -> train_lib. See docs/ARCHITECTURE.md.
"""
from jaxdiff.noise import make_process
from jaxdiff.solvers import make_solver, sample
from jaxdiff.timesteps import make_grid

__version__ = "0.1.0.dev0"
__all__ = ["make_grid", "make_process", "make_solver", "sample"]
