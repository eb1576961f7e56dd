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

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.solvers.base import Model, SolverBase, Sched, finite_tail, lam_at
from jaxdiff.timesteps.grids import order_schedule

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
class UniPC(SolverBase):
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


    def __post_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.order!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if self.prediction not in ("data", "noise"):
            raise ValueError(f"prediction must be 'data' or 'noise', got {self.prediction!r}")

    def orders(self, steps: int) -> tuple[int, ...]:
        return order_schedule(steps, self.order, lower_order_final=self.lower_order_final)

    def weights(self, sched: Sched):
        """Scalar weights of every step, as arrays over the N steps (K = order):

        corrector  x_i   = cu x_i^P + ca x_{i-1} + sum_k cw_k m_{i-1-k} + ct m_i      (cw: (N, K))
        predictor  x_i+1 = pa x_i + sum_k pw_k m_{i-k}                                (pw: (N, K))

        with m the data (or noise) predictions; orders, skipped corrections and the final step to sigma = 0
        are folded in, so each step is two fused elementwise updates."""
        data = self.prediction == "data"
        n, k_max = sched.steps, self.order
        orders = jnp.asarray(self.orders(n))
        correct = jnp.asarray([self.corrector and i > 0 and (i - 1) not in self.disable_corrector
                               for i in range(n)])

        sched_f = finite_tail(sched)    # finite unused branches: finite gradients w.r.t. the grid

        def frame(s):
            s = jnp.maximum(s, 0)           # s = -1 (no corrector before the first step): any finite value
            h = sched_f.lam[s + 1] - sched_f.lam[s]
            if data:
                return sched.sigma[s + 1] / sched.sigma[s], sched.alpha[s + 1], -h, h
            return sched.alpha[s + 1] / sched.alpha[s], sched.sigma[s + 1], h, h

        def update(s, p, corrector):
            """(ratio, w over [m_s, m_{s-1}, ..] (k_max,), w_t) of UniP-p or UniC-p from s to s+1."""
            ratio, c_t, hh, h = frame(s)
            big_b, b = _b_vector(hh, p, self.variant)
            # r_k of history before the first step are never used (warm-up orders); distinct dummies -k keep
            # the unused solves (and their gradients) finite
            rks = jnp.stack([jnp.where(s - k >= 0, (lam_at(sched, s - k) - sched_f.lam[jnp.maximum(s, 0)]) / h,
                                       -float(k)) for k in range(1, p)] + [jnp.ones_like(h)])
            if corrector:
                rho = jnp.full((1,), 0.5, b.dtype) if p == 1 else _rho(rks, b, p)
            else:
                rho = jnp.zeros((0,), b.dtype) if p == 1 else (
                    jnp.full((1,), 0.5, b.dtype) if p == 2 else _rho(rks, b, p - 1))
            w = [-c_t * jnp.expm1(hh)] + [jnp.zeros_like(h)] * (k_max - 1)
            for k in range(1, p):                           # D_k = (m_{s-k} - m_s) / r_k
                w[k] = w[k] - c_t * big_b * rho[k - 1] / rks[k - 1]
                w[0] = w[0] + c_t * big_b * rho[k - 1] / rks[k - 1]
            w_t = jnp.zeros_like(h)
            if corrector:                                   # D_t = m_t - m_s
                w_t = -c_t * big_b * rho[p - 1]
                w[0] = w[0] + c_t * big_b * rho[p - 1]
            return ratio, jnp.stack(w), w_t

        def pick(i, s, corrector):
            rows = [update(s, p, corrector) for p in range(1, k_max + 1)]
            o = orders[jnp.maximum(s, 0)] - 1
            return tuple(jnp.stack([r[j] for r in rows])[o] for j in range(3))

        def one(i):
            ca, cw, ct = pick(i, i - 1, True)
            on = correct[i]
            cu = jnp.where(on, 0.0, 1.0)
            ca, cw, ct = jnp.where(on, ca, 0.0), jnp.where(on, cw, 0.0), jnp.where(on, ct, 0.0)
            pa, pw, _ = pick(i, i, False)
            a_n, s_i, a_i = sched.alpha[n], sched.sigma[i], sched.alpha[i]
            zero = jnp.zeros_like(pa)
            final = (i == n - 1) & (sched.sigma[n] == 0)    # last step to sigma = 0: alpha_N x0 exactly
            pa = jnp.where(final, zero if data else a_n / a_i, pa)
            pw_z = jnp.stack([a_n if data else -a_n * s_i / a_i] + [zero] * (k_max - 1))
            pw = jnp.where(final, pw_z, pw)
            return cu, ca, cw, ct, pa, pw

        return jax.vmap(one)(jnp.arange(n))

    def run(self, model: Model, sched: Sched, x, noise):
        data = self.prediction == "data"
        k_max = self.order
        cu, ca, cw, ct, pa, pw = (w.astype(x.dtype) for w in self.weights(sched))

        def step(carry, i):
            x_prev, x_pred, hist = carry          # corrected state at i-1, predicted state at i, m_{i-1}, ..
            p = model(x_pred, i)
            m = p.x0 if data else p.eps
            x_cur = cu[i] * x_pred + ca[i] * x_prev + ct[i] * m
            for k in range(k_max):
                x_cur = x_cur + cw[i, k] * hist[k]
            hist = (m,) + hist[:-1]
            x_next = pa[i] * x_cur
            for k in range(k_max):
                x_next = x_next + pw[i, k] * hist[k]
            return (x_cur, x_next, hist), None

        hist0 = tuple(jnp.zeros_like(x) for _ in range(k_max))
        (_, x, _), _ = lax.scan(step, (x, x, hist0), jnp.arange(sched.steps), unroll=4)
        return x
