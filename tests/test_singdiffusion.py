"""SingDiffusion (jaxdiff.research.singdiffusion): the first step from t = 1 composes with every solver and
removes the start-noise bias on exact (analytic) Gaussian data; the module's objective is minimised by the
class mean; files and mismatched models fail clearly."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sample
from jaxdiff.analytic import GaussianMixture
from jaxdiff.noise import VPLinear, make_process
from jaxdiff.research.singdiffusion import (ModuleSpec, SingDiffusionModule, build_module, check_compatible, fit,
                                            load_module, module_loss, module_prediction, save_module,
                                            singdiffusion_start, train_module, with_singdiffusion)
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel

SHAPE = (4, 4, 1)
MEANS = np.array([-0.7, 0.6])         # class c: every pixel ~ N(MEANS[c], STD^2), independent
STD = 0.3
# a VP process whose terminal SNR is far from zero (alpha(1) = 0.28), so the start-noise bias is large
PROCESS = VPLinear(beta_min=0.1, beta_max=5.0)


def class_mixtures():
    d = int(np.prod(SHAPE))
    return [GaussianMixture(jnp.ones((1,)), jnp.full((1, d), m), jnp.full((1, d), STD ** 2)) for m in MEANS]


def exact_model() -> SamplingModel:
    """A class-conditional model whose network is the exact x0-denoiser of the two class Gaussians."""
    mixes = class_mixtures()

    def apply(params, x, model_time, labels):
        t = model_time / PROCESS.time_scale
        preds = [m.x0_prediction(x.reshape(len(x), -1), t, PROCESS).reshape(x.shape) for m in mixes]
        return jnp.where((labels == 0)[:, None, None, None], preds[0], preds[1])
    return SamplingModel(apply=apply, params={}, process=PROCESS, prediction="x0", shape=SHAPE, num_classes=2)


def optimal_module() -> SingDiffusionModule:
    """The module at its optimum E[x0 | c] (the class mean, whatever x_1), in the module's interface."""
    def apply(params, x1, labels):
        return jnp.broadcast_to(params["mean"][labels][:, None, None, None], x1.shape).astype(jnp.float32)
    return SingDiffusionModule(ModuleSpec(SHAPE, 2, data="gauss"), apply, {"mean": jnp.asarray(MEANS)})


SOLVERS = [("ddim", {}), ("heun", {}), ("dpm_solver++", {"order": 2}),
           pytest.param("euler", {}, marks=pytest.mark.slow), pytest.param("ipndm", {}, marks=pytest.mark.slow),
           pytest.param("unipc", {"order": 3}, marks=pytest.mark.slow),
           pytest.param("deis", {}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("solver,kwargs", SOLVERS)
def test_first_step_removes_start_bias_with_every_solver(solver, kwargs):
    # Gaussian data and an exact denoiser make every solver an affine map of x_T, so the mean of the samples
    # is the sample drawn from the mean start E[x_T] = 0 (no sampling noise in this test).
    labels = np.array([0, 1], np.int32)
    zeros = np.zeros((2,) + SHAPE, np.float32)
    settings = SamplerSettings(solver=solver, solver_kwargs=kwargs, grid="uniform_logsnr", steps=12)
    base = Sampler(exact_model(), settings)
    plugged = Sampler(with_singdiffusion(exact_model(), optimal_module(), data="gauss"), settings)
    key = jax.random.key(0)
    err_base = np.abs(base(base.model.params, labels, key, x_T=zeros).mean((1, 2, 3)) - MEANS)
    err_plug = np.abs(plugged(plugged.model.params, labels, key, x_T=zeros).mean((1, 2, 3)) - MEANS)
    # the exact flow from zero-mean noise ends near m - std * alpha_T m / sqrt(alpha_T^2 std^2 + sigma_T^2)
    # (12 steps of a solver: within 25%)
    a, s = float(PROCESS.alpha(1.0)), float(PROCESS.sigma(1.0))
    np.testing.assert_allclose(err_base, np.abs(MEANS) * STD * a / np.hypot(a * STD, s), rtol=0.25)
    assert np.all(err_plug < 0.05 * err_base), (err_plug, err_base)


def test_start_with_solver_driver_matches_sampler():
    # the same first step for callers of jaxdiff.sample (any grid's first time), equal to the Sampler's
    model, module = exact_model(), optimal_module()
    x_T = jax.random.normal(jax.random.key(1), (4,) + SHAPE)
    labels = jnp.array([0, 1, 0, 1])
    grid = jnp.linspace(0.8, PROCESS.t_min, 9)         # a grid that starts below t = 1
    x0 = singdiffusion_start(module, PROCESS, x_T, grid[0], labels)
    np.testing.assert_allclose(x0, PROCESS.alpha(0.8) * MEANS[np.array(labels)][:, None, None, None]
                               + PROCESS.sigma(0.8) * x_T, rtol=1e-6, atol=1e-6)
    den = lambda x, t, y: model.apply({}, x, PROCESS.model_time(t), y)
    out = sample(den, PROCESS, x0, grid, solver="unipc", prediction="x0", cond=labels)
    sampler = Sampler(with_singdiffusion(model, module), SamplerSettings(solver="unipc"), grid=np.asarray(grid))
    got = sampler(sampler.model.params, np.asarray(labels), jax.random.key(0), x_T=np.asarray(x_T))
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4)


def test_objective_is_minimised_by_the_class_mean():
    # closed form: E||f - x0||^2 = E||x0 - m_c||^2 + ||f - m_c||^2 per class (x_1 independent of x0), so the
    # gradient vanishes at the class means and the excess loss of f = m_c + delta is mean(delta^2)
    key = jax.random.key(0)
    x0 = jnp.concatenate([m.sample(k, 64) for m, k in zip(class_mixtures(), jax.random.split(key))])
    x0 = x0.reshape((128,) + SHAPE)
    labels = jnp.repeat(jnp.arange(2), 64)
    means = jnp.stack([x0[:64].mean(0), x0[64:].mean(0)])

    def loss(table, k=jax.random.key(3)):
        return jnp.mean(module_loss(lambda x1, t: table[labels] + 0 * x1, x0, k))
    g = jax.grad(loss)(means)
    np.testing.assert_allclose(g, 0, atol=1e-7)
    delta = 0.1 * jax.random.normal(jax.random.key(4), means.shape)
    np.testing.assert_allclose(loss(means + delta) - loss(means), jnp.mean(delta ** 2), rtol=1e-5)   # float32 loss
    # and the library's training loop reaches it (a per-class table as the "network")
    apply = lambda p, x, t, y, k=None: p["table"][y] + 0 * x
    params, losses = fit(apply, {"table": jnp.zeros_like(means)}, module_loss, np.asarray(x0), np.asarray(labels),
                         steps=300, batch=128, lr=0.05, warmup=10, ema_decay=0.0)
    np.testing.assert_allclose(params["table"], means, atol=0.02)
    # the limit the module estimates is the analytic posterior mean at alpha -> 0: the (class) data mean
    ztsnr = make_process("vp_scaled_linear", zero_terminal_snr=True)
    for mix, m in zip(class_mixtures(), MEANS):
        x = jax.random.normal(jax.random.key(5), (8, 16))
        np.testing.assert_allclose(mix.x0_prediction(x, 1.0, ztsnr), m, atol=1e-3)


def test_module_file_roundtrip(tmp_path):
    spec = ModuleSpec((8, 8, 1), 3, class_null=True, data="d", channels=(8,))
    fresh = build_module(spec, seed=0)
    module = dataclasses.replace(fresh, params=jax.tree.map(
        lambda p: p + 0.01 * jax.random.normal(jax.random.key(p.size), p.shape), fresh.params))
    save_module(module, tmp_path / "m.npz")
    back = load_module(tmp_path / "m.npz")
    assert back.spec == spec
    x1, labels = jax.random.normal(jax.random.key(0), (3, 8, 8, 1)), jnp.arange(3)
    apply = jax.jit(back.apply)          # the same network: one compilation for both parameter sets
    np.testing.assert_allclose(apply(back.params, x1, labels), apply(module.params, x1, labels), rtol=1e-6, atol=1e-6)
    assert not np.allclose(apply(back.params, x1, labels), apply(fresh.params, x1, labels), atol=1e-3)


def test_mismatched_module_fails_clearly(tmp_path):
    module = optimal_module()
    model = exact_model()
    with pytest.raises(ValueError, match=r"trained for samples of shape \(4, 4, 1\).*not \(8, 8, 1\)"):
        with_singdiffusion(dataclasses.replace(model, shape=(8, 8, 1)), module)
    with pytest.raises(ValueError, match="num_classes=2, not 10"):
        with_singdiffusion(dataclasses.replace(model, num_classes=10), module)
    with pytest.raises(ValueError, match="trained on data 'gauss', not 'digits'"):
        with_singdiffusion(model, module, data="digits")
    with pytest.raises(ValueError, match="null class"):
        check_compatible(module, model, guidance_scale=3.0)
    with pytest.raises(ValueError, match="null class"):
        singdiffusion_start(module, PROCESS, jnp.zeros((2,) + SHAPE), 1.0, jnp.zeros((2,), int), guidance_scale=2.0)
    with pytest.raises(ValueError, match="already has a start step"):
        with_singdiffusion(with_singdiffusion(model, module), module)
    with pytest.raises(ValueError, match=r"trained for samples of shape"):
        singdiffusion_start(module, PROCESS, jnp.zeros((2, 8, 8, 1)), 1.0, jnp.zeros((2,), int))
    with pytest.raises(ValueError, match=r"images must be \(N, 4, 4, 1\)"):
        train_module(model, np.zeros((5, 8, 8, 1)), np.zeros(5, int))
    with pytest.raises(ValueError, match="pass labels exactly when"):
        train_module(model, np.zeros((5,) + SHAPE))
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="not a SingDiffusion module file"):
        load_module(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="no SingDiffusion module file"):
        load_module(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="not divisible"):
        ModuleSpec((6, 6, 1), channels=(8, 16, 32))


def test_guided_module_prediction_is_the_official_normalised_combination():
    table = jnp.asarray([-0.7, 0.6, 0.1])              # classes 0, 1 and the null class 2
    module = dataclasses.replace(optimal_module(), spec=ModuleSpec(SHAPE, 2, class_null=True), params={"mean": table})
    x1, labels = jnp.zeros((2,) + SHAPE), jnp.array([0, 1])
    g = 4.0
    got = module_prediction(module, module.params, x1, labels, guidance_scale=g)
    want = (table[2] + g * (table[labels] - table[2])) / g
    np.testing.assert_allclose(got[:, 0, 0, 0], want, rtol=1e-6)
    np.testing.assert_allclose(module_prediction(module, module.params, x1, labels, guidance_scale=1.0)[:, 0, 0, 0],
                               table[labels], rtol=1e-6)        # g <= 1: the conditional branch alone, as official
