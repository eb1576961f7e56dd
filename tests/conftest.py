"""Test-wide setup: 8 host devices (sharding tests), float64 (exactness tests), a compilation cache.

All must be set before JAX initialises its backends, so they live here, ahead of any test import.
Model code must not depend on x64 being off: NNX modules cast to their own dtypes.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's processes (xdist workers and the train.py
# subprocesses inherit it): the same tiny train step compiles once instead of in every process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxdiff-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
