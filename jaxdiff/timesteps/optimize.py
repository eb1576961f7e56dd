"""The optimizer of optimized time steps (Xue et al., CVPR 2024): the objective of `objective.py` minimized
inside one compiled call.

L-BFGS (a compact implementation: two-loop recursion, Armijo backtracking) runs over unconstrained z:
lambda increments h_i = L (delta + (1 - N delta) softmax(z)_i), L = lambda_end - lambda_start, so the end
points are fixed and the grid is strictly monotone by construction. The |.| terms are smoothed
(sqrt(u^2 + mu^2)) with a decreasing mu (continuation), then polished on the exact objective; the best
iterate by the *exact* objective is kept. Several initial grids are optimized in parallel (`vmap`) and the
best is returned; if the optimizer does not converge it warns and returns the best grid found.

The whole minimization is one `jax.jit` function: its shapes (NFE, number of initial grids) and the process
family (`objective.process_kind`) select the compiled program; the step orders, p, end points, iteration
limits and a pytree process are traced arguments, so a new grid of the same NFE does not recompile.

The default variant is "official": with exact gradients the paper's per-node objective is minimized by
degenerate grids whose nodes coalesce (see docs/optimized_steps.md).

Public API: `optimize`, `OptimizeInfo`, `INITS`, `init_grids`, `trace_count`.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.noise import NoiseProcess
from jaxdiff.timesteps import grids
from jaxdiff.timesteps.objective import (lambda_range, objective, objective_pair, problem, process_args,
                                         process_call, process_kind)

__all__ = ["INITS", "OptimizeInfo", "init_grids", "optimize", "trace_count"]

INITS = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")

# Smoothing levels of the continuation, relative to the mean |term| of the initial grid; 0 = exact polish.
_MU_STAGES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 0.0)
_WINDOW = 20        # iterations between progress checks
_DELTA = 1e-9          # minimum lambda step, as a fraction of the lambda span (keeps the grid strictly monotone)


# ----------------------------------------------------------------------------------------------------
# reparameterization: unconstrained z -> strictly increasing lambda grid with fixed end points
# ----------------------------------------------------------------------------------------------------

def _lam_from_z(z, lam0, lam1):
    n = z.shape[0]
    span = lam1 - lam0
    h = span * (_DELTA + (1 - n * _DELTA) * jax.nn.softmax(z))
    lam = jnp.concatenate([lam0[None], lam0 + jnp.cumsum(h)])
    return lam.at[-1].set(lam1)


def _z_from_lam(lam):
    lam = np.asarray(lam, np.float64)
    n = lam.size - 1
    frac = np.diff(lam) / (lam[-1] - lam[0])
    frac = np.maximum((frac - _DELTA) / (1 - n * _DELTA), 1e-300)
    z = np.log(frac)
    return z - z.mean()


# ----------------------------------------------------------------------------------------------------
# a compact L-BFGS (two-loop recursion, Armijo backtracking); the memory is kept newest-first so every
# index is static (no gathers), which keeps the compiled graph small
# ----------------------------------------------------------------------------------------------------

_MEMORY = 8


def _lbfgs_direction(g, S, Y, rho, count):
    """-H g by the two-loop recursion over `count` stored pairs (row 0 newest); steepest descent if none."""
    q = g
    alphas = []
    for i in range(_MEMORY):
        use = i < count
        a = jnp.where(use, rho[i] * jnp.dot(S[i], q), 0.0)
        q = q - a * Y[i]
        alphas.append(a)
    yy = jnp.dot(Y[0], Y[0])
    gn = jnp.maximum(jnp.sqrt(jnp.dot(g, g)), 1e-300)
    gamma = jnp.where(count > 0, jnp.dot(S[0], Y[0]) / jnp.where(yy > 0, yy, 1.0), 1.0 / gn)
    r = gamma * q
    for i in reversed(range(_MEMORY)):
        use = i < count
        b = rho[i] * jnp.dot(Y[i], r)
        r = jnp.where(use, r + S[i] * (alphas[i] - b), r)
    d = -r
    slope = jnp.dot(d, g)
    bad = ~(slope < 0) | ~jnp.all(jnp.isfinite(d))
    d = jnp.where(bad, -g / gn, d)
    return d, jnp.where(bad, -gn, slope), bad


def _minimize_stage(fun_pair, x0, best_x, best_f, maxiter, gtol, ftol, c1=1e-4, max_backtrack=40):
    """L-BFGS on fun_pair(x) -> (value, exact objective) from x0; tracks the best iterate by the exact value.

    Returns (x, best_x, best_f, iterations, done)."""
    fun = lambda x: fun_pair(x)[0]                                 # noqa: E731
    vg = jax.value_and_grad(fun_pair, has_aux=True)
    n = x0.shape[0]
    dt = x0.dtype

    def cond(c):
        return (c["it"] < maxiter + 1) & ~c["done"]

    def body(c):
        x, f, g, fresh = c["x"], c["f"], c["g"], c["it"] == 0
        d, slope, reset = _lbfgs_direction(g, c["S"], c["Y"], c["rho"], c["count"])

        def ls_cond(l):
            t, ft, k = l
            return (k < max_backtrack) & ~(jnp.isfinite(ft) & (ft <= f + c1 * t * slope)) & ~fresh

        def ls_body(l):
            t, _, k = l
            t = jnp.where(k == 0, 1.0, 0.5 * t)
            return t, fun(x + t * d), k + 1

        t, ft, _ = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones((), dt), jnp.asarray(jnp.inf, dt),
                                                          jnp.zeros((), jnp.int32)))
        ok = jnp.isfinite(ft) & (ft <= f + c1 * t * slope) & ~fresh
        xn = jnp.where(ok, x + t * d, x)
        (fn, fe), gnew = vg(xn)
        finite = jnp.isfinite(fn) & jnp.isfinite(fe) & jnp.all(jnp.isfinite(gnew))
        better = finite & (fe < c["bf"])
        bx = jnp.where(better, xn, c["bx"])
        bf = jnp.where(better, fe, c["bf"])
        s_ = xn - x
        y_ = gnew - g
        sy = jnp.dot(s_, y_)
        store = ok & finite & (sy > 1e-12 * jnp.sqrt(jnp.dot(s_, s_) * jnp.dot(y_, y_)))
        count = jnp.where(reset, 0, c["count"])
        S = jnp.where(store, jnp.concatenate([s_[None], c["S"][:-1]]), c["S"])
        Y = jnp.where(store, jnp.concatenate([y_[None], c["Y"][:-1]]), c["Y"])
        rho = jnp.where(store, jnp.concatenate([(1.0 / jnp.where(sy != 0, sy, 1.0))[None], c["rho"][:-1]]),
                        c["rho"])
        count = jnp.where(store, jnp.minimum(count + 1, _MEMORY), count)
        # a failed line search with an empty memory: no descent found along -g, stop
        stuck = ~fresh & ~ok & (c["count"] == 0)
        count = jnp.where(ok | fresh, count, 0)       # failed line search: drop the memory, retry along -g
        fval = jnp.where(finite, fn, f)
        it = c["it"] + 1
        check = it % _WINDOW == 0
        stalled = check & (c["ref"] - fval <= ftol * jnp.abs(fval))
        ref = jnp.where(check, fval, c["ref"])
        gn = jnp.sqrt(jnp.dot(gnew, gnew))
        done = (finite & (gn <= gtol)) | stalled | stuck | (fresh & ~finite)
        return {"x": jnp.where(finite, xn, x), "f": fval, "g": jnp.where(finite, gnew, g), "S": S, "Y": Y,
                "rho": rho, "count": count, "it": it, "bx": bx, "bf": bf, "ref": ref, "done": done}

    init = {"x": x0, "f": jnp.asarray(jnp.inf, dt), "g": jnp.zeros_like(x0), "S": jnp.zeros((_MEMORY, n), dt),
            "Y": jnp.zeros((_MEMORY, n), dt), "rho": jnp.zeros((_MEMORY,), dt), "count": jnp.zeros((), jnp.int32),
            "it": jnp.zeros((), jnp.int32), "bx": best_x, "bf": best_f, "ref": jnp.asarray(jnp.inf, dt),
            "done": jnp.zeros((), bool)}
    c = jax.lax.while_loop(cond, body, init)
    return c["x"], c["bx"], c["bf"], c["it"] - 1, c["done"]


# ----------------------------------------------------------------------------------------------------
# the optimizer: one jitted function (compiled per number of inits, N and process kind)
# ----------------------------------------------------------------------------------------------------

_TRACES = {"count": 0}


def trace_count() -> int:
    """How many times the optimizer has been traced and compiled in this process (recompilation checks)."""
    return _TRACES["count"]


def _solve_one(z0, lam0, lam1, p, orders, modes, maxiter, gtol, ftol, kind, process):
    def pair(z, mu):
        return objective_pair(_lam_from_z(z, lam0, lam1), p, orders, modes, mu, kind=kind, process=process)

    f_init = pair(z0, jnp.zeros((), z0.dtype))[1]
    ok0 = jnp.isfinite(f_init) & (f_init > 0)
    scale = jnp.where(ok0, f_init, 1.0)

    def stage(carry, mu_rel):
        z_start, best_z, best_f, all_conv, n_it = carry
        mu = mu_rel * scale / orders.shape[0]
        # the polish stage (mu = 0) restarts from the best exact iterate
        z = jnp.where(mu_rel > 0, z_start, best_z)

        def fun_pair(z):
            v, e = pair(z, mu)
            return v / scale, e
        z, best_z, best_f, it, done = _minimize_stage(fun_pair, z, best_z, best_f, maxiter, gtol, ftol)
        # intermediate smoothing stages may stop at maxiter (they only warm-start the next one);
        # convergence is judged on the last smoothed stage and the exact polish
        all_conv = all_conv & (done | (mu_rel > _MU_STAGES[-2] * 1.5))
        return (z, best_z, best_f, all_conv, n_it + it), (it, best_f, done)

    best_f0 = jnp.where(ok0, f_init, jnp.inf)
    carry = (z0, z0, best_f0, jnp.ones((), bool), jnp.zeros((), jnp.int32))
    mus = jnp.asarray(_MU_STAGES, z0.dtype)
    (_, best_z, best_f, conv, n_it), per_stage = jax.lax.scan(stage, carry, mus)
    lam = _lam_from_z(best_z, lam0, lam1)
    return lam, best_f, f_init, conv, n_it, per_stage


# XLA's backend optimization level 0 halves the compile time (about 3 s instead of 6 s on 2 CPU cores) and
# costs little run time: the compiled loop is dominated by tiny kernels and control flow.
@functools.partial(jax.jit, static_argnames=("kind", "static_process"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _solve(z0s, lam0, lam1, p, orders, modes, maxiter, gtol, ftol, process, *, kind, static_process):
    """Minimize from every initial z0 (k, N) at once; process: traced pytree or None (see `process_args`)."""
    _TRACES["count"] += 1
    process = process if static_process is None else static_process.process
    return jax.vmap(lambda z0: _solve_one(z0, lam0, lam1, p, orders, modes, maxiter, gtol, ftol, kind,
                                          process))(z0s)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptimizeInfo:
    """What `optimize(..., return_info=True)` reports besides the grid.

    objective: exact objective of the returned grid; init_objectives: of each initial grid (k,);
    final_objectives: best reached from each initial grid (k,); best_init: name (or index) of the winner;
    inits: names of the initial grids; converged: whether the winner's run stopped on its tolerances;
    iterations: L-BFGS iterations of the winner (all stages); lambdas: (N+1,) half-logSNR of the grid;
    orders: the step orders used; stages: per initial grid and continuation stage, (iterations, best exact
    objective so far, stopped-on-tolerance flag), each (k, stages).
    """
    objective: float
    init_objectives: np.ndarray
    final_objectives: np.ndarray
    best_init: Any
    inits: tuple
    converged: bool
    iterations: int
    lambdas: np.ndarray
    orders: tuple
    stages: Any = None


def init_grids(process, nfe: int, init, t_start: float, t_end: float):
    """The initial grids of `optimize(init=...)` as (names, (k, nfe+1) float64 array)."""
    if isinstance(init, str):
        names = INITS if init == "all" else (init,)
    elif isinstance(init, (tuple, list)) and all(isinstance(i, str) for i in init):
        names = tuple(init)
    else:
        arr = np.asarray(init, np.float64)
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] != nfe + 1 or arr.shape[0] < 1:
            raise ValueError(f"an explicit init must have shape ({nfe + 1},) or (k, {nfe + 1}), got {arr.shape}")
        for g in arr:
            if not np.all(np.diff(g) < 0) or not (np.isclose(g[0], t_start) and np.isclose(g[-1], t_end)):
                raise ValueError("an explicit init grid must decrease strictly from t_start to t_end")
        return tuple(range(arr.shape[0])), arr
    if not names:
        raise ValueError("init must name at least one grid")
    for nm in names:
        if nm not in INITS:
            raise ValueError(f"unknown init {nm!r}; choose from {list(INITS)}, 'all', or pass grids")
    with jax.enable_x64(True):
        arr = np.stack([np.asarray(grids.make_grid(nm, process, int(nfe), t_start=t_start, t_end=t_end),
                                   np.float64) for nm in names])
    return names, arr


def optimize(process: NoiseProcess, solver: str = "unipc", order: int = 3, nfe: int = 10, *,
             p: float = 1.0, t_start: float | None = None, t_end: float | None = None, init="all",
             variant: str = "official", trunc: int = 3, orders: Sequence[int] | None = None,
             lower_order_final: bool | str | int = True, maxiter: int = 1000, gtol: float = 1e-10,
             ftol: float = 1e-9, return_info: bool = False):
    """Optimized time grid for a multistep solver (Xue et al. 2024), computed in float64 under `jax.jit`.

    Args:
      process: noise process (its logSNR must be strictly decreasing on [t_end, t_start]).
      solver: "dpm_solver++" (multistep) or "unipc"; with `order` and `lower_order_final` it fixes the order
        of every step (`order_pattern`), unless `orders` (nfe,) overrides it.
      order: 1, 2 or 3.
      nfe: number of steps = model evaluations (the grid has nfe+1 times).
      p: error exponent, eps~_t = sigma_t^p / alpha_t: 1 for pixel-space models, 2 for latent models.
      t_start, t_end: end points (default process.t_max, process.t_min); both must lie in [t_min, t_max].
      init: "all" (uniform_t, uniform_logsnr, time_quadratic, karras, optimized together, best kept), one of
        those names, a tuple of names, or explicit grids (nfe+1,) / (k, nfe+1).
      variant: "paper" or "official" (see `objective`); trunc: the official variant's truncNum.
      maxiter: L-BFGS iterations per continuation stage; gtol: gradient tolerance (objective scaled to 1);
        ftol: a stage stops when its value fell by less than ftol (relative) over 20 iterations.
      return_info: also return an `OptimizeInfo`.
    Returns:
      grid: numpy float64 (nfe+1,), strictly decreasing, grid[0] == t_start and grid[-1] == t_end exactly;
      and the `OptimizeInfo` if `return_info`. If the optimizer did not converge it warns and returns the
      best grid it found (never NaN: at worst the best initial grid).
    Raises:
      ValueError, before any compilation, for a bad solver/order/nfe/p/variant/init, end points outside
      [t_min, t_max], or a logSNR that is not finite and strictly decreasing on the range.
    """
    prob = problem(process, solver, order, nfe, p=p, variant=variant, trunc=trunc, orders=orders,
                   lower_order_final=lower_order_final, t_start=t_start, t_end=t_end)
    if not isinstance(maxiter, (int, np.integer)) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}")
    t_start, t_end = prob.t_start, prob.t_end
    lam0, lam1 = lambda_range(process, t_start, t_end)
    names, inits = init_grids(process, int(nfe), init, t_start, t_end)
    with jax.enable_x64(True):
        lam_inits = 0.5 * process_call(process, "logsnr", inits)
        lam_inits[:, 0], lam_inits[:, -1] = lam0, lam1
        if not (np.all(np.isfinite(lam_inits)) and np.all(np.diff(lam_inits, axis=1) > 0)):
            raise ValueError("an initial grid has non-finite or non-increasing logSNR")
        z0 = np.stack([_z_from_lam(li) for li in lam_inits])
        kind = process_kind(process)
        traced, static = process_args(process, kind)
        f64 = functools.partial(jnp.asarray, dtype=jnp.float64)
        lam, best_f, f_init, conv, n_it, per_stage = jax.device_get(_solve(
            f64(z0), f64(lam0), f64(lam1), f64(prob.p), jnp.asarray(prob.orders, jnp.int32),
            jnp.asarray(prob.modes, jnp.int32), jnp.asarray(maxiter, jnp.int32), f64(gtol), f64(ftol), traced,
            kind=kind, static_process=static))
        best_f = np.asarray(best_f, np.float64)
        f_init = np.asarray(f_init, np.float64)
        finite = np.isfinite(best_f)
        if finite.any():
            i = int(np.argmin(np.where(finite, best_f, np.inf)))
            lam_best = np.asarray(lam[i], np.float64)
            converged = bool(conv[i])
        else:   # nothing finite anywhere: fall back to the first initial grid
            i = 0
            lam_best = lam_inits[0]
            converged = False
        if not np.all(np.isfinite(lam_best)) or not np.all(np.diff(lam_best) > 0):
            lam_best, converged = lam_inits[i], False
        t = process_call(process, "t_from_logsnr", 2 * lam_best)
    t[0], t[-1] = t_start, t_end
    if not (np.all(np.isfinite(t)) and np.all(np.diff(t) < 0)):
        # the lambda -> t map lost strictness (too close nodes); fall back to the best initial grid
        j = int(np.argmin(np.where(np.isfinite(f_init), f_init, np.inf)))
        t, lam_best, converged = inits[j].copy(), lam_inits[j], False
        t[0], t[-1] = t_start, t_end
    if not converged:
        warnings.warn(f"optimized time steps ({solver}, order {order}, nfe {nfe}) did not converge "
                      f"within maxiter={maxiter} per stage; returning the best grid found "
                      f"(objective {best_f[i]:.6g}, initial {f_init[i]:.6g})", RuntimeWarning, stacklevel=2)
    if not return_info:
        return t
    obj = objective(process, t, orders=prob.orders, p=prob.p, variant=variant, trunc=prob.trunc)
    info = OptimizeInfo(objective=obj, init_objectives=f_init, final_objectives=best_f, stages=per_stage,
                        best_init=names[i], inits=tuple(names), converged=converged,
                        iterations=int(n_it[i]), lambdas=np.asarray(lam_best), orders=prob.orders)
    return t, info
