"""The pieces every solver shares: the schedule on a grid, the model call, and the scan driver.

A solver is a frozen dataclass (static under `jit`) with three methods:

  * `validate(steps)`: raise ValueError for a grid it cannot run (before anything is traced);
  * `nfe(sched)`: the exact number of model evaluations on the schedule's grid;
  * `run(model, sched, x, noise)`: the whole trajectory, normally one `lax.scan` over its step function;
    `noise(i)` is the standard normal draw of step i (stochastic solvers only).

`model(x, i)` evaluates the denoiser at grid point i and returns `Pred(x0, eps)`; `model.at(x, t)`
evaluates at an arbitrary time (singlestep solvers' intermediate points). The schedule `Sched` holds the
grid and alpha, sigma and lambda = logsnr/2 on it, all traced arrays: a new grid never recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.noise import NoiseProcess
from jaxdiff.predictions import dynamic_threshold, static_threshold, to_x0_eps

Array = jax.Array


class Pred(NamedTuple):
    """A model evaluation as a (data, noise) pair, each shaped like x."""
    x0: Array
    eps: Array


class Sched(NamedTuple):
    """alpha, sigma and lambda (= logsnr/2) on the grid t (N+1,), all (N+1,)."""
    t: Array
    alpha: Array
    sigma: Array
    lam: Array

    @property
    def steps(self) -> int:
        return self.t.shape[0] - 1


def make_sched(process: NoiseProcess, grid: Array, dtype) -> Sched:
    """Evaluate the process on a grid (N+1,) in `dtype` (float32 or float64)."""
    t = jnp.asarray(grid, dtype)
    la, ls = process.log_alpha(t), process.log_sigma(t)
    return Sched(t=t, alpha=jnp.exp(la).astype(dtype), sigma=jnp.exp(ls).astype(dtype), lam=(la - ls).astype(dtype))


@dataclasses.dataclass(frozen=True)
class Threshold:
    """x0 thresholding inside the solver: kind "static" (clip to +-max_value) or "dynamic" (Imagen).

    For "dynamic", `max_value` is the upper bound of the per-sample scale (diffusers' sample_max_value;
    None = unbounded as in DPM-Solver). Pixel-space models only.
    """
    kind: str = "dynamic"
    percentile: float = 0.995
    max_value: float | None = 1.0

    def __post_init__(self):
        if self.kind not in ("static", "dynamic"):
            raise ValueError(f"unknown threshold kind {self.kind!r}; choose 'static' or 'dynamic'")

    def __call__(self, x0: Array) -> Array:
        if self.kind == "static":
            return static_threshold(x0, 1.0 if self.max_value is None else self.max_value)
        return dynamic_threshold(x0, self.percentile, self.max_value)


class Model:
    """The denoiser seen by solvers: prediction kind conversion, thresholding, dtype, NFE accounting."""

    def __init__(self, denoiser: Callable[[Array, Array], Array], process: NoiseProcess, prediction: str,
                 sched: Sched, dtype, threshold: Threshold | None = None):
        self.denoiser, self.process, self.prediction = denoiser, process, prediction
        self.sched, self.dtype, self.threshold = sched, dtype, threshold

    def at(self, x: Array, t: Array) -> Pred:
        """Evaluate at time t (scalar) for a batch x (B, ...)."""
        tb = jnp.broadcast_to(jnp.asarray(t, self.dtype), (x.shape[0],))
        out = self.denoiser(x, tb).astype(self.dtype)
        x0, eps = to_x0_eps(out, self.prediction, x, t, self.process)
        if self.threshold is not None:
            x0 = self.threshold(x0)
            a, s = self.process.alpha(t), self.process.sigma(t)
            eps = (x - a * x0) / s
        return Pred(x0.astype(self.dtype), eps.astype(self.dtype))   # the process may compute in float64

    def __call__(self, x: Array, i: Array) -> Pred:
        """Evaluate at grid point i."""
        return self.at(x, self.sched.t[i])


def final_to_zero(sched: Sched, x: Array, x0: Array) -> Array:
    """If the grid ends at sigma = 0, the last step returns alpha_N x0 exactly (the limit of every
    solver's update); otherwise x unchanged. Avoids 0*inf at lambda = +inf."""
    return jnp.where(sched.sigma[-1] == 0, sched.alpha[-1] * x0, x)


def finite_tail(sched: Sched) -> Sched:
    """The schedule with a final lambda = +inf (a grid ending at sigma = 0) replaced by lambda_{N-1} + 1.

    For the step weights of multistep solvers: the final step to sigma = 0 is special-cased from alpha and
    sigma alone, and the regular branch it replaces must stay finite, or its gradient with respect to the
    grid (learned grids, `solvers.learned_grid`) is NaN even where its value is discarded."""
    lam_n = jnp.where(sched.sigma[-1] == 0, sched.lam[-2] + 1.0, sched.lam[-1])
    return sched._replace(lam=sched.lam.at[-1].set(lam_n))


def lam_at(sched: Sched, i: Array) -> Array:
    """lambda at grid index i, clamped into range (history entries before the start are never used)."""
    return sched.lam[jnp.clip(i, 0, sched.steps)]


class SolverBase:
    """Defaults shared by the solvers: deterministic, one model evaluation per grid interval, any step
    count >= 1. Subclasses override what differs (Heun's NFE, DDPM's noise, singlestep plans)."""

    stochastic = False

    def validate(self, steps: int) -> None:
        """Raise ValueError for a grid this solver cannot run."""
        if steps < 1:
            raise ValueError("need at least one step")

    def nfe(self, sched: Sched):
        """Model evaluations on this schedule."""
        return sched.steps


Solver = Any
