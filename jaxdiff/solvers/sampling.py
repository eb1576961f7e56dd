"""`sample`: run any solver over any grid, compiled once per (solver, grid length, shapes).

    x0 = jaxdiff.sample(denoiser, process, x_T, grid, solver="unipc", prediction="eps")

`denoiser(x, t) -> prediction` takes x (B, ...) and the process time t (B,); with `cond` it is called as
`denoiser(x, t, cond)`, and with a guidance scale once on the doubled batch [cond; uncond].
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.noise import NoiseProcess
from jaxdiff.predictions import check_kind, classifier_free_guidance
from jaxdiff.solvers.base import Model, Threshold, make_sched
from jaxdiff.solvers.ddim import DDIM, DDPM
from jaxdiff.solvers.deis import DEIS
from jaxdiff.solvers.dpm_solver import DPMSolverMultistep, DPMSolverSinglestep
from jaxdiff.solvers.karras import IPNDM, Euler, Heun
from jaxdiff.solvers.unipc import UniPC
from jaxdiff.timesteps.grids import check_grid

Array = jax.Array

SOLVERS: dict[str, Callable[..., Any]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "euler": Euler,
    "heun": Heun,
    "ipndm": IPNDM,
    "dpm_solver": functools.partial(DPMSolverMultistep, prediction="noise"),
    "dpm_solver++": functools.partial(DPMSolverMultistep, prediction="data"),
    "sde_dpm_solver++": functools.partial(DPMSolverMultistep, prediction="data", sde=True),
    "dpm_solver_singlestep": functools.partial(DPMSolverSinglestep, prediction="noise"),
    "dpm_solver++_singlestep": functools.partial(DPMSolverSinglestep, prediction="data"),
    "unipc": UniPC,
    "deis": DEIS,
}


def make_solver(name: str, **kwargs: Any):
    """A solver by name (one of SOLVERS) with its options, e.g. `make_solver("unipc", order=3, variant="bh2")`."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    try:
        return SOLVERS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options {sorted(kwargs)} for solver {name!r}: {e}") from None


def _min_steps(solver) -> int:
    order = getattr(solver, "order", 1)
    return order if isinstance(solver, (DPMSolverMultistep, UniPC)) else 1


def sample(denoiser: Callable[..., Array], process: NoiseProcess, x_T: Array, grid: Array, *,
           solver: Any = "dpm_solver++", prediction: str = "eps", key: Array | None = None,
           noise: Array | None = None, cond: Any = None, uncond: Any = None,
           guidance_scale: float | Array | None = None, threshold: Threshold | None = None,
           denoise_to_zero: bool = False, return_nfe: bool = False):
    """Solve from x_T at grid[0] to grid[-1].

    Args:
      denoiser: f(x (B, ...), t (B,)[, cond]) -> prediction of kind `prediction`.
      process: the noise process the denoiser was trained on.
      x_T: (B, ...) starting state (e.g. `process.prior_sample`); its sharding carries through.
      grid: (N+1,) strictly decreasing times; traced, so a new grid of the same length does not recompile.
      solver: a name from SOLVERS or a solver instance (e.g. `UniPC(order=3)`).
      prediction: what the denoiser predicts: "eps", "x0", "v", "score" or "flow".
      key / noise: randomness of stochastic solvers: a PRNG key, or pre-drawn noise (N, B, ...).
      cond, uncond, guidance_scale: conditioning; with a scale, classifier-free guidance
        uncond_pred + scale (cond_pred - uncond_pred) from one call on the doubled batch.
      threshold: optional x0 thresholding (`Threshold("dynamic")`), pixel models only.
      denoise_to_zero: one more evaluation at the end, returning the x0 prediction there.
      return_nfe: also return the number of model evaluations.

    Returns:
      x (B, ...) in float32 or wider (the solver's working precision), and the NFE if asked.
    """
    solver = make_solver(solver) if isinstance(solver, str) else solver
    check_kind(prediction)
    grid = jnp.asarray(grid) if not isinstance(grid, jax.Array) else grid
    check_grid(process, grid)
    steps = grid.shape[0] - 1
    if steps < _min_steps(solver):
        raise ValueError(f"{type(solver).__name__} of order {solver.order} needs at least {solver.order} steps, "
                         f"got {steps}; lower the order or add steps")
    solver.validate(steps)
    if guidance_scale is not None and (cond is None or uncond is None):
        raise ValueError("a guidance scale needs both `cond` and an unconditional branch `uncond` "
                         "(e.g. the null class)")
    if solver.stochastic:
        if noise is None and key is None:
            raise ValueError(f"{type(solver).__name__} is stochastic: pass a PRNG `key` or pre-drawn `noise`")
        if noise is not None and tuple(noise.shape) != (steps,) + tuple(x_T.shape):
            raise ValueError(f"noise must have shape {(steps,) + tuple(x_T.shape)}, got {tuple(noise.shape)}")
    if denoise_to_zero:
        try:
            last_sigma = float(process.sigma(float(grid[-1])))
        except Exception:
            last_sigma = None
        if last_sigma == 0.0:
            raise ValueError("denoise_to_zero needs a grid that ends above sigma = 0")
    x, nfe = _sample(denoiser, solver, prediction, threshold, denoise_to_zero, process, x_T, grid,
                     key, noise, cond, uncond, guidance_scale)
    return (x, nfe) if return_nfe else x


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sample(denoiser, solver, prediction, threshold, denoise_to_zero, process, x_T, grid, key, noise, cond,
            uncond, guidance_scale):
    dtype = jnp.promote_types(x_T.dtype, jnp.float32)
    x = x_T.astype(dtype)
    sched = make_sched(process, grid, dtype)
    if guidance_scale is not None:
        fn = classifier_free_guidance(denoiser, cond, uncond, guidance_scale)
    elif cond is not None:
        def fn(x, t):
            return denoiser(x, t, cond)
    else:
        fn = denoiser
    model = Model(fn, process, prediction, sched, dtype, threshold)

    def step_noise(i):
        if noise is not None:
            return noise[i].astype(dtype)
        return jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)

    x = solver.run(model, sched, x, step_noise)
    nfe = solver.nfe(sched)
    if denoise_to_zero:
        x = model(x, sched.steps).x0
        nfe = nfe + 1
    return x, nfe
