"""DDIM(eta) (Song et al., 2021) and DDPM ancestral sampling (Ho et al., 2020), for any affine process.

Step from grid index i (time t) to i+1 (time p), with e^{-2h} = (alpha_t sigma_p / (alpha_p sigma_t))^2,
h = lambda_p - lambda_t. For VP processes these are exactly the papers' (and diffusers') formulas:

  DDIM:  x_p = alpha_p x0 + sqrt(sigma_p^2 - s^2) eps + s z,   s^2 = eta^2 sigma_p^2 (1 - e^{-2h})
  DDPM:  x_p = alpha_p (1 - e^{-2h}) x0 + (sigma_p/sigma_t) e^{-h} x_t + sqrt(v) z,
         v = sigma_p^2 (1 - e^{-2h}) ("fixed_small", the posterior variance) or
             sigma_t^2 (1 - e^{-2h}) ("fixed_large", beta_t of the respaced chain)

No noise is added on a step that ends at sigma = 0.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxdiff.solvers.base import Model, SolverBase, Sched


@dataclasses.dataclass(frozen=True)
class DDIM(SolverBase):
    """DDIM with stochasticity eta (0: deterministic, equal to DPM-Solver-1; 1: DDPM's posterior variance).

    time_stride: diffusers compatibility only. diffusers' DDIMScheduler steps from t to
      t - N_train // steps instead of to the next grid point; `time_stride = (N_train // steps) / N_train`
      reproduces it (the target is clamped at the grid's end). With "leading" and "trailing" spacings this
      is the grid itself; with "linspace" the state and the model's time then disagree (diffusers #9261).
    """
    eta: float = 0.0
    time_stride: float | None = None

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def run(self, model: Model, sched: Sched, x, noise):
        def target(i):
            if self.time_stride is None:
                return sched.alpha[i + 1], sched.sigma[i + 1], sched.lam[i + 1]
            t = jnp.maximum(sched.t[i] - self.time_stride, sched.t[-1])
            t = jnp.where(i == sched.steps - 1, sched.t[-1], t)
            la, ls = model.process.log_alpha(t), model.process.log_sigma(t)
            return jnp.exp(la).astype(x.dtype), jnp.exp(ls).astype(x.dtype), (la - ls).astype(x.dtype)

        def step(x, i):
            p = model(x, i)
            ap, sp, lp = target(i)
            h = lp - sched.lam[i]
            x_new = ap * p.x0
            if self.stochastic:
                s2 = self.eta ** 2 * sp ** 2 * -jnp.expm1(-2.0 * h)
                x_new = x_new + jnp.sqrt(jnp.maximum(sp ** 2 - s2, 0.0)) * p.eps + jnp.sqrt(s2) * noise(i)
            else:
                x_new = x_new + sp * p.eps
            return x_new, None

        x, _ = lax.scan(step, x, jnp.arange(sched.steps))
        return x


@dataclasses.dataclass(frozen=True)
class DDPM(SolverBase):
    """Ancestral sampling of the (respaced) DDPM chain; variance "fixed_small" or "fixed_large"."""
    variance: str = "fixed_small"

    stochastic = True

    def __post_init__(self):
        if self.variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance {self.variance!r}; choose 'fixed_small' or 'fixed_large'")

    def run(self, model: Model, sched: Sched, x, noise):
        def step(x, i):
            p = model(x, i)
            h = sched.lam[i + 1] - sched.lam[i]
            st, sp, ap = sched.sigma[i], sched.sigma[i + 1], sched.alpha[i + 1]
            q = -jnp.expm1(-2.0 * h)
            mean = ap * q * p.x0 + (sp / st) * jnp.exp(-h) * x
            var = (sp if self.variance == "fixed_small" else st) ** 2 * q
            var = jnp.where(sp > 0, var, 0.0)
            return mean + jnp.sqrt(var) * noise(i), None

        x, _ = lax.scan(step, x, jnp.arange(sched.steps))
        return x
