"""Reference solver for the optimized-time-steps objective: scipy's `trust-constr`, set up like the official
DM-NonUniform code (variables lambda_1 .. lambda_{N-1}; `LinearConstraint` lambda_start <= lambda_1 <= ... <=
lambda_{N-1} <= lambda_end; scipy's defaults otherwise). Used by the tests and the benchmark only.

The objective is `jaxdiff.timesteps.objective`'s own (jitted, float64); the gradient is either scipy's
2-point finite differences (as the official code) or the JAX gradient (`gradient="analytic"`).
"""
from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import LinearConstraint, minimize

# the modules (the package re-exports functions of the same names)
_obj = importlib.import_module("jaxdiff.timesteps.objective")
_opt = importlib.import_module("jaxdiff.timesteps.optimize")

__all__ = ["trust_constr"]


def trust_constr(process, solver: str = "unipc", order: int = 3, nfe: int = 10, *, p: float = 1.0,
                 init: str = "uniform_logsnr", variant: str = "official", trunc: int = 3, t_start=None, t_end=None,
                 orders=None, lower_order_final=True, gradient: str = "2-point", maxiter: int = 1000,
                 options: dict | None = None):
    """Minimize the objective with scipy `trust-constr` from one named initial grid.

    Returns a dict: grid (nfe+1,) decreasing times, lambdas (nfe+1,), objective (exact, float), init_objective,
    seconds (wall time of `minimize`), nit, nfev, message.
    """
    pattern = _obj._resolve_pattern(solver, order, nfe, orders, lower_order_final)
    p = _obj._check_p(p)
    trunc = _obj._check_variant(variant, trunc)
    t_start, t_end = _obj._endpoints(process, t_start, t_end)
    lam0, lam1 = _obj._lambda_range(process, t_start, t_end)
    _, inits = _opt._init_grids(process, int(nfe), init, t_start, t_end)
    kind = _obj._kind(process)
    modes = _obj._modes(pattern, variant, trunc)
    with jax.enable_x64(True):
        o = jnp.asarray(pattern, jnp.int32)
        m = jnp.asarray(modes, jnp.int32)

        def full(x):
            lam = jnp.concatenate([jnp.asarray([lam0]), x, jnp.asarray([lam1])])
            la, ls = _obj._log_alpha_sigma(kind, process, lam)
            return _obj._objective_lam(lam, p * ls - la, o, m, 0.0)

        f = jax.jit(full)
        g = jax.jit(jax.grad(full))

        def fun(x):
            return float(f(jnp.asarray(x)))

        def jac(x):
            return np.asarray(g(jnp.asarray(x)), np.float64)

        lam_init = 0.5 * np.asarray(process.logsnr(jnp.asarray(inits[0], jnp.float64)), np.float64)
        x0 = lam_init[1:-1].copy()
        n = int(nfe)
        a = np.zeros((n, n - 1))
        for i in range(n - 1):
            a[i, i] = 1.0
            a[i + 1, i] = -1.0
        lb = np.zeros(n)
        lb[0], lb[-1] = lam0, -lam1
        lc = LinearConstraint(a, lb, np.full(n, np.inf))
        fun(x0), jac(x0)     # compile outside the timed region
        opts = {"maxiter": maxiter}
        opts.update(options or {})
        t0 = time.perf_counter()
        res = minimize(fun, x0, method="trust-constr", jac=jac if gradient == "analytic" else "2-point",
                       constraints=[lc], options=opts)
        secs = time.perf_counter() - t0
        lam = np.concatenate([[lam0], res.x, [lam1]])
        # the interior-point iterates may touch the constraints; keep the grid usable by sorting ties
        t = np.array(process.t_from_logsnr(jnp.asarray(2 * lam, jnp.float64)), np.float64)
        t[0], t[-1] = t_start, t_end
    return {"grid": t, "lambdas": lam, "objective": fun(res.x), "init_objective": fun(x0), "seconds": secs,
            "nit": int(res.nit), "nfev": int(res.nfev), "message": str(res.message)}
