"""SeedSelect (jaxdiff.research.seedselect): the seed gradient through the compiled sampler against float64
finite differences on the analytic mixture, the segmented run against the one-piece run, the loss decreasing
on a tiny problem with early stop, the memory saved by rematerialisation, and bad input."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.analytic import GaussianMixture
from jaxdiff.noise import make_process
from jaxdiff.research.seedselect import SeedSelect, SeedSelectConfig, tail_states
from jaxdiff.sampling import SamplerSettings, SamplingModel
from jaxdiff.solvers import DDIM, DPMSolverMultistep, Heun, sample
from jaxdiff.timesteps import make_grid

PROCESS = make_process("vp_linear")
SHAPE = (2, 2, 1)                   # a 4-d "image"


@functools.lru_cache(maxsize=None)
def _mix():
    return GaussianMixture.random(jax.random.PRNGKey(3), 3, 4)


def _x_T(n=3, seed=5):
    return PROCESS.prior_sample(jax.random.PRNGKey(seed), (n,) + SHAPE, jnp.float64)


SOLVERS = {"ddim": DDIM(), "heun": Heun(), "dpm_solver++_2m": DPMSolverMultistep(2)}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_seed_gradient_matches_float64_finite_difference(name):
    """d/dx_T of a scalar of the sampler's output (and of the tail states the semantic loss reads), with the
    denoiser rematerialised as SeedSelect runs it, equals a central difference in float64."""
    solver = SOLVERS[name]
    den = jax.checkpoint(_mix().denoiser(PROCESS, "eps"))
    grid = jnp.asarray(make_grid("uniform_t", PROCESS, 4))
    c = jnp.linspace(-1.0, 1.5, 4 * 3).reshape((3,) + SHAPE)

    def scalar(x_T):
        states = tail_states(den, PROCESS, x_T, grid, 2, solver=solver)
        return jnp.sum(jnp.sin(states[-1]) * c) + 0.3 * jnp.sum(states[0] ** 2)

    vg = jax.jit(jax.value_and_grad(scalar))
    x = _x_T()
    g = np.asarray(vg(x)[1])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-3
    rng = np.random.default_rng(0)
    eps = 1e-6
    for _ in range(3):                                        # directional derivatives
        v = jnp.asarray(rng.normal(size=x.shape))
        fd = (float(vg(x + eps * v)[0]) - float(vg(x - eps * v)[0])) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(g * v)), fd, rtol=1e-6)


def test_tail_states_equal_the_one_piece_run_for_one_step_solvers():
    den = _mix().denoiser(PROCESS, "eps")
    grid = jnp.asarray(make_grid("uniform_t", PROCESS, 4))
    x = _x_T()
    states = tail_states(den, PROCESS, x, grid, 2, solver=Heun())
    np.testing.assert_allclose(np.asarray(states[-1]), np.asarray(sample(den, PROCESS, x, grid, solver=Heun())),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(states[0]), np.asarray(sample(den, PROCESS, x, grid[:4], solver=Heun())),
                               rtol=1e-12, atol=1e-12)


def _model(mix=None, num_classes=None):
    mix = mix or _mix()
    inv = lambda mt: mt / PROCESS.num_train_steps + 1.0 / PROCESS.log_alphas.shape[0]    # model time -> t

    def apply(params, x, mt, labels=None):
        return mix.prediction(x, inv(mt), PROCESS, "eps") * params["scale"]
    return SamplingModel(apply=apply, params={"scale": jnp.float32(1.0)}, process=PROCESS, prediction="eps",
                         shape=SHAPE, num_classes=num_classes)


def _semantic(images):                       # a fixed smooth embedding (B, 2, 2, 1) -> (B, 3)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), images.dtype)
    return jnp.tanh(images.reshape(images.shape[0], -1) @ w) + 0.1


def test_loss_decreases_and_early_stop_freezes_done_seeds():
    mix = _mix()
    model = _model(mix)
    refs = np.asarray(mix.means[0]).reshape((1,) + SHAPE) + 0.05 * np.random.default_rng(2).normal(size=(5,) + SHAPE)
    refs = np.clip(refs, -1, 1).astype(np.float32)
    settings = SamplerSettings(solver="ddim", grid="uniform_t", steps=4)
    cfg = SeedSelectConfig(iterations=8, lr=0.1)
    x = jnp.asarray(PROCESS.prior_sample(jax.random.PRNGKey(7), (4,) + SHAPE), jnp.float32)
    # done: the sample is closer to the mean reference than the median start sample (threshold set below,
    # before the iteration is first traced; one object, so one compilation for both runs)
    target = jnp.asarray(refs).mean(0)
    dist = lambda images: jnp.mean((images - target) ** 2, axis=(1, 2, 3))
    threshold = []
    ss = SeedSelect(model, settings, refs, semantic_fn=_semantic, config=cfg,
                    done_fn=lambda images: dist(images) < threshold[0])
    start_dist = np.asarray(jax.jit(lambda x: dist(ss.losses(x)[1]["images"]))(x))
    threshold.append(float(np.median(start_dist)))

    res = ss.run(x, early_stop=False)         # every seed takes every update
    assert res.losses.shape == (9, 4) and np.all(np.isfinite(res.losses))
    assert np.all(res.losses[-1] < res.losses[0])                          # every seed improves
    assert res.seeds.shape == x.shape and res.images.shape == (4,) + SHAPE
    np.testing.assert_array_equal(res.done, np.asarray(dist(jnp.asarray(res.images))) < threshold[0])

    r2 = ss.run(x)                            # early stop
    assert r2.done.sum() > 2 and np.all(r2.iterations[r2.done] < 8)
    np.testing.assert_array_equal(np.asarray(dist(jnp.asarray(r2.images)) < threshold[0]), r2.done)
    for b in np.flatnonzero(r2.done):              # no update after the iteration it was found done
        assert np.all(np.isnan(r2.losses[r2.iterations[b] + 1:, b]))
        assert np.isfinite(r2.losses[r2.iterations[b], b])
    np.testing.assert_array_equal(r2.iterations == 0, start_dist < threshold[0])
    # the first pass is the same with and without early stop (the seeds of a batch are independent)
    np.testing.assert_array_equal(res.iterations, r2.iterations)
    np.testing.assert_allclose(res.losses[0], r2.losses[0], rtol=1e-6)


def test_remat_bounds_the_backward_memory():
    """XLA's compiled temporary memory of the seed gradient through 20 steps of a wide denoiser: the
    rematerialised scan keeps only each step's input state."""
    w1 = jnp.asarray(np.random.default_rng(0).normal(size=(4, 512)) * 0.1, jnp.float32)
    w2 = jnp.asarray(np.random.default_rng(1).normal(size=(512, 4)) * 0.1, jnp.float32)

    def apply(params, x, mt, labels=None):
        h = jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + mt[:, None] * 1e-3)
        return (h @ w2).reshape(x.shape)
    model = SamplingModel(apply=apply, params={}, process=PROCESS, prediction="eps", shape=SHAPE)
    refs = np.zeros((2,) + SHAPE, np.float32)
    x = jnp.zeros((64,) + SHAPE, jnp.float32)
    temp = {}
    for remat in (False, True):
        ss = SeedSelect(model, SamplerSettings(solver="ddim", grid="uniform_t", steps=20), refs,
                        semantic_fn=_semantic, config=SeedSelectConfig(remat=remat))
        grad = jax.jit(jax.grad(lambda x: jnp.sum(ss.losses(x)[0])))
        temp[remat] = grad.lower(x).compile().memory_analysis().temp_size_in_bytes
    # without remat the scan stacks (20 steps x 64 x 512) activations (2.6 MB float32) and more
    assert temp[False] > 20 * 64 * 512 * 4
    assert temp[True] < temp[False] / 3


def test_bad_input_is_rejected_before_any_work():
    model = _model()
    settings = SamplerSettings(solver="ddim", grid="uniform_t", steps=4)
    refs = np.zeros((3,) + SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"reference images must have shape \(k, 2, 2, 1\)"):
        SeedSelect(model, settings, np.zeros((3, 4, 4, 1)), semantic_fn=_semantic)
    with pytest.raises(ValueError, match="reference images must have shape"):
        SeedSelect(model, settings, np.zeros((0,) + SHAPE), semantic_fn=_semantic)
    with pytest.raises(ValueError, match="reference images must have shape"):
        SeedSelect(model, settings, np.zeros(SHAPE), semantic_fn=_semantic)
    with pytest.raises(ValueError, match="super-resolution stages"):
        SeedSelect(dataclasses.replace(model, low_res_shape=(1, 1, 1)), settings, refs, semantic_fn=_semantic)
    with pytest.raises(ValueError, match="label given but the model is unconditional"):
        SeedSelect(model, settings, refs, semantic_fn=_semantic, label=1)
    with pytest.raises(ValueError, match=r"needs label in \[0, 10\)"):
        SeedSelect(_model(num_classes=10), settings, refs, semantic_fn=_semantic)
    with pytest.raises(ValueError, match="need at least 5 sampler steps"):
        SeedSelect(model, settings, refs, semantic_fn=_semantic, config=SeedSelectConfig(semantic_weights=(1,) * 5))
    with pytest.raises(ValueError, match="semantic_fn must map"):
        SeedSelect(model, settings, refs, semantic_fn=lambda im: im)
    with pytest.raises(ValueError, match="stochastic: pass a PRNG key"):
        SeedSelect(model, SamplerSettings(solver="ddpm", grid="uniform_t", steps=4), refs, semantic_fn=_semantic)
    with pytest.raises(ValueError, match="iterations must be"):
        SeedSelectConfig(iterations=-1)
    with pytest.raises(ValueError, match="semantic_weights"):
        SeedSelectConfig(semantic_weights=())
    ss = SeedSelect(model, settings, refs, semantic_fn=_semantic, config=SeedSelectConfig(iterations=1))
    with pytest.raises(ValueError, match=r"seeds must have shape \(B, 2, 2, 1\)"):
        ss.run(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="reference images must have shape"):
        ss.with_references(np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        ss.with_references(np.full((3,) + SHAPE, np.nan))
