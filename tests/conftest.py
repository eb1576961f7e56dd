"""Test-wide setup: 8 host devices (sharding tests), float64 (exactness tests), a compilation cache.

All must be set before JAX initialises its backends, so they live here, ahead of any test import.
Model code must not depend on x64 being off: NNX modules cast to their own dtypes.
"""
import os
import tempfile

# --xla_backend_optimization_level=0: LLVM's optimisations off -- the suite compiles hundreds of small programs
# and runs each a few times, so compile time dominates (about 15% less wall time measured on the parity and
# sharded-training tests); the numbers a test compares are computed under the same flags on both sides.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's processes (xdist workers and the train.py
# subprocesses inherit it): the same tiny train step compiles once instead of in every process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxdiff-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402


# --- scheduling under xdist (`make test` = pytest -n 2) ----------------------------------------------
# The suite's cost is a few long tests (training runs, compilations) among ~500 short ones. Plain
# `--dist load` hands out consecutive chunks of the collection, so whatever is collected last runs last
# (a 4-minute test ended the run alone) and a module's tests can land on both workers, each paying the
# module's fixtures. With -n, the default here is `--dist loadgroup` in collection order: the long tests
# are collected first (so they start first and the short ones fill in around them), the modules whose
# tests share an expensive module-scoped fixture are one group each (one worker, fixture built once),
# and the other tests are scheduled one by one. An explicit --dist on the command line wins.

# Collected first, in this order (a file name, or file::test): the longest single tests and fixtures.
RUN_FIRST = (
    "test_train.py::test_sigterm_then_sigkill_resume_is_bitwise_exact",
    "test_train.py::test_sharded_training_matches_one_device",
    "test_train.py::test_bfloat16_dropout_and_accumulation_train",
    "test_latent.py",
    "test_sample.py",
    "test_distrifusion.py",
    "test_learned_grid.py",
    "test_cascade.py",
    "test_autoencoder_training.py",
    "test_solvers.py::test_other_processes_converge",
    "test_train_autoencoder.py",
    "test_train.py",
    "test_evaluate.py",
    "test_nn_unet.py::test_remat_gives_same_output_and_gradients",
    "test_solvers.py",
    "test_convert_unet_parity.py",
    "test_inception.py",
    "test_lpips.py",
)
# Modules whose tests are scheduled one by one: no expensive module-scoped fixture to share (test_train's
# data_dir is session-scoped). Every other module is one xdist group.
SPLIT = {"test_train.py", "test_solvers.py", "test_solver_parity_diffusers.py", "test_train_autoencoder.py",
         "test_nn_unet.py", "test_convert_unet_parity.py", "test_predictions.py", "test_noise.py",
         "test_metrics.py", "test_configs.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "no":
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False


def _priority(item):
    module = os.path.basename(str(item.path))
    for i, key in enumerate(RUN_FIRST):
        name, _, test = key.partition("::")
        if name == module and (not test or item.originalname == test):
            return i
    return len(RUN_FIRST)


@pytest.hookimpl(tryfirst=True)   # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    items.sort(key=_priority)    # stable: the rest keep pytest's order, a module's tests stay together
    for item in items:
        module = os.path.basename(str(item.path))
        if module not in SPLIT:
            item.add_marker(pytest.mark.xdist_group(module))
