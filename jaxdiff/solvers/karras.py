"""Solvers in EDM's variables (Karras et al., 2022): x_hat = x / alpha, sigma_hat = sigma / alpha = e^{-lambda},
D = x0 prediction, derivative d = (x_hat - D) / sigma_hat of the probability-flow ODE in sigma_hat.

  Euler:  x_hat' = x_hat + (sigma_hat' - sigma_hat) d                    (deterministic Euler = DDIM)
  Heun:   EDM Algorithm 2, with optional churn (S_churn, S_min, S_max, S_noise); the trapezoidal correction
          is skipped on a step that ends at sigma = 0, so NFE = 2N - 1 there and 2N otherwise.
  iPNDM:  Adams-Bashforth of order min(max_order, i+1) on d with the fixed-step coefficients (Zhang & Chen).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiff.solvers.base import Model, SolverBase, Sched


def _sig_hat(sched: Sched):
    return sched.sigma / sched.alpha


@dataclasses.dataclass(frozen=True)
class Euler(SolverBase):
    """First-order Euler on the ODE in sigma_hat (identical to deterministic DDIM)."""


    def run(self, model: Model, sched: Sched, x, noise):
        sh = _sig_hat(sched)

        def step(x, i):
            p = model(x, i)
            xh = x / sched.alpha[i]
            d = (xh - p.x0) / sh[i]
            return sched.alpha[i + 1] * (xh + (sh[i + 1] - sh[i]) * d), None

        x, _ = lax.scan(step, x, jnp.arange(sched.steps))
        return x


@dataclasses.dataclass(frozen=True)
class Heun(SolverBase):
    """EDM's second-order Heun sampler (Algorithm 2). churn = 0 is deterministic (Algorithm 1)."""
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0

    @property
    def stochastic(self) -> bool:
        return self.s_churn > 0

    def validate(self, steps: int) -> None:
        super().validate(steps)
        if self.s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {self.s_churn}")

    def nfe(self, sched: Sched):
        return sched.steps + jnp.sum(sched.sigma[1:] > 0)

    def run(self, model: Model, sched: Sched, x, noise):
        sh = _sig_hat(sched)
        process = model.process
        gamma_max = min(self.s_churn / sched.steps, math.sqrt(2.0) - 1.0)

        def step(x, i):
            s_cur, s_next = sh[i], sh[i + 1]
            xh = x / sched.alpha[i]
            t_hat, a_hat, s_hat = sched.t[i], sched.alpha[i], s_cur
            if self.stochastic:
                gamma = jnp.where((s_cur >= self.s_min) & (s_cur <= self.s_max), gamma_max, 0.0)
                s_hat = s_cur * (1.0 + gamma)
                xh = xh + jnp.sqrt(s_hat ** 2 - s_cur ** 2) * self.s_noise * noise(i)
                t_hat = jnp.where(gamma > 0, process.t_from_logsnr(-2.0 * jnp.log(s_hat)), sched.t[i]).astype(x.dtype)
                a_hat = jnp.where(gamma > 0, process.alpha(t_hat), sched.alpha[i]).astype(x.dtype)
                s_hat = s_hat.astype(x.dtype)
            d = (xh - model.at(a_hat * xh, t_hat).x0) / s_hat
            xh_next = xh + (s_next - s_hat) * d

            def correct(_):
                d2 = (xh_next - model(sched.alpha[i + 1] * xh_next, i + 1).x0) / s_next
                return xh + (s_next - s_hat) * 0.5 * (d + d2)

            xh_next = lax.cond(s_next > 0, correct, lambda _: xh_next, None)
            return sched.alpha[i + 1] * xh_next, None

        x, _ = lax.scan(step, x, jnp.arange(sched.steps))
        return x


# numpy, not jnp: a jnp constant at import time would start the XLA backend before
# jax.distributed.initialize() (multi-host start-up fails with "must be called before ...")
_AB = np.array([[1.0, 0.0, 0.0, 0.0],
                [3.0 / 2, -1.0 / 2, 0.0, 0.0],
                [23.0 / 12, -16.0 / 12, 5.0 / 12, 0.0],
                [55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24]])


@dataclasses.dataclass(frozen=True)
class IPNDM(SolverBase):
    """Improved PNDM: Adams-Bashforth on d with fixed-step coefficients, order up to `max_order` (<= 4)."""
    max_order: int = 4


    def __post_init__(self):
        if self.max_order not in (1, 2, 3, 4):
            raise ValueError(f"iPNDM max_order must be 1..4, got {self.max_order!r}")

    def run(self, model: Model, sched: Sched, x, noise):
        sh = _sig_hat(sched)
        k = self.max_order
        coef = jnp.asarray(_AB[:k, :k], x.dtype)

        def step(carry, i):
            x, hist = carry
            xh = x / sched.alpha[i]
            d = (xh - model(x, i).x0) / sh[i]
            hist = jnp.concatenate([d[None], hist[:-1]], axis=0)
            c = coef[jnp.minimum(i, k - 1)]
            slope = jnp.tensordot(c, hist, axes=1)
            return (sched.alpha[i + 1] * (xh + (sh[i + 1] - sh[i]) * slope), hist), None

        (x, _), _ = lax.scan(step, (x, jnp.zeros((k,) + x.shape, x.dtype)), jnp.arange(sched.steps))
        return x
