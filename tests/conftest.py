"""Test-wide setup: 8 host devices (sharding tests) and float64 (exactness tests).

Both must be set before JAX initialises its backends, so they live here, ahead of any test import.
Model code must not depend on x64 being off: NNX modules cast to their own dtypes.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
