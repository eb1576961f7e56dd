"""The objective of optimized time steps (Xue et al., "Accelerating Diffusion Sampling with Optimized Time
Steps", CVPR 2024): the order pattern of a multistep solver and the error bound E of a time grid.

A multistep data-prediction solver (DPM-Solver++ multistep, UniPC's predictor) integrates

    x_end / sigma_end = x_start / sigma_start + int_{lambda_start}^{lambda_end} e^lambda x_theta(lambda) d lambda

(lambda = logsnr / 2, the half-logSNR) by replacing x_theta on step s, [lambda_s, lambda_{s+1}], with the
Lagrange polynomial through its k_s most recent nodes lambda_{s-k_s+1} .. lambda_s. Step s thus puts the
weight

    w_{s,j} = int_{lambda_s}^{lambda_{s+1}} e^lambda l_{s,j}(lambda) d lambda

on node j. If the model's data prediction at node i is off by at most eps~_i = sigma_i^p / alpha_i, the
final error is bounded by sigma_end times

    E(lambda_1 .. lambda_{N-1}) = sum_i eps~_i |sum_{s,j -> i} w_{s,j}|                        ("paper")

which the paper minimizes over the interior nodes with the end points fixed. The official code
(scxue/DM-NonUniform `step_optim.py`) minimizes a variant ("official"): every order-1 step is its own
|.| term, and the first `trunc` steps (3 there) add the root-sum-square of their weighted terms instead of
accumulating them per node.

Here the objective is written in JAX (float64, autodiff gradients; the |.| terms optionally smoothed to
sqrt(u^2 + mu^2) for the optimizer's continuation). The step orders are those the jaxdiff solvers run:
`order_pattern` computes them with `grids.order_schedule`, the rule the multistep solvers themselves run.

Public API: `order_pattern`, `objective`; and, shared with the optimizer (`optimize.py`), the cache
(`cache.py`) and the scipy reference: `problem` (the validated arguments of one optimization: step orders,
objective modes, p, end points), `lambda_range`, `process_kind`, `process_call`, `process_args` and
`objective_pair` (the jittable objective of a half-logSNR grid, smoothed and exact).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.noise import EDM, VE, Flow, NoiseProcess, VPCosine, VPDiscrete, VPLinear
from jaxdiff.timesteps.grids import LOWER_FINAL_BELOW, order_schedule

__all__ = ["SOLVERS", "VARIANTS", "Problem", "problem", "order_pattern", "objective", "lambda_range",
           "process_kind", "process_call", "process_args", "StaticProcess", "objective_pair"]

SOLVERS = ("dpm_solver++", "unipc")
VARIANTS = ("paper", "official")

# step modes of the objective
_ACCUMULATE, _SEPARATE, _RSS = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# order pattern
# ----------------------------------------------------------------------------------------------------

def order_pattern(solver: str, order: int, steps: int, *,
                  lower_order_final: bool | str | int = True) -> tuple[int, ...]:
    """Order used by each step of a multistep solver, as the jaxdiff solvers run it.

    Step k (1-based) first warms up with order min(k, order) (only k-1 earlier model outputs exist).
    With lower-order-final, the order is further capped by steps + 1 - k (last step first order, the one
    before at most second order). `jaxdiff.solvers.DPMSolverMultistep` applies that only when
    steps < its `lower_final_below` (default None: always, like UniPC; diffusers uses 15 and the official code 10; the
    official code's own test is steps < 10: pass `lower_order_final=10` for it); UniPC always. The default,
    `lower_order_final=True`, follows the jaxdiff solvers' defaults: the threshold is `grids.LOWER_FINAL_BELOW`
    (DPMSolverMultistep's default) and the pattern is computed by `grids.order_schedule`, as the solvers do.

    Args:
      solver: "dpm_solver++" or "unipc".
      order: 1, 2 or 3.
      steps: number of steps (= NFE of these solvers).
      lower_order_final: True (the jaxdiff solver's default rule), False (never lower), "always", or an
        integer n: lower only when steps < n (pass `solver.lower_final_below` to match a DPMSolverMultistep
        built with another threshold).
    Returns:
      tuple of `steps` ints in 1..order.
    """
    _check_solver_order(solver, order)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(lower_order_final, bool):
        lower, below = lower_order_final, (LOWER_FINAL_BELOW if solver == "dpm_solver++" else None)
    elif isinstance(lower_order_final, str) and lower_order_final == "always":
        lower, below = True, None
    elif isinstance(lower_order_final, (int, np.integer)) and lower_order_final >= 1:
        lower, below = True, int(lower_order_final)
    else:
        raise ValueError(f"lower_order_final must be True, False, 'always' or a positive integer, "
                         f"got {lower_order_final!r}")
    return order_schedule(int(steps), int(order), lower_order_final=lower, lower_final_below=below)


def _check_solver_order(solver, order):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; the optimized grid supports {list(SOLVERS)}")
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")


def _check_orders(orders, steps):
    o = np.asarray(orders)
    if o.shape != (steps,) or not np.issubdtype(o.dtype, np.integer):
        raise ValueError(f"orders must be {steps} integers (one per step), got {orders!r}")
    for s, k in enumerate(o.tolist()):
        if not 1 <= k <= 3:
            raise ValueError(f"orders[{s}] = {k}: orders must lie in 1..3")
        if k > s + 1:
            raise ValueError(f"orders[{s}] = {k}: step {s + 1} has only {s + 1} model outputs to interpolate")
    return tuple(int(k) for k in o)


def _modes(orders, variant, trunc):
    if variant == "paper":
        return tuple(_ACCUMULATE for _ in orders)
    return tuple(_SEPARATE if k == 1 else (_RSS if s < trunc else _ACCUMULATE) for s, k in enumerate(orders))


# ----------------------------------------------------------------------------------------------------
# process -> log alpha, log sigma as functions of lambda
# ----------------------------------------------------------------------------------------------------

def process_kind(process) -> str:
    """"vp", "unit_alpha" or "flow" (families whose alpha, sigma are closed forms of lambda), else "generic"."""
    if isinstance(process, (VPDiscrete, VPLinear, VPCosine)):
        return "vp"
    if isinstance(process, (EDM, VE)):
        return "unit_alpha"
    if isinstance(process, Flow):
        return "flow"
    return "generic"


def _log_alpha_sigma(kind, process, lam):
    """(log alpha, log sigma) at half-logSNR lam; closed forms where the family fixes them."""
    if kind == "vp":          # alpha^2 + sigma^2 = 1
        return -0.5 * jax.nn.softplus(-2 * lam), -0.5 * jax.nn.softplus(2 * lam)
    if kind == "unit_alpha":  # alpha = 1, sigma = e^-lambda
        return jnp.zeros_like(lam), -lam
    if kind == "flow":        # alpha = 1 - t, sigma = t, t = sigmoid(-lambda)
        return jax.nn.log_sigmoid(lam), jax.nn.log_sigmoid(-lam)
    t = process.t_from_logsnr(2 * lam)
    return process.log_alpha(t), process.log_sigma(t)


def _is_pytree(process) -> bool:
    leaves = jax.tree_util.tree_leaves(process)
    return not (len(leaves) == 1 and leaves[0] is process)


class StaticProcess:
    """A plain (non-pytree) process as a static `jit` argument: hashed and compared by identity."""
    __slots__ = ("process",)

    def __init__(self, process):
        self.process = process

    def __hash__(self):
        return id(self.process)

    def __eq__(self, other):
        return isinstance(other, StaticProcess) and other.process is self.process


def process_args(process, kind: str):
    """How `process` enters a compiled function: `(traced, static)`, at most one not None.

    Closed-form kinds need no process (so every VP process shares one compiled program); a "generic" process
    that is a registered pytree is traced (float leaves in float64: a new instance of the same structure does
    not recompile); any other object is a `StaticProcess` (a static argument, compared by identity) whose
    `.process` the compiled function uses.
    """
    if kind != "generic":
        return None, None
    if _is_pytree(process):
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64)
                                      if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, process), None
    return None, StaticProcess(process)


@functools.partial(jax.jit, static_argnames="name")
def _pcall_jit(process, x, name):
    return getattr(process, name)(x)


def process_call(process, name: str, x) -> np.ndarray:
    """`process.<name>(x)` as float64 numpy, compiled once per process structure (eager for plain classes)."""
    with jax.enable_x64(True):
        x = jnp.asarray(x, jnp.float64)
        out = _pcall_jit(process, x, name) if _is_pytree(process) else getattr(process, name)(x)
        return np.array(out, np.float64)


# ----------------------------------------------------------------------------------------------------
# the objective (jittable core)
# ----------------------------------------------------------------------------------------------------

def _sabs(u, mu):
    """|u| smoothed to sqrt(u^2 + mu^2) for mu > 0; exact |u| (with a NaN-free gradient) for mu = 0."""
    s = jnp.sqrt(u * u + jnp.where(mu > 0, mu * mu, 1.0))
    return jnp.where(mu > 0, s, jnp.abs(u))


def _step_terms(lam, logd, orders):
    """Weighted Lagrange weights u[s, m] = eps~_{s-m} w_{s, s-m} of every step s on node s-m (m = 0, 1, 2).

    lam (N+1,) increasing, logd (N+1,) = log eps~, orders (N,) ints. Returns (N, 3); entries with m >= order
    are 0.
    """
    n = lam.shape[0] - 1
    dt = lam.dtype
    lam_pad = jnp.concatenate([lam[:1] - 2.0, lam[:1] - 1.0, lam])    # dummy nodes: no 0/0 in unused terms
    ls, lp1, lp2 = lam_pad[2:n + 2], lam_pad[1:n + 1], lam_pad[0:n]
    h = lam[1:] - lam[:-1]
    g1 = ls - lp1                # lambda_s - lambda_{s-1}
    g2 = lp1 - lp2               # lambda_{s-1} - lambda_{s-2}
    eh = jnp.exp(h)
    h0 = jnp.expm1(h)            # int_0^h e^u du
    h1 = h * eh - h0             # int_0^h e^u u du
    h2 = h * h * eh - 2 * h1     # int_0^h e^u u^2 du
    zero = jnp.zeros_like(h)
    w1 = jnp.stack([h0, zero, zero], -1)
    w2 = jnp.stack([(h1 + g1 * h0) / g1, -h1 / g1, zero], -1)
    w3 = jnp.stack([(h2 + (2 * g1 + g2) * h1 + g1 * (g1 + g2) * h0) / (g1 * (g1 + g2)),
                    -(h2 + (g1 + g2) * h1) / (g1 * g2),
                    (h2 + g1 * h1) / (g2 * (g1 + g2))], -1)
    o = orders[:, None]
    w = jnp.where(o == 1, w1, jnp.where(o == 2, w2, w3))
    m = jnp.arange(3)
    valid = m[None, :] < o
    # log eps~ of node s - m, by static shifts (no gathers); invalid (s < m) entries are masked below
    logd_pad = jnp.concatenate([logd[:1], logd[:1], logd[:n]])
    logd_node = jnp.stack([logd_pad[2:n + 2], logd_pad[1:n + 1], logd_pad[0:n]], -1)
    logscale = ls[:, None] + logd_node                   # e^{lambda_s} eps~_node
    return jnp.where(valid, jnp.exp(jnp.where(valid, logscale, 0.0)) * w, 0.0).astype(dt)


def _pair_from_log_eps(lam, logd, orders, modes, mu):
    """(objective smoothed by mu, exact objective) of an increasing lambda grid (N+1,) with log eps~ logd."""
    u = _step_terms(lam, logd, orders)
    n = u.shape[0]
    acc = jnp.where((modes == _ACCUMULATE)[:, None], u, 0.0)
    zero = jnp.zeros((2,), u.dtype)
    # per-node sums c_i = sum_m u[i + m, m]
    c = acc[:, 0] + jnp.concatenate([acc[1:, 1], zero[:1]]) + jnp.concatenate([acc[2:, 2], zero])[:n]
    sep = (modes == _SEPARATE)[:, None] & (u != 0)
    ss = jnp.sum(u * u, axis=1)
    is_rss = modes == _RSS

    def total(mu):
        t = jnp.sum(_sabs(c, mu)) + jnp.sum(jnp.where(sep, _sabs(u, mu), 0.0))
        rss = jnp.sqrt(ss + jnp.where(mu > 0, mu * mu, jnp.where(ss > 0, 0.0, 1.0)))
        return t + jnp.sum(jnp.where(is_rss, rss, 0.0))

    return total(mu), total(jnp.zeros_like(mu))


def objective_pair(lam, p, orders, modes, mu, *, kind: str, process=None):
    """(objective smoothed by mu, exact objective) of an increasing half-logSNR grid `lam` (N+1,); jittable.

    p: the error exponent; orders, modes: `Problem.orders` / `Problem.modes` as int arrays; mu: the smoothing
    (0: both values exact); kind: `process_kind(process)`; process: needed only for kind "generic".
    """
    la, ls = _log_alpha_sigma(kind, process, lam)
    return _pair_from_log_eps(lam, p * ls - la, orders, modes, jnp.asarray(mu, lam.dtype))


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

def _endpoints(process, t_start, t_end):
    if not isinstance(process, NoiseProcess):
        raise ValueError(f"process must be a jaxdiff NoiseProcess, got {type(process).__name__}")
    t_start = float(process.t_max) if t_start is None else float(t_start)
    t_end = float(process.t_min) if t_end is None else float(t_end)
    lo, hi = float(process.t_min), float(process.t_max)
    tol = 1e-12 * max(abs(hi), 1.0)
    for name, t in (("t_start", t_start), ("t_end", t_end)):
        if not math.isfinite(t) or t < lo - tol or t > hi + tol:
            raise ValueError(f"{name}={t} is outside the range [t_min, t_max] = [{lo}, {hi}] of "
                             f"{type(process).__name__}; the optimized grid needs finite logSNR at both ends")
    if not t_start > t_end:
        raise ValueError(f"need t_start > t_end, got t_start={t_start}, t_end={t_end}")
    return t_start, t_end


def lambda_range(process, t_start, t_end, n_check=4097):
    """Half-logSNR at both ends after checking logSNR is finite and strictly decreasing on a fine grid."""
    with jax.enable_x64(True):
        t = np.linspace(t_start, t_end, n_check)
        ls = process_call(process, "logsnr", t)
    if not np.all(np.isfinite(ls)):
        bad = t[~np.isfinite(ls)][0]
        raise ValueError(f"logSNR of {type(process).__name__} is not finite at t={bad} in [{t_end}, {t_start}]")
    d = np.diff(ls)          # t runs from t_start down to t_end, so logSNR must increase along it
    if not np.all(d > 0):
        i = int(np.argmax(~(d > 0)))
        raise ValueError(f"logSNR of {type(process).__name__} is not strictly decreasing on [{t_end}, {t_start}]: "
                         f"logsnr({t[i + 1]:.6g}) = {ls[i + 1]:.6g} <= logsnr({t[i]:.6g}) = {ls[i]:.6g}; "
                         "the grid optimizer works in logSNR and needs it monotone")
    return 0.5 * ls[0], 0.5 * ls[-1]


def _resolve_pattern(solver, order, nfe, orders, lower_order_final):
    _check_solver_order(solver, order)
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if orders is None:
        pattern = order_pattern(solver, order, int(nfe), lower_order_final=lower_order_final)
        if max(pattern) < order or nfe < 2:
            need = 2
            while max(order_pattern(solver, order, need, lower_order_final=lower_order_final)) < order:
                need += 1
            raise ValueError(f"nfe={nfe} is too small for {solver} of order {order}: its steps never reach "
                             f"order {order} (orders {list(pattern)}); use nfe >= {need} or a lower order")
    else:
        pattern = _check_orders(orders, int(nfe))
        if nfe < 2:
            raise ValueError("nfe must be >= 2: a one-step grid has no free time to optimize")
    return pattern


def _check_p(p):
    p = float(p)
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"p must be a finite number >= 0 (1: pixel models, 2: latent models), got {p}")
    return p


def _check_variant(variant, trunc):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    if not isinstance(trunc, (int, np.integer)) or trunc < 0:
        raise ValueError(f"trunc must be a non-negative integer, got {trunc!r}")
    return int(trunc)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The validated arguments of one optimized-grid problem (see `problem`).

    orders: the order of every step (N,); modes: how each step enters the objective (N,); p: the error
    exponent; variant, trunc: the objective variant; t_start > t_end: the fixed end points.
    """
    orders: tuple
    modes: tuple
    p: float
    variant: str
    trunc: int
    t_start: float
    t_end: float


def problem(process: NoiseProcess, solver: str = "unipc", order: int = 3, nfe: int = 10, *, p: float = 1.0,
            variant: str = "official", trunc: int = 3, orders: Sequence[int] | None = None,
            lower_order_final: bool | str | int = True, t_start: float | None = None,
            t_end: float | None = None) -> Problem:
    """Check the arguments of `optimize` (same names and meaning) and resolve them into a `Problem`.

    Raises ValueError for a bad solver/order/nfe/orders/p/variant/trunc or end points outside
    [t_min, t_max]; cheap (does not evaluate the process; `lambda_range` checks its logSNR).
    """
    pattern = _resolve_pattern(solver, order, nfe, orders, lower_order_final)
    p = _check_p(p)
    trunc = _check_variant(variant, trunc)
    t_start, t_end = _endpoints(process, t_start, t_end)
    return Problem(orders=pattern, modes=_modes(pattern, variant, trunc), p=p, variant=variant, trunc=trunc,
                   t_start=t_start, t_end=t_end)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------

def objective(process: NoiseProcess, grid, *, solver: str = "unipc", order: int = 3, p: float = 1.0,
              variant: str = "official", trunc: int = 3, orders: Sequence[int] | None = None,
              lower_order_final: bool | str | int = True) -> float:
    """The exact objective E of a time grid (float64), as minimized by `optimize`.

    Args:
      process: noise process.
      grid: (N+1,) strictly decreasing times t_start .. t_end, all with finite logSNR (N = NFE).
      solver, order, orders, lower_order_final: the order of each step (see `order_pattern`); `orders`
        (N,) overrides the solver's pattern.
      p: error exponent, eps~_t = sigma_t^p / alpha_t (1 for pixel models, 2 for latent models).
      variant: "paper" (per-node |sum of weights|) or "official" (DM-NonUniform's objective: order-1 steps
        separate, root-sum-square for the first `trunc` steps).
    Returns:
      the objective value (a Python float), without the common factor sigma_end.
    """
    g = np.asarray(grid, np.float64)
    if g.ndim != 1 or g.size < 2 or not np.all(np.diff(g) < 0):
        raise ValueError("grid must be a 1-D strictly decreasing array of at least 2 times")
    n = g.size - 1
    p = _check_p(p)
    trunc = _check_variant(variant, trunc)
    pattern = _check_orders(orders, n) if orders is not None else order_pattern(
        solver, order, n, lower_order_final=lower_order_final)
    kind = process_kind(process)
    with jax.enable_x64(True):
        lam = jnp.asarray(0.5 * process_call(process, "logsnr", g))
        traced, static = process_args(process, kind)
        return float(_exact_objective(lam, jnp.float64(p), jnp.asarray(pattern, jnp.int32),
                                      jnp.asarray(_modes(pattern, variant, trunc), jnp.int32), traced,
                                      kind=kind, static=static))


@functools.partial(jax.jit, static_argnames=("kind", "static"))
def _exact_objective(lam, p, orders, modes, traced, *, kind, static):
    process = traced if static is None else static.process
    return objective_pair(lam, p, orders, modes, 0.0, kind=kind, process=process)[1]
