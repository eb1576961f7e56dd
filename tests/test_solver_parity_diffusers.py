"""Parity with diffusers' schedulers: the same analytic noise-prediction model, the same schedule, the same
grid (jaxdiff's own `diffusers_indices`) and the same noise draws give the same samples.

diffusers runs its step arithmetic in float32 (it upcasts the sample to float32 in `step`), jaxdiff here in
float64, so the tolerance is RMSE <= 1e-5 (see docs/solvers.md for where the two deliberately differ).
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.analytic import GaussianMixture
from jaxdiff.noise import VPDiscrete
from jaxdiff.solvers import (DDIM, DDPM, DPMSolverMultistep, DPMSolverSinglestep, Euler, Heun, UniPC,
                             diffusers_singlestep_plan, sample)
from jaxdiff.timesteps import diffusers_indices, grid_from_indices

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.parity

BATCH, DIM = 48, 6
RMSE_TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _mixture():
    return GaussianMixture.random(jax.random.PRNGKey(3), 4, DIM)


def _x_T():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(11), (BATCH, DIM), jnp.float64))


def _process(scheduler):
    return _process_of(scheduler.alphas_cumprod.double().numpy().tobytes())


# One process object per distinct alphas_cumprod (all cases here share COMMON's schedule) and one
# denoiser function per process: `sample` compiles per (denoiser, solver, grid length), so the same
# denoiser object lets cases that differ only in spacing share one compilation (and the diffusers side
# one jitted model) instead of compiling twice per case. The values are the scheduler's own, bit for bit.
@functools.lru_cache(maxsize=None)
def _process_of(alphas_cumprod_bytes):
    return VPDiscrete.from_alphas_cumprod(np.frombuffer(alphas_cumprod_bytes, np.float64))


_DENOISERS = {}


def _eps(process):
    """(eps denoiser, its jit) of the mixture for `process` (a process from `_process`, kept alive by its cache)."""
    if id(process) not in _DENOISERS:
        den = _mixture().denoiser(process, "eps")
        _DENOISERS[id(process)] = (den, jax.jit(den))
    return _DENOISERS[id(process)]


def _torch_model(process, n_train):
    """diffusers side: eps(x, timestep) from the analytic mixture at process time (timestep + 1) / N."""
    eps = _eps(process)[1]

    def model(x, timestep):
        t = (float(timestep) + 1.0) / n_train
        out = eps(jnp.asarray(x.double().numpy()), jnp.full((x.shape[0],), t))
        return torch.from_numpy(np.asarray(out)).to(x.dtype)
    return model


@contextlib.contextmanager
def _torch_float32_is_float64():
    """diffusers builds its schedules and casts states with `torch.float32`; redirecting that name to
    float64 makes diffusers compute in float64 wherever it does not also round through numpy float32
    (Euler/Heun do), so the comparison measures the algorithms rather than float32 rounding."""
    real = torch.float32
    torch.float32 = torch.float64
    try:
        yield
    finally:
        torch.float32 = real


def _scheduler(name, **config):
    with _torch_float32_is_float64():
        return getattr(diffusers, name)(**COMMON, **config)


def _run_diffusers(scheduler, steps, x_T, noises=None):
    with _torch_float32_is_float64():
        return _run_diffusers_loop(scheduler, steps, x_T, noises)


def _run_diffusers_loop(scheduler, steps, x_T, noises):
    scheduler.set_timesteps(steps)
    process = _process(scheduler)
    model = _torch_model(process, scheduler.config.num_train_timesteps)
    x = torch.from_numpy(x_T).double() * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(0) if noises is not None else None
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=gen).prev_sample if gen is not None else \
            scheduler.step(eps, t, x).prev_sample
    return x.double().numpy(), process


def _noise_draws(steps, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return np.stack([torch.randn((BATCH, DIM), generator=gen, dtype=dtype).double().numpy() for _ in range(steps)])


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def _ours(process, grid, solver, x_T, noise=None):
    den = _eps(process)[0]
    return sample(den, process, jnp.asarray(x_T), grid, solver=solver, prediction="eps",
                  noise=None if noise is None else jnp.asarray(noise))


COMMON = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
STEPS = (5, 10, 20)
SPACINGS = ("linspace", "leading", "trailing")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim(steps, spacing):
    sch = _scheduler("DDIMScheduler", timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                                  clip_sample=False, set_alpha_to_one=True)
    x_T = _x_T()
    ref, process = _run_diffusers(sch, steps, x_T)
    idx = diffusers_indices(steps, spacing, style="ddim", steps_offset=sch.config.steps_offset)
    np.testing.assert_array_equal(idx, sch.timesteps.numpy())
    grid = grid_from_indices(process, idx, final="zero")
    ours = _ours(process, grid, DDIM(time_stride=(1000 // steps) / 1000), x_T)
    assert _rmse(ours, ref) <= RMSE_TOL
    if spacing != "linspace":      # there diffusers' prev_timestep is the grid itself
        assert _rmse(_ours(process, grid, DDIM(), x_T), ref) <= RMSE_TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_same_noise(steps, spacing):
    sch = _scheduler("DDPMScheduler", timestep_spacing=spacing, clip_sample=False,
                                  steps_offset=1 if spacing == "leading" else 0, variance_type="fixed_small")
    x_T = _x_T()
    ref, process = _run_diffusers(sch, steps, x_T, noises=True)
    idx = diffusers_indices(steps, spacing, style="ddim", steps_offset=sch.config.steps_offset)
    np.testing.assert_array_equal(idx, sch.timesteps.numpy())
    ours = _ours(process, grid_from_indices(process, idx, final="zero"), DDPM("fixed_small"), x_T,
                 noise=_noise_draws(steps))
    assert _rmse(ours, ref) <= RMSE_TOL


def _karras_family_case(cls, solver, steps, spacing):
    sch = _scheduler(cls, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    x_T = _x_T()
    ref, process = _run_diffusers(sch, steps, x_T)
    idx = diffusers_indices(steps, spacing, style="ddim", steps_offset=sch.config.steps_offset)
    np.testing.assert_array_equal(idx, np.unique(sch.timesteps.numpy())[::-1])
    grid = grid_from_indices(process, idx, final="zero")
    # diffusers starts from x_hat = init_noise_sigma z, which for "linspace"/"trailing" is sigma_hat_max z
    # (not sqrt(sigma_hat^2 + 1) z): in process variables x_T = alpha_T init_noise_sigma z.
    x_T_process = x_T * float(sch.init_noise_sigma) * float(process.alpha(grid[0]))
    assert _rmse(_ours(process, grid, solver, x_T_process), ref) <= RMSE_TOL


# Euler/Heun "linspace" timesteps are fractional unless 999/(steps-1) is an integer; diffusers then
# interpolates sigma linearly in the timestep while jaxdiff interpolates log-alpha (DPM-Solver's rule).
KARRAS_CASES = [(s, sp) for s in STEPS for sp in SPACINGS if sp != "linspace" or 999 % (s - 1) == 0]


@pytest.mark.parametrize("steps,spacing", KARRAS_CASES)
def test_euler(steps, spacing):
    _karras_family_case("EulerDiscreteScheduler", Euler(), steps, spacing)


@pytest.mark.parametrize("steps,spacing", KARRAS_CASES)
def test_heun(steps, spacing):
    _karras_family_case("HeunDiscreteScheduler", Heun(), steps, spacing)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("algorithm,order", [("dpmsolver++", 2), ("dpmsolver++", 3), ("dpmsolver", 2),
                                             ("dpmsolver", 3)])
def test_dpm_solver_multistep(steps, spacing, algorithm, order):
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"   # diffusers allows "zero" only for ++
    sch = _scheduler("DPMSolverMultistepScheduler", timestep_spacing=spacing, solver_order=order,
                                                algorithm_type=algorithm, final_sigmas_type=final,
                                                steps_offset=1 if spacing == "leading" else 0)
    x_T = _x_T()
    ref, process = _run_diffusers(sch, steps, x_T)
    idx = diffusers_indices(steps, spacing, style="multistep", steps_offset=sch.config.steps_offset)
    np.testing.assert_array_equal(idx, sch.timesteps.numpy())
    grid = grid_from_indices(process, idx, final="zero" if final == "zero" else "t_min")
    solver = DPMSolverMultistep(order, prediction="data" if algorithm == "dpmsolver++" else "noise",
                                lower_final_below=15, legacy_3m=True)
    assert _rmse(_ours(process, grid, solver, x_T), ref) <= RMSE_TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", (2, 3))
def test_dpm_solver_singlestep(steps, order):
    sch = _scheduler("DPMSolverSinglestepScheduler", solver_order=order, lower_order_final=True)
    x_T = _x_T()
    ref, process = _run_diffusers(sch, steps, x_T)
    idx = diffusers_indices(steps, "linspace", style="multistep")
    np.testing.assert_array_equal(idx, sch.timesteps.numpy())
    plan = diffusers_singlestep_plan(steps, order)
    solver = DPMSolverSinglestep(order, plan=plan)
    assert _rmse(_ours(process, grid_from_indices(process, idx, final="zero"), solver, x_T), ref) <= RMSE_TOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant,order", [("bh1", 2), ("bh1", 3), ("bh2", 2), ("bh2", 3)])
def test_unipc(steps, spacing, variant, order):
    # diffusers' bh1 returns NaN on a final step to sigma = 0 (B(h) = -inf times 0); jaxdiff does not
    # (test_unipc_bh1_to_zero), so bh1 is compared on grids ending at index 0.
    final = "sigma_min" if variant == "bh1" else "zero"
    sch = _scheduler("UniPCMultistepScheduler", timestep_spacing=spacing, solver_order=order, solver_type=variant,
                     final_sigmas_type=final, steps_offset=1 if spacing == "leading" else 0)
    x_T = _x_T()
    ref, process = _run_diffusers(sch, steps, x_T)
    idx = diffusers_indices(steps, spacing, style="multistep", steps_offset=sch.config.steps_offset)
    np.testing.assert_array_equal(idx, sch.timesteps.numpy())
    grid = grid_from_indices(process, idx, final="zero" if final == "zero" else "t_min")
    assert _rmse(_ours(process, grid, UniPC(order, variant=variant), x_T), ref) <= RMSE_TOL


def test_unipc_bh1_to_zero():
    """Where diffusers' UniPC-bh1 returns NaN (final step to sigma = 0), jaxdiff returns alpha x0 exactly."""
    sch = _scheduler("UniPCMultistepScheduler", solver_order=3, solver_type="bh1", final_sigmas_type="zero")
    x_T = _x_T()
    ref, process = _run_diffusers(sch, 10, x_T)
    assert np.isnan(ref).any()          # if diffusers fixes this, parity can be extended to it
    grid = grid_from_indices(process, diffusers_indices(10, "linspace"), final="zero")
    ours = _ours(process, grid, UniPC(3, variant="bh1"), x_T)
    assert np.isfinite(np.asarray(ours)).all()
