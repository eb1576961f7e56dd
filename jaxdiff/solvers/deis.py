"""DEIS multistep (Zhang & Chen, 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"):
the "logrho" Adams-Bashforth variant that diffusers' DEISMultistepScheduler implements.

With rho = sigma / alpha (EDM's sigma_hat) and y = x / alpha, the probability-flow ODE is
dy/drho = eps(x, t). DEIS integrates it exactly over [rho_i, rho_{i+1}] after replacing eps by the Lagrange
polynomial *in log rho* through the last k noise predictions (k = the step's order):

    x_{i+1} = alpha_{i+1} ( x_i / alpha_i + sum_j c_ij eps_{i-j} ),   c_ij = int_{rho_i}^{rho_{i+1}} l_j(log rho) drho

With u = log rho - log rho_i, nodes v_j = log rho_{i-j} - log rho_i (v_0 = 0) and H = log(rho_{i+1} / rho_i) < 0,
c_ij = rho_i int_0^H l_j(u) e^u du, a combination of the moments I_k = int_0^H u^k e^u du:
I_0 = expm1(H), I_1 = H e^H - I_0, I_2 = H^2 e^H - 2 I_1. Order 1 is DDIM. A final step to sigma = 0
(rho = 0) is first order and returns alpha_N x0 exactly.

Orders: warm-up 1, 2, .., order, then the last steps lowered as the other multistep solvers
(`grids.order_schedule`; diffusers lowers them only when steps < 15: `lower_final_below=15`).
The measured convergence order on the analytic mixture is in tests/test_deis.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.solvers.base import Model, SolverBase, Sched, finite_tail
from jaxdiff.timesteps.grids import LOWER_FINAL_BELOW, order_schedule


def _ab_weights(v1, v2, big_h):
    """Coefficients (3 orders x 3 nodes) of int_0^H l_j(u) e^u du for Lagrange nodes 0, v1, v2."""
    e = jnp.exp(big_h)
    i0 = jnp.expm1(big_h)
    i1 = big_h * e - i0
    i2 = big_h * big_h * e - 2.0 * i1
    zero = jnp.zeros_like(i0)
    o1 = jnp.stack([i0, zero, zero])
    o2 = jnp.stack([i0 - i1 / v1, i1 / v1, zero])
    o3 = jnp.stack([(i2 - (v1 + v2) * i1 + v1 * v2 * i0) / (v1 * v2),
                    (i2 - v2 * i1) / (v1 * (v1 - v2)),
                    (i2 - v1 * i1) / (v2 * (v2 - v1))])
    return jnp.stack([o1, o2, o3])


@dataclasses.dataclass(frozen=True)
class DEIS(SolverBase):
    """DEIS multistep ("logrho", noise prediction) of order 1-3.

    Args:
      order: 1 (= DDIM), 2 or 3 (diffusers' default solver_order is 2).
      lower_order_final: lower the order of the last steps (min(order, steps+1-k)) ...
      lower_final_below: ... only when steps < this (diffusers: 15); None (default): always, as the other
        jaxdiff multistep solvers.
    """
    order: int = 3
    lower_order_final: bool = True
    lower_final_below: int | None = LOWER_FINAL_BELOW

    def __post_init__(self):
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"DEIS order must be 1, 2 or 3, got {self.order!r}")

    def orders(self, steps: int) -> tuple[int, ...]:
        return order_schedule(steps, self.order, lower_order_final=self.lower_order_final,
                              lower_final_below=self.lower_final_below)

    def weights(self, sched: Sched):
        """x_{i+1} = a_i x_i + sum_k b_ik eps_{i-k}: a (N,), b (N, 3), orders and the final step folded in."""
        n = sched.steps
        orders = jnp.asarray(self.orders(n))
        sf = finite_tail(sched)
        log_rho = -sf.lam                                # log(sigma/alpha) = -lambda

        def one(i):
            lr_i = log_rho[i]
            big_h = log_rho[i + 1] - lr_i
            # history nodes exist from step 1 (2) on; dummies keep the unused branches finite
            v1 = jnp.where(i >= 1, log_rho[jnp.maximum(i - 1, 0)] - lr_i, 1.0)
            v2 = jnp.where(i >= 2, log_rho[jnp.maximum(i - 2, 0)] - lr_i, 2.0)
            c = _ab_weights(v1, v2, big_h)[orders[i] - 1]
            rho_i = jnp.exp(lr_i)
            a = sched.alpha[i + 1] / sched.alpha[i]
            b = sched.alpha[i + 1] * rho_i * c
            final = (i == n - 1) & (sched.sigma[n] == 0)   # to sigma = 0: alpha_N (x_i - sigma_i eps)/alpha_i
            zero = jnp.zeros_like(a)
            b_z = jnp.stack([-sched.alpha[n] * rho_i, zero, zero])
            return a, jnp.where(final, b_z, b)

        return jax.vmap(one)(jnp.arange(n))

    def run(self, model: Model, sched: Sched, x, noise):
        a, b = self.weights(sched)
        a, b = a.astype(x.dtype), b.astype(x.dtype)
        k_max = self.order

        def step(carry, i):
            x, hist = carry
            m = model(x, i).eps
            hist = (m,) + hist[:-1]
            x_new = a[i] * x
            for k in range(k_max):
                x_new = x_new + b[i, k] * hist[k]
            return (x_new, hist), None

        hist0 = tuple(jnp.zeros_like(x) for _ in range(k_max))
        (x, _), _ = lax.scan(step, (x, hist0), jnp.arange(sched.steps), unroll=4)
        return x
