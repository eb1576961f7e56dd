"""The shipped cache of optimized time steps (jaxdiff/timesteps/optimized_grids.json): it covers the common
cases, and the optimizer recomputes its grids."""
import functools

import numpy as np
import pytest

from jaxdiff.noise import make_process
from jaxdiff.timesteps import grids
from jaxdiff.timesteps.cache import cache_key, load_cache, optimized_grid
from jaxdiff.timesteps.objective import objective


@pytest.mark.parametrize("name", ["vp_linear", "vp_continuous_linear", "edm"])
def test_shipped_cache_covers_common_cases(name):
    proc = make_process(name)
    entries = load_cache()
    for solver in ("dpm_solver++", "unipc"):
        for order in (2, 3):
            for nfe in range(5, 16):
                for p in (1.0, 2.0):
                    assert cache_key(proc, solver, order, nfe, p=p) in entries, (solver, order, nfe, p)
                    if solver == "dpm_solver++":   # the default is jaxdiff's rule (always) ...
                        assert cache_key(proc, solver, order, nfe, p=p) == cache_key(
                            proc, solver, order, nfe, p=p, lower_order_final="always")
                        # ... and diffusers' (below 15) and the official code's (below 10) rules are shipped too
                        assert cache_key(proc, solver, order, nfe, p=p, lower_order_final=15) in entries
                        assert cache_key(proc, solver, order, nfe, p=p, lower_order_final=10) in entries
    g = optimized_grid(proc, "unipc", 3, 8, p=1.0, optimize_on_miss=False)
    assert g.shape == (9,) and np.all(np.diff(g) < 0) and g[0] == proc.t_max and g[-1] == proc.t_min
    e = objective(proc, g, solver="unipc", order=3, p=1.0)
    for init in grids.GRIDS:
        assert e <= objective(proc, grids.make_grid(init, proc, 8), solver="unipc", order=3, p=1.0)


_REPRODUCED = [(name, solver, order, p) for solver, order, p in [("unipc", 3, 1.0), ("dpm_solver++", 2, 2.0)]
               for name in ["vp_linear", "vp_continuous_linear", "edm"]]


@functools.lru_cache(maxsize=None)      # once per process (a module fixture was set up twice under xdist)
def recomputed_grids():
    """The optimizer's grids for ``_REPRODUCED``, computed in a fresh process with x64 and the default XLA
    flags -- how a user (and benchmarks/optimized_steps.py --write-cache) runs it. The test session's own
    flags (LLVM optimisation off, tests/conftest.py) change floating-point contraction, which moves these
    L-BFGS solutions by ~1e-10, beyond the 1e-11 the shipped cache is held to."""
    import json
    import os
    import subprocess
    import sys
    code = (
        "import json, sys, jax; jax.config.update('jax_enable_x64', True)\n"
        "from jaxdiff.noise import make_process\nfrom jaxdiff.timesteps.optimize import optimize\n"
        "out = []\n"
        "for name, solver, order, p in json.loads(sys.argv[1]):\n"
        "    g, info = optimize(make_process(name), solver, order, 6, p=p, return_info=True)\n"
        "    out.append({'grid': [float(x) for x in g], 'objective': float(info.objective)})\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(_REPRODUCED)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(zip(_REPRODUCED, json.loads(r.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case", _REPRODUCED, ids=["-".join(map(str, c)) for c in _REPRODUCED])
def test_shipped_cache_is_reproduced(case):
    # the optimizer recomputes the shipped grids (written by benchmarks/optimized_steps.py --write-cache with
    # x64 enabled, as here: vp_linear built in float32 keys the same but lands ~1e-7 away)
    name, solver, order, p = case
    entry = load_cache()[cache_key(make_process(name), solver, order, 6, p=p)]
    got = recomputed_grids()[case]
    np.testing.assert_allclose(got["objective"], entry["objective"], rtol=1e-12)
    np.testing.assert_allclose(got["grid"], entry["grid"], rtol=1e-11)
