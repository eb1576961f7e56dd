"""Hand-made time grids for any noise process, and the rules solvers and the grid optimizer share about a
grid: `check_grid` (a valid grid) and `order_schedule` (the order of each step of a multistep solver).

A grid is a strictly decreasing float array of times `t_0 = t_start > t_1 > ... > t_N`, one more point
than solver steps. Two ways to end it (`final`):

  * "t_min": N+1 points spaced by the rule from t_start to t_end (t_end defaults to process.t_min);
  * "zero":  N points spaced from t_start to t_end, then `process.t_zero` (sigma = 0) appended, as in
             EDM's sampler and diffusers' `final_sigmas_type="zero"`.

Grids are ordinary arrays: a solver takes them as traced arguments, so a new grid of the same length
never recompiles.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdiff.noise import NoiseProcess, VPDiscrete

__all__ = ["GRIDS", "FINALS", "make_grid", "uniform_t", "uniform_logsnr", "time_quadratic", "karras",
           "check_grid", "order_schedule", "LOWER_FINAL_BELOW", "diffusers_indices", "grid_from_indices"]

FINALS = ("t_min", "zero")


def _endpoints(process: NoiseProcess, t_start, t_end):
    t_start = process.t_max if t_start is None else float(t_start)
    t_end = process.t_min if t_end is None else float(t_end)
    lo = process.t_zero
    if not (process.t_max * (1 + 1e-12) >= t_start > t_end > lo):
        raise ValueError(f"need t_max >= t_start > t_end > t_zero for {type(process).__name__}: "
                         f"got t_start={t_start}, t_end={t_end} (t_max={process.t_max}, t_zero={lo})")
    return t_start, t_end


def _points(process, steps, final):
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if final not in FINALS:
        raise ValueError(f"unknown final point {final!r}; choose one of {list(FINALS)}")
    return steps + 1 if final == "t_min" else steps


def _finish(process, ts, t_start, t_end, final):
    dtype = jnp.result_type(float)
    ts = jnp.asarray(ts, dtype)
    ts = ts.at[0].set(t_start).at[-1].set(t_end)       # exact end points despite the logSNR round trip
    if final == "zero":
        ts = jnp.concatenate([ts, jnp.full((1,), process.t_zero, dtype)])
    return ts


def uniform_t(process: NoiseProcess, steps: int, *, t_start=None, t_end=None, final="t_min"):
    """Equally spaced in t. Returns (steps+1,)."""
    n = _points(process, steps, final)
    t0, t1 = _endpoints(process, t_start, t_end)
    return _finish(process, jnp.linspace(t0, t1, n), t0, t1, final)


def uniform_logsnr(process: NoiseProcess, steps: int, *, t_start=None, t_end=None, final="t_min"):
    """Equally spaced in logSNR (DPM-Solver's 'logSNR'; diffusers' `use_lu_lambdas`). Returns (steps+1,)."""
    n = _points(process, steps, final)
    t0, t1 = _endpoints(process, t_start, t_end)
    l0, l1 = process.logsnr(t0), process.logsnr(t1)
    if not (jnp.isfinite(l0) and jnp.isfinite(l1)):
        raise ValueError(f"logSNR is not finite at t_start={t0} or t_end={t1}; choose interior end points")
    return _finish(process, process.t_from_logsnr(jnp.linspace(l0, l1, n)), t0, t1, final)


def time_quadratic(process: NoiseProcess, steps: int, *, t_start=None, t_end=None, final="t_min"):
    """Equally spaced in sqrt(t) (DPM-Solver's 'time_quadratic'). Returns (steps+1,)."""
    n = _points(process, steps, final)
    t0, t1 = _endpoints(process, t_start, t_end)
    if t1 < 0:
        raise ValueError("time_quadratic needs t_end >= 0")
    return _finish(process, jnp.linspace(math.sqrt(t0), math.sqrt(t1), n) ** 2, t0, t1, final)


def karras(process: NoiseProcess, steps: int, *, t_start=None, t_end=None, final="t_min", rho: float = 7.0):
    """Karras et al. (2022) eq. 5: equally spaced in sigma_hat^(1/rho), sigma_hat = sigma/alpha = exp(-logsnr/2).

    With final="zero" this is EDM's grid exactly (steps points, then sigma = 0). Returns (steps+1,).
    """
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    n = _points(process, steps, final)
    t0, t1 = _endpoints(process, t_start, t_end)
    s_max = jnp.exp(-0.5 * process.logsnr(t0)) ** (1 / rho)
    s_min = jnp.exp(-0.5 * process.logsnr(t1)) ** (1 / rho)
    sig = jnp.linspace(s_max, s_min, n) ** rho
    return _finish(process, process.t_from_logsnr(-2 * jnp.log(sig)), t0, t1, final)


GRIDS = {"uniform_t": uniform_t, "uniform_logsnr": uniform_logsnr, "time_quadratic": time_quadratic,
         "karras": karras}


def make_grid(name: str, process: NoiseProcess, steps: int, **kwargs):
    """A grid by name: one of GRIDS ('uniform_t', 'uniform_logsnr', 'time_quadratic', 'karras').

    kwargs: t_start, t_end, final ('t_min' | 'zero'), and rho for 'karras'. Returns (steps+1,).
    """
    if name not in GRIDS:
        raise ValueError(f"unknown time grid {name!r}; choose one of {sorted(GRIDS)} "
                         "(or pass an explicit array of times)")
    return GRIDS[name](process, steps, **kwargs)


def check_grid(process: NoiseProcess, grid) -> None:
    """Raise ValueError unless a concrete grid is 1-D, has >= 2 points, decreases strictly, and lies in
    [t_zero, t_max]. Traced grids are not checked (check them before `jit`)."""
    try:
        g = np.asarray(grid, np.float64)
    except Exception:   # a tracer: nothing to check here
        return
    if g.ndim != 1 or g.size < 2:
        raise ValueError(f"a time grid must be 1-D with at least 2 points, got shape {g.shape}")
    if not np.all(np.diff(g) < 0):
        bad = int(np.argmax(~(np.diff(g) < 0)))
        raise ValueError(f"a time grid must decrease strictly; grid[{bad}]={g[bad]} <= grid[{bad + 1}]={g[bad + 1]}")
    if g[0] > process.t_max * (1 + 1e-12) or g[-1] < process.t_zero:
        raise ValueError(f"time grid [{g[0]}, {g[-1]}] leaves the range [{process.t_zero}, {process.t_max}] "
                         f"of {type(process).__name__}")


# The default `lower_final_below` of jaxdiff's multistep solvers (DPMSolverMultistep): None, the last orders
# are always lowered, as UniPC does (the official DPM-Solver code uses 10, diffusers 15).
LOWER_FINAL_BELOW: int | None = None


def order_schedule(steps: int, order: int, *, lower_order_final: bool = True,
                   lower_final_below: int | None = LOWER_FINAL_BELOW) -> tuple[int, ...]:
    """Per-step orders of a multistep solver: warm-up 1, 2, .., order; with `lower_order_final`, step k
    (1-based) of the last ones uses min(order, steps + 1 - k), applied only when steps < lower_final_below
    (DPM-Solver's official code: 10; diffusers' DPM: 15; UniPC: always, None)."""
    orders = []
    lower = lower_order_final and (lower_final_below is None or steps < lower_final_below)
    for k in range(1, steps + 1):
        o = min(order, k)
        if lower:
            o = min(o, steps + 1 - k)
        orders.append(o)
    return tuple(orders)


# ----------------------------------------------------------------------------------------------------
# diffusers' integer spacings (to reproduce diffusers schedulers on discrete models)
# ----------------------------------------------------------------------------------------------------

def diffusers_indices(steps: int, spacing: str, *, num_train_steps: int = 1000, steps_offset: int = 0,
                      style: str = "multistep") -> np.ndarray:
    """Integer training indices of diffusers' `timestep_spacing` (Lin et al. 2023, Table 2). Returns (steps,).

    style "ddim": DDIMScheduler/DDPMScheduler, "multistep": DPMSolver(Multistep|Singlestep)/UniPC/Euler/Heun
    ("linspace" differs: DDIM spaces `steps` points over [0, N-1]; the others space steps+1 and drop 0).
    """
    n = num_train_steps
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an integer in [1, {n}], got {steps!r}")
    if style not in ("ddim", "multistep"):
        raise ValueError(f"unknown style {style!r}; choose 'ddim' or 'multistep'")
    if spacing == "linspace":
        if style == "ddim":
            idx = np.linspace(0, n - 1, steps).round()[::-1]
        else:
            idx = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        if style == "ddim":
            idx = (np.arange(steps) * (n // steps)).round()[::-1] + steps_offset
        else:
            idx = (np.arange(steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        idx = np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose 'linspace', 'leading' or 'trailing'")
    return idx.astype(np.int64)


def grid_from_indices(process: VPDiscrete, indices, *, final: str = "zero"):
    """Times of integer training indices on a VPDiscrete (index n -> t = (n+1)/N), then the final point:
    "zero" appends t_zero (abar = 1, sigma = 0), "t_min" appends index 0's time (diffusers' "sigma_min" /
    `set_alpha_to_one=False`). Returns (len(indices)+1,)."""
    if not isinstance(process, VPDiscrete):
        raise ValueError("integer timesteps need a discrete VP process (VPDiscrete)")
    if final not in FINALS:
        raise ValueError(f"unknown final point {final!r}; choose one of {list(FINALS)}")
    n = process.log_alphas.shape[0]
    idx = np.asarray(indices, np.float64)
    end = process.t_zero if final == "zero" else 1.0 / n
    return jnp.asarray(np.concatenate([(idx + 1) / n, [end]]), jnp.result_type(float))
