"""jaxdiff: diffusion models in JAX.

Layers (each imports only those before it): noise -> predictions -> losses -> timesteps -> solvers
-> analytic; then nn (Flax NNX) -> convert -> data -> train_lib. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0.dev0"
