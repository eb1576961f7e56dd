"""UniPC (Zhao et al., 2023): the UniP-p predictor and the UniC-p corrector, B(h) variants bh1 and bh2.

Step from grid index s to t, h = lambda_t - lambda_s, hh = -h (data prediction) or +h (noise).
With r_k = (lambda_{s-k} - lambda_s)/h, D_k = (m_{s-k} - m_s)/r_k, and the coefficients
g_1 = expm1(hh)/hh - 1, g_{i+1} = g_i/hh - 1/(i+1)!, b_i = i! g_i / B(h):

    predictor  x_t^P = xbar - c_t B(h) sum_{k<p} rho^P_k D_k,        rho^P = R_{p-1}^{-1} b_{1..p-1}
    corrector  x_t^C = xbar - c_t B(h) (sum_{k<p} rho^C_k D_k + rho^C_p (m_t - m_s)),  rho^C = R_p^{-1} b
    xbar = ratio x_s - c_t expm1(hh) m_s

where R_p[i, k] = r_k^i (r_p = 1), rho^P = [1/2] for p = 2 and rho^C = [1/2] for p = 1 (as the paper's
code). The model output m_t at the predicted point is reused as the next step's m_s, so the corrector
costs no evaluation; it is skipped after the last step (NFE = steps).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from jaxdiff.solvers.base import Model, Sched, final_to_zero, lam_at, order_schedule, shift_history

VARIANTS = ("bh1", "bh2")


def _b_vector(hh, order: int, variant: str):
    """(B(h), b_1..b_order) for a traced scalar hh."""
    big_b = hh if variant == "bh1" else jnp.expm1(hh)
    g = jnp.expm1(hh) / hh - 1.0
    b = []
    for i in range(1, order + 1):
        b.append(g * math.factorial(i) / big_b)
        g = g / hh - 1.0 / math.factorial(i + 1)
    return big_b, jnp.stack(b)


def _rho(rks, b, size: int):
    """Solve R rho = b[:size] with R[i, k] = rks[k]^i (2 <= size <= 3, static)."""
    r = jnp.stack([rks[:size] ** i for i in range(size)])
    return jnp.linalg.solve(r, b[:size])


@dataclasses.dataclass(frozen=True)
class UniPC:
    """UniPC multistep solver.

    Args:
      order: p of UniP-p (1-3); with the corrector the accuracy order is p+1.
      variant: "bh1" (B(h) = hh; the paper's choice for unconditional sampling at few steps) or "bh2"
        (B(h) = expm1(hh)).
      prediction: "data" (default) or "noise".
      corrector: apply UniC after each predictor step except the last.
      disable_corrector: grid steps (0-based predictor step indices) whose output is not corrected
        (recommended for the first steps under large guidance).
      lower_order_final: min(order, steps+1-k) at step k, always (as the paper's code and diffusers).
    """
    order: int = 3
    variant: str = "bh1"
    prediction: str = "data"
    corrector: bool = True
    disable_corrector: tuple[int, ...] = ()
    lower_order_final: bool = True

    stochastic = False

    def __post_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.order!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if self.prediction not in ("data", "noise"):
            raise ValueError(f"prediction must be 'data' or 'noise', got {self.prediction!r}")

    def validate(self, steps: int) -> None:
        if steps < 1:
            raise ValueError("need at least one step")

    def nfe(self, sched: Sched):
        return sched.steps

    def orders(self, steps: int) -> tuple[int, ...]:
        return order_schedule(steps, self.order, lower_order_final=self.lower_order_final)

    def run(self, model: Model, sched: Sched, x, draw):
        data = self.prediction == "data"
        n = sched.steps
        orders = jnp.asarray(self.orders(n))
        correct = jnp.asarray([self.corrector and (i - 1) not in self.disable_corrector for i in range(n)])
        p_max = self.order

        def frame(s, t):
            h = sched.lam[t] - sched.lam[s]
            if data:
                return sched.sigma[t] / sched.sigma[s], sched.alpha[t], -h, h
            return sched.alpha[t] / sched.alpha[s], sched.sigma[t], h, h

        def update(x_s, hist, s, p, m_t=None):
            """UniP-p from index s (hist[0] = m_s) to s+1; with m_t, UniC-p instead."""
            ratio, c_t, hh, h = frame(s, s + 1)
            m_s = hist[0]
            xbar = ratio * x_s - c_t * jnp.expm1(hh) * m_s
            big_b, b = _b_vector(hh, p, self.variant)
            rks = jnp.stack([(lam_at(sched, s - k) - sched.lam[s]) / h for k in range(1, p)] + [jnp.ones_like(h)])
            ds = [(hist[k] - m_s) / rks[k - 1] for k in range(1, p)]
            if m_t is None:
                if p == 1:
                    return xbar
                rho = jnp.full((1,), 0.5, b.dtype) if p == 2 else _rho(rks, b, p - 1)
            else:
                ds = ds + [m_t - m_s]
                rho = jnp.full((1,), 0.5, b.dtype) if p == 1 else _rho(rks, b, p)
            res = sum(rho[k] * ds[k] for k in range(len(ds)))
            return xbar - c_t * big_b * res

        def step(carry, i):
            x_prev, x_pred, hist = carry          # x_prev: corrected state at i-1; x_pred: predicted state at i
            p = model(x_pred, i)
            m = p.x0 if data else p.eps
            if self.corrector:
                def corr(o):
                    return lambda _: update(x_prev, hist, i - 1, o, m)
                x_corr = lax.switch(orders[jnp.maximum(i - 1, 0)] - 1, [corr(o) for o in range(1, p_max + 1)], None)
                x_cur = jnp.where((i > 0) & correct[i], x_corr, x_pred)
            else:
                x_cur = x_pred
            hist = shift_history(hist, m)

            def pred(o):
                return lambda _: update(x_cur, hist, i, o)
            x_next = lax.switch(orders[i] - 1, [pred(o) for o in range(1, p_max + 1)], None)
            x_next = jnp.where(i == n - 1, final_to_zero(sched, x_next, p.x0), x_next)
            return (x_cur, x_next, hist), None

        hist0 = jnp.zeros((p_max,) + x.shape, x.dtype)
        (_, x, _), _ = lax.scan(step, (x, x, hist0), jnp.arange(n))
        return x
