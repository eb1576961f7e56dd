"""Reference solver for the optimized-time-steps objective: scipy's `trust-constr`, set up like the official
DM-NonUniform code (variables lambda_1 .. lambda_{N-1}; `LinearConstraint` lambda_start <= lambda_1 <= ... <=
lambda_{N-1} <= lambda_end; scipy's defaults otherwise). Used by the tests and the benchmark only.

The objective is `jaxdiff.timesteps.objective`'s own (jitted, float64); the gradient is either scipy's
2-point finite differences (as the official code) or the JAX gradient (`gradient="analytic"`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import LinearConstraint, minimize

from jaxdiff.timesteps.objective import lambda_range, objective_pair, problem, process_kind
from jaxdiff.timesteps.optimize import init_grids

__all__ = ["trust_constr"]


def trust_constr(process, solver: str = "unipc", order: int = 3, nfe: int = 10, *, p: float = 1.0,
                 init: str = "uniform_logsnr", variant: str = "official", trunc: int = 3, t_start=None, t_end=None,
                 orders=None, lower_order_final=True, gradient: str = "2-point", maxiter: int = 1000,
                 options: dict | None = None):
    """Minimize the objective with scipy `trust-constr` from one named initial grid.

    Returns a dict: grid (nfe+1,) decreasing times, lambdas (nfe+1,), objective (exact, float), init_objective,
    seconds (wall time of `minimize`), nit, nfev, message.
    """
    prob = problem(process, solver, order, nfe, p=p, variant=variant, trunc=trunc, orders=orders,
                   lower_order_final=lower_order_final, t_start=t_start, t_end=t_end)
    t_start, t_end = prob.t_start, prob.t_end
    lam0, lam1 = lambda_range(process, t_start, t_end)
    _, inits = init_grids(process, int(nfe), init, t_start, t_end)
    kind = process_kind(process)
    with jax.enable_x64(True):
        o = jnp.asarray(prob.orders, jnp.int32)
        m = jnp.asarray(prob.modes, jnp.int32)

        def full(x):
            lam = jnp.concatenate([jnp.asarray([lam0]), x, jnp.asarray([lam1])])
            return objective_pair(lam, prob.p, o, m, 0.0, kind=kind, process=process)[1]

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
