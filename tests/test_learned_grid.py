"""Time grids learned through the compiled sampler (jaxdiff.solvers.learned_grid) and their files
(jaxdiff.timesteps.learned): the gradient w.r.t. the grid against float64 finite differences, a learned
grid beating its initialization on held-out noise, provenance checks and bad input."""
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.analytic import GaussianMixture
from jaxdiff.noise import make_process
from jaxdiff.solvers import DDIM, DEIS, DPMSolverMultistep, Heun, UniPC, learn_grid, make_solver, sample
from jaxdiff.solvers.learned_grid import (grid_to_params, make_grid_loss, params_to_grid, solver_registry_name,
                                          steps_for_nfe, _frame)
from jaxdiff.timesteps import load_grid, make_grid, save_grid, tree_hash

PROCESS = make_process("vp_linear")


@functools.lru_cache(maxsize=None)
def _mix(dim=4):
    return GaussianMixture.random(jax.random.PRNGKey(0), 4, dim)


def _noise(n, dim=4, seed=11):
    return PROCESS.prior_sample(jax.random.PRNGKey(seed), (n, dim), jnp.float64)


@pytest.mark.parametrize("final", ["t_min", "zero"])
def test_parameterization_roundtrip(final):
    g = np.asarray(make_grid("time_quadratic", PROCESS, 6, final=final))
    theta = grid_to_params(PROCESS, g)
    back = np.asarray(params_to_grid(PROCESS, theta, _frame(PROCESS, g)))
    np.testing.assert_allclose(back, g, rtol=1e-10, atol=1e-13)
    assert back[0] == g[0] and back[-1] == g[-1]                  # end points exact
    # any parameters give a strictly decreasing grid with the same end points
    wild = params_to_grid(PROCESS, jnp.asarray(np.random.default_rng(0).normal(0, 3, theta.shape)), _frame(PROCESS, g))
    assert np.all(np.diff(np.asarray(wild)) < 0) and wild[0] == g[0] and wild[-1] == g[-1]


SOLVER_CASES = {"dpm_solver++_3m": DPMSolverMultistep(3), "unipc_3": UniPC(3), "ddim": DDIM(),
                "deis_3": DEIS(3), "heun": Heun()}
GRAD_CASES = [(name, "t_min") for name in sorted(SOLVER_CASES)] + [("dpm_solver++_3m", "zero"),
                                                                    ("unipc_3", "zero")]


@pytest.mark.parametrize("name,final", GRAD_CASES)
def test_gradient_matches_finite_difference(name, final):
    """d loss / d theta through the compiled sampler equals a central difference in float64 (the grids
    ending at sigma = 0 exercise the special last step, whose unused regular branch must stay finite)."""
    solver = SOLVER_CASES[name]
    den = _mix().denoiser(PROCESS, "eps")
    x_T = _noise(8)
    g0 = np.asarray(make_grid("uniform_t", PROCESS, 5, final=final))
    target = x_T * 0.1 + 0.5                     # any fixed target: the gradient is what is tested
    loss, theta0 = make_grid_loss(den, PROCESS, solver, g0)
    theta0 = theta0 + jnp.asarray([0.1, -0.2, 0.05, 0.3, -0.1][:theta0.shape[0]])   # a generic point
    vg = jax.jit(jax.value_and_grad(loss))      # one compilation for both
    grad = np.asarray(vg(theta0, x_T, target)[1])
    eps = 1e-6
    fd = np.array([(float(vg(theta0.at[k].add(eps), x_T, target)[0])
                    - float(vg(theta0.at[k].add(-eps), x_T, target)[0])) / (2 * eps) for k in range(theta0.shape[0])])
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9 * np.abs(fd).max())


def _held_out_rmse(solver, grid, x_T, ref, den):
    x = sample(den, PROCESS, x_T, jnp.asarray(grid), solver=solver)
    return float(jnp.sqrt(jnp.mean((x - ref) ** 2)))


def test_learned_grid_beats_its_init_on_held_out_noise():
    mix = _mix(8)
    den = mix.denoiser(PROCESS, "eps")
    solver = DPMSolverMultistep(2)
    cal, held = _noise(128, 8, seed=1), _noise(256, 8, seed=2)
    res = learn_grid(den, PROCESS, solver, 5, cal, teacher_steps=64, steps=120, lr=0.05)
    assert res.init_name == "uniform_logsnr" and res.loss < 0.7 * res.loss_init
    g = res.grid
    assert g.shape == (6,) and np.all(np.diff(g) < 0)
    assert g[0] == PROCESS.t_max and g[-1] == PROCESS.t_min
    ref = mix.reference_ode_solution(PROCESS, held, g[0], g[-1])
    learned, init = (_held_out_rmse(solver, x, held, ref, den) for x in (g, res.init_grid))
    assert learned < 0.8 * init, (learned, init)
    assert res.history.shape == (120,) and res.compile_s > 0 and res.learn_s > 0


def test_soft_teacher_forcing_learns_a_grid_for_the_real_noise():
    """LD3's surrogate: the moved noises stay in their ball, and the grid (scored on the real noise) still
    beats its initialization on held-out noise."""
    from jaxdiff.solvers.learned_grid import _soft_teacher_forcing_run
    import optax
    mix = _mix(8)
    den = mix.denoiser(PROCESS, "eps")
    solver = DPMSolverMultistep(2)
    cal, held = _noise(128, 8, seed=1), _noise(64, 8, seed=2)
    # (a radius of 0.5 here, a sixth of |x_T|, lets the moved noises absorb the whole error: the surrogate
    # loss falls to 1e-4 and the grid learns nothing for the real noise -- LD3's own radius is tiny)
    res = learn_grid(den, PROCESS, solver, 5, cal, teacher_steps=32, steps=60, lr=0.05, soft_teacher_forcing=0.05)
    assert res.provenance["soft_teacher_forcing"] == {"radius": 0.05, "shift_lr": 12.0 / 5}
    loss_fn, _ = make_grid_loss(den, PROCESS, solver, res.init_grid)
    teacher = learn_grid.__globals__["teacher_solution"](den, PROCESS, cal, PROCESS.t_max, PROCESS.t_min, steps=32)
    theta = grid_to_params(PROCESS, res.grid)
    assert res.loss == pytest.approx(float(loss_fn(theta, cal, teacher)), rel=1e-6)   # scored on the real x_T
    ref = mix.reference_ode_solution(PROCESS, held, res.grid[0], res.grid[-1])
    learned, init = (_held_out_rmse(solver, x, held, ref, den) for x in (res.grid, res.init_grid))
    assert learned < 0.8 * init, (learned, init)
    # the loop itself: every moved noise within the radius, and the moves lower each sample's loss
    per_sample, _ = make_grid_loss(den, PROCESS, solver, res.init_grid, per_sample=True)
    run = jax.jit(_soft_teacher_forcing_run(per_sample, loss_fn, optax.adam(0.0), 3, 0.05, 2.4, jnp.float64))
    theta0 = grid_to_params(PROCESS, res.init_grid)
    moved_x = run(theta0, cal, teacher)[3]
    moved = np.asarray(moved_x - cal).reshape(len(cal), -1)
    assert np.max(np.linalg.norm(moved, axis=1)) <= 0.05 + 1e-12 and np.any(np.abs(moved) > 0)
    before, after = per_sample(theta0, cal, teacher), per_sample(theta0, moved_x, teacher)
    assert np.all(np.asarray(after) <= np.asarray(before) + 1e-15) and np.mean(after) < np.mean(before)


def test_best_init_picks_lowest_calibration_loss():
    den = _mix().denoiser(PROCESS, "eps")
    x_T = _noise(32)
    res = learn_grid(den, PROCESS, UniPC(3), 5, x_T, teacher=x_T * 0.5, steps=0,
                     init=["uniform_logsnr", "uniform_t", "xue"])
    assert res.init_name in ("uniform_logsnr", "uniform_t", "xue") and res.loss == res.loss_init


def test_steps_for_nfe():
    assert steps_for_nfe(UniPC(3), PROCESS, 7) == 7
    assert steps_for_nfe(Heun(), PROCESS, 8) == 4              # 2 evaluations a step on a t_min grid
    assert steps_for_nfe(Heun(), PROCESS, 7, final="zero") == 4  # none at sigma = 0
    with pytest.raises(ValueError, match="cannot make exactly"):
        steps_for_nfe(Heun(), PROCESS, 7)
    assert solver_registry_name(DPMSolverMultistep(3)) == "dpm_solver++"
    assert solver_registry_name(DPMSolverMultistep(2, prediction="noise")) == "dpm_solver"
    assert solver_registry_name(UniPC(2)) == "unipc"


@pytest.mark.filterwarnings("ignore:calibration set of")      # small sets on purpose; the warning is checked last
def test_bad_input():
    den = _mix().denoiser(PROCESS, "eps")
    with pytest.raises(ValueError, match="teacher needs more steps"):
        learn_grid(den, PROCESS, UniPC(3), 8, _noise(64), teacher_steps=8)
    with pytest.raises(ValueError, match="stochastic"):
        learn_grid(den, PROCESS, make_solver("ddpm"), 5, _noise(64))
    with pytest.raises(ValueError, match="unknown init"):
        learn_grid(den, PROCESS, UniPC(3), 5, _noise(64), init="bogus")
    with pytest.raises(ValueError, match="soft_teacher_forcing must be"):
        learn_grid(den, PROCESS, UniPC(3), 5, _noise(64), soft_teacher_forcing=-1.0)
    with pytest.raises(ValueError, match="batched"):
        learn_grid(den, PROCESS, UniPC(3), 5, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="init 'xue'"):
        learn_grid(den, PROCESS, Heun(), 8, _noise(64), init="xue")
    with pytest.warns(UserWarning, match="calibration set of 4 samples for 4 free grid points"):
        learn_grid(den, PROCESS, DDIM(), 5, _noise(4), teacher=_noise(4), steps=1)


def test_save_load_roundtrip_and_mismatch(tmp_path):
    den = _mix().denoiser(PROCESS, "eps")
    solver = UniPC(3)
    x_T = _noise(32)
    res = learn_grid(den, PROCESS, solver, 5, x_T, teacher=x_T * 0.5, steps=0, model="mixture-4x4")
    path = str(tmp_path / "grid.json")
    res.save(path)
    rec = json.load(open(path))
    assert rec["solver"]["name"] == "unipc" and rec["order"] == 3 and rec["nfe"] == 5
    assert rec["calibration_size"] == 32 and rec["model"] == "mixture-4x4" and rec["guidance_scale"] is None
    assert rec["teacher"] == "given" and len(rec["init_grid"]) == 6
    np.testing.assert_array_equal(load_grid(path, PROCESS, solver, 5), res.grid)
    np.testing.assert_array_equal(load_grid(path, PROCESS, "unipc", 5, model="mixture-4x4", guidance_scale=None),
                                  res.grid)
    with pytest.raises(ValueError, match="NFE: file 5, requested 6"):
        load_grid(path, PROCESS, solver, 6)
    with pytest.raises(ValueError, match="order file 3 requested 2"):
        load_grid(path, PROCESS, UniPC(2), 5)
    with pytest.raises(ValueError, match="solver: file 'UniPC', requested 'DPMSolverMultistep'"):
        load_grid(path, PROCESS, DPMSolverMultistep(3), 5)
    with pytest.raises(ValueError, match="process"):
        load_grid(path, make_process("vp_linear", beta_max=15.0), solver, 5)
    with pytest.raises(ValueError, match="model: file 'mixture-4x4', requested 'other'"):
        load_grid(path, PROCESS, solver, 5, model="other")
    with pytest.raises(ValueError, match="guidance scale"):
        load_grid(path, PROCESS, solver, 5, guidance_scale=3.0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"grid": [1.0, 0.5]}')
    with pytest.raises(ValueError, match="not a jaxdiff learned time grid"):
        load_grid(str(bad), PROCESS, solver, 5)
    with pytest.raises(ValueError, match="does not exist"):
        load_grid(str(tmp_path / "missing.json"), PROCESS, solver, 5)


def test_save_grid_direct_and_tree_hash(tmp_path):
    g = make_grid("uniform_t", PROCESS, 4)
    h = tree_hash({"w": np.ones((2, 3)), "b": np.zeros(3)})
    assert h.startswith("sha256:") and h != tree_hash({"w": np.ones((2, 3)), "b": np.ones(3)})
    save_grid(str(tmp_path / "g.json"), g, process=PROCESS, solver="ddim", nfe=4, model=h, note="by hand")
    np.testing.assert_array_equal(load_grid(str(tmp_path / "g.json"), PROCESS, "ddim", 4, model=h), np.asarray(g))
    with pytest.raises(ValueError, match="decrease"):
        save_grid(str(tmp_path / "x.json"), np.asarray(g)[::-1], process=PROCESS, solver="ddim", nfe=4)
