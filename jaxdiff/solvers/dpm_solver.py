"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), multistep and singlestep, and the
SDE-DPM-Solver++ of Lu et al. (2022); DDIM is their first order.

One exponential-integrator update covers both parameterisations. With hh = -h for data prediction
(coefficient c_t = alpha_t, ratio sigma_t/sigma_s) and hh = +h for noise prediction (c_t = sigma_t, ratio
alpha_t/alpha_s), h = lambda_t - lambda_s > 0:

    x_t = ratio x_s - c_t [ expm1(hh) m0 + g1 D1 + g2 D2 ],   g1 = expm1(hh)/hh - 1,  g2 = g1/hh - 1/2

where D1, D2 are divided differences of the model outputs in lambda, scaled by h (the Taylor form of
Lu et al.); the "midpoint" second-order variant uses g1 = expm1(hh)/2 instead. The SDE variant replaces
hh by -2h, multiplies the ratio by e^{-h} and adds sigma_t sqrt(-expm1(-2h)) z.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.solvers.base import Model, SolverBase, Sched, final_to_zero, finite_tail, lam_at
from jaxdiff.timesteps.grids import LOWER_FINAL_BELOW, order_schedule

SOLVER_TYPES = ("midpoint", "taylor")


def _check_common(order, prediction, solver_type, max_order=3):
    if order not in range(1, max_order + 1):
        raise ValueError(f"order must be 1..{max_order}, got {order!r}")
    if prediction not in ("data", "noise"):
        raise ValueError(f"prediction must be 'data' (DPM-Solver++) or 'noise' (DPM-Solver), got {prediction!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {list(SOLVER_TYPES)}")


def _coeffs(sched: Sched, s, t, data: bool, sde: bool = False):
    """(ratio, c_t, hh, h) of a step from grid index s to grid index t (traced scalars)."""
    h = sched.lam[t] - sched.lam[s]
    if data:
        ratio = sched.sigma[t] / sched.sigma[s]
        if sde:
            return ratio * jnp.exp(-h), sched.alpha[t], -2.0 * h, h
        return ratio, sched.alpha[t], -h, h
    return sched.alpha[t] / sched.alpha[s], sched.sigma[t], h, h


def exp_update(x, ratio, c_t, hh, m0, d1=None, d2=None, midpoint=False):
    """The exponential-integrator update above; d1/d2 (or None) are the scaled divided differences."""
    e = jnp.expm1(hh)
    acc = e * m0
    if d1 is not None:
        g1 = 0.5 * e if (midpoint and d2 is None) else e / hh - 1.0
        acc = acc + g1 * d1
        if d2 is not None:
            acc = acc + (g1 / hh - 0.5) * d2
    return ratio * x - c_t * acc


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistep(SolverBase):
    """Multistep DPM-Solver(++) of order 1-3 (Adams-type: one model evaluation per step).

    Args:
      order: 1 (= DDIM), 2 (2M) or 3 (3M).
      prediction: "data" (DPM-Solver++) or "noise" (DPM-Solver).
      solver_type: second-order form, "midpoint" (the papers' 'dpmsolver', diffusers' default) or
        "taylor" (diffusers' "heun"). Third order has a single form.
      lower_order_final: lower the order of the last steps (min(order, steps+1-k)) ...
      lower_final_below: ... only when steps < this; None (default): always, as UniPC. The official code
        uses 10 and diffusers 15; with those, a third-order step crosses the widest logSNR interval at the
        end of a uniform-t grid, which diverged on the 16-D mixture (RMSE 0.77 at 15 steps, vs 0.063 when
        the final orders are always lowered; benchmarks/results/samplers.md).
      sde: SDE-DPM-Solver++ (data prediction, order <= 2), stochastic: needs a key.
      legacy_3m: reproduce the third-order update of the official DPM-Solver code and of diffusers, whose
        second divided difference D2 = (D1_0 - D1_1)/(r0 + r1) approximates h^2 m''/2 but enters the
        update with the coefficient of h^2 m''. That halves the second-order Taylor term and makes "3M"
        converge at order 2; by default jaxdiff uses 2 D2 and converges at order 3 (docs/solvers.md).
    """
    order: int = 2
    prediction: str = "data"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    lower_final_below: int | None = LOWER_FINAL_BELOW
    sde: bool = False
    legacy_3m: bool = False

    def __post_init__(self):
        _check_common(self.order, self.prediction, self.solver_type)
        if self.sde and (self.prediction != "data" or self.order > 2):
            raise ValueError("sde=True is SDE-DPM-Solver++ of order 1 or 2 with prediction='data'")

    @property
    def stochastic(self) -> bool:
        return self.sde

    def orders(self, steps: int) -> tuple[int, ...]:
        return order_schedule(steps, self.order, lower_order_final=self.lower_order_final,
                              lower_final_below=self.lower_final_below)

    def weights(self, sched: Sched):
        """Scalar weights of every step: x_{i+1} = a_i x_i + sum_k b_ik m_{i-k} (+ SDE noise), as arrays
        a (N,), b (N, 3), with m the data (or noise) predictions, newest first. Orders, warm-up and the
        final step to sigma = 0 are folded in, so a step is one fused elementwise update."""
        data = self.prediction == "data"
        midpoint = self.solver_type == "midpoint"
        orders = jnp.asarray(self.orders(sched.steps))
        n = sched.steps
        k2 = 1.0 if self.legacy_3m else 2.0           # legacy: D2 ~ h^2 m''/2 weighted as h^2 m''
        sched_f = finite_tail(sched)    # finite unused branches: finite gradients w.r.t. the grid

        def one(i):
            ratio, c_t, hh, h = _coeffs(sched_f, i, i + 1, data, self.sde)
            # r0 (r1) exist from step 1 (2) on; before, the branches using them are never selected, and a
            # dummy 1 keeps them (and their gradients) finite
            r0 = jnp.where(i >= 1, (lam_at(sched, i) - lam_at(sched, i - 1)) / h, 1.0)
            r1 = jnp.where(i >= 2, (lam_at(sched, i - 1) - lam_at(sched, i - 2)) / h, 1.0)
            e = jnp.expm1(hh)
            g1 = e / hh - 1.0
            g2 = g1 / hh - 0.5
            zero = jnp.zeros_like(e)
            g = 0.5 * e if midpoint else g1
            s = r0 + r1
            big_p = g1 * (1.0 + r0 / s) + k2 * g2 / s     # total = e m0 + P D1_0 + Q D1_1
            big_q = -g1 * r0 / s - k2 * g2 / s
            w = jnp.stack([jnp.stack([e, zero, zero]),
                           jnp.stack([e + g / r0, -g / r0, zero]),
                           jnp.stack([e + big_p / r0, -big_p / r0 + big_q / r1, -big_q / r1])])[orders[i] - 1]
            a, b = ratio, -c_t * w
            # a final step to sigma = 0 returns alpha_N x0 exactly (the limit of the update)
            a_n, s_i, a_i = sched.alpha[n], sched.sigma[i], sched.alpha[i]
            a_z = zero if data else a_n / a_i
            b_z = jnp.stack([a_n if data else -a_n * s_i / a_i, zero, zero])
            final = (i == n - 1) & (sched.sigma[n] == 0)
            return jnp.where(final, a_z, a), jnp.where(final, b_z, b)

        return jax.vmap(one)(jnp.arange(n))

    def run(self, model: Model, sched: Sched, x, noise):
        data = self.prediction == "data"
        a, b = self.weights(sched)
        b = b.astype(x.dtype)
        noise_scale = sched.sigma[1:] * jnp.sqrt(-jnp.expm1(-2.0 * (sched.lam[1:] - sched.lam[:-1])))
        # Adams-type accumulation without a history of model outputs: acc[j-1] holds the contribution of
        # past outputs to step i + j - 1, so each new output is folded in once and nothing is shifted.
        n, k_max = sched.steps, self.order
        b_future = [jnp.concatenate([b[j:, j], jnp.zeros((j,), b.dtype)]) for j in range(k_max)]  # b_{i+j, j}
        acc = tuple(jnp.zeros_like(x) for _ in range(k_max - 1))

        def step(carry, i):
            x, acc = carry
            p = model(x, i)
            m = p.x0 if data else p.eps
            x_new = a[i].astype(x.dtype) * x + b[i, 0] * m
            if k_max > 1:
                x_new = x_new + acc[0]
            if self.sde:
                x_new = x_new + noise_scale[i].astype(x.dtype) * noise(i)
            acc = tuple(b_future[j][i] * m + (acc[j] if j < k_max - 1 else 0.0) for j in range(1, k_max))
            return (x_new, acc), None

        (x, _), _ = lax.scan(step, (x, acc), jnp.arange(n), unroll=4)
        return x


def dpm_solver_fast_plan(steps: int, order: int) -> tuple[int, ...]:
    """DPM-Solver's 'fast' singlestep plan of outer orders summing to `steps` model evaluations."""
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            return (3,) * (k - 2) + (2, 1)
        if steps % 3 == 1:
            return (3,) * (k - 1) + (1,)
        return (3,) * (k - 1) + (2,)
    if order == 2:
        return (2,) * (steps // 2) if steps % 2 == 0 else (2,) * (steps // 2) + (1,)
    return (1,) * steps


def diffusers_singlestep_plan(steps: int, order: int, lower_order_final: bool = True,
                              final_zero: bool = True) -> tuple[int, ...]:
    """The outer orders of diffusers' DPMSolverSinglestepScheduler (its `get_order_list`, whose entries
    k = 1, 2, 3 are the fine steps of one outer step, grouped here)."""
    if lower_order_final:
        base = {3: [1, 2, 3], 2: [1, 2], 1: [1]}[order]
        fine = base * (steps // order)
        rem = steps % order
        if order == 3 and rem == 0:
            fine = base * (steps // 3 - 1) + [1, 2] + [1]
        elif order == 2 and rem == 0:
            fine = base * (steps // 2 - 1) + [1, 1]
        elif rem:
            fine = fine + list(range(1, rem + 1))
    else:
        fine = {3: [1, 2, 3], 2: [1, 2], 1: [1]}[order] * (steps // order)
    if final_zero:
        fine[-1] = 1
    plan, run = [], 0
    for o in fine:
        if o == 1 and run:
            plan.append(run)
        run = o
    plan.append(run)
    return tuple(plan)


@dataclasses.dataclass(frozen=True)
class DPMSolverSinglestep(SolverBase):
    """Singlestep DPM-Solver(++) (Runge-Kutta type): each outer step of order k evaluates the model at
    its start and at k-1 intermediate points, which are the grid's own points. A grid of N intervals with
    plan (k_1, ..., k_m), sum k_j = N, costs N evaluations (DPM-Solver's `singlestep` with the same
    spacing for inner points, and diffusers' singlestep scheduler, are this).

    Args:
      order: highest order (1-3); plan: outer orders (default: DPM-Solver's 'fast' plan for N).
      prediction, solver_type: as DPMSolverMultistep. The intermediate state of a third-order step uses
        the second-order form of `solver_type` (as diffusers; DPM-Solver's 3S always uses "taylor" there).
    """
    order: int = 3
    prediction: str = "data"
    solver_type: str = "midpoint"
    plan: tuple[int, ...] | None = None

    def __post_init__(self):
        _check_common(self.order, self.prediction, self.solver_type)
        if self.plan is not None and not all(k in range(1, self.order + 1) for k in self.plan):
            raise ValueError(f"plan {self.plan} has orders outside 1..{self.order}")


    def outer_plan(self, steps: int) -> tuple[int, ...]:
        return tuple(self.plan) if self.plan is not None else dpm_solver_fast_plan(steps, self.order)

    def validate(self, steps: int) -> None:
        plan = self.outer_plan(steps)
        if sum(plan) != steps:
            raise ValueError(f"singlestep plan {plan} covers {sum(plan)} intervals but the grid has {steps}")

    def run(self, model: Model, sched: Sched, x, noise):
        data = self.prediction == "data"
        midpoint = self.solver_type == "midpoint"
        plan = self.outer_plan(sched.steps)
        starts = jnp.asarray([sum(plan[:j]) for j in range(len(plan))])
        orders = jnp.asarray(plan)

        def second_order(x, s, m_s, m_1, i1, t):
            ratio, c_t, hh, h = _coeffs(sched, s, t, data)
            r1 = (sched.lam[i1] - sched.lam[s]) / h
            return exp_update(x, ratio, c_t, hh, m_s, (m_1 - m_s) / r1, midpoint=midpoint)

        def outer(x, j):
            s = starts[j]
            p_s = model(x, s)
            m_s = p_s.x0 if data else p_s.eps
            pick = (lambda p: p.x0) if data else (lambda p: p.eps)

            def first(_):
                ratio, c_t, hh, _h = _coeffs(sched, s, s + 1, data)
                return exp_update(x, ratio, c_t, hh, m_s)

            def second(_):
                ratio, c_t, hh, _h = _coeffs(sched, s, s + 1, data)
                x1 = exp_update(x, ratio, c_t, hh, m_s)
                m1 = pick(model(x1, s + 1))
                return second_order(x, s, m_s, m1, s + 1, s + 2)

            def third(_):
                ratio, c_t, hh, _h = _coeffs(sched, s, s + 1, data)
                x1 = exp_update(x, ratio, c_t, hh, m_s)
                m1 = pick(model(x1, s + 1))
                x2 = second_order(x, s, m_s, m1, s + 1, s + 2)
                m2 = pick(model(x2, s + 2))
                ratio, c_t, hh, h = _coeffs(sched, s, s + 3, data)
                r1 = (sched.lam[s + 1] - sched.lam[s]) / h
                r2 = (sched.lam[s + 2] - sched.lam[s]) / h
                if midpoint:
                    return exp_update(x, ratio, c_t, hh, m_s, (m2 - m_s) / r2)
                d1_0, d1_1 = (m1 - m_s) / r1, (m2 - m_s) / r2
                d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
                return exp_update(x, ratio, c_t, hh, m_s, d1, d2)

            x_new = lax.switch(orders[j] - 1, [first, second, third][: self.order], None)
            x_new = jnp.where(j == len(plan) - 1, final_to_zero(sched, x_new, p_s.x0), x_new)
            return x_new, None

        x, _ = lax.scan(outer, x, jnp.arange(len(plan)))
        return x
