"""Distribution-guided debiasing (jaxdiff.research.debias) and the UNet's h-space access it rests on."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.analytic import GaussianMixture
from jaxdiff.nn import UNet, UNetConfig, timestep_embedding
from jaxdiff.nn.functional import make_apply, split_model
from jaxdiff.noise import make_process
from jaxdiff.research import debias as db
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel
from jaxdiff.solvers import sample

TINY = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                  down_attention=(None, None), mid_attention=None, norm_num_groups=4)


def _perturbed_unet(dtype=jnp.float32, seed=0):
    """A tiny UNet with every parameter moved off its init (zero-init convs and norm scales included)."""
    m = UNet(TINY, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
    g, params, rest = split_model(m)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    leaves = [np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(p.dtype) for p in leaves]
    nnx.update(m, jax.tree.unflatten(tree, leaves))
    return m


_call = nnx.jit(lambda m, x, t, **kw: m(x, t, **kw), static_argnames=("return_features", "mid_hook"))


@nnx.jit
def _bottleneck_by_hand(m, x, t):
    """The UNet's mid-block output recomputed from its own blocks (no hook involved)."""
    temb = m.time_embedding(timestep_embedding(t, TINY.block_out_channels[0], flip_sin_to_cos=True,
                                               freq_shift=0.0))
    h = m.conv_in(x)
    for blk in m.down_blocks:
        h, _ = blk(h, temb, None)
    return m.mid_block(h, temb, None)


def _adp(dim, heads, attributes=("a", "b"), seed=0, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return db.ADP(kernels=scale * jax.random.normal(k1, (heads, dim, len(attributes))),
                  biases=0.1 * jax.random.normal(k2, (heads, len(attributes))),
                  times=jnp.linspace(1.0, 0.1, heads), attributes=tuple(attributes))


# ----------------------------------------------------------------------------------------------------
# h-space access
# ----------------------------------------------------------------------------------------------------

def test_returned_features_are_the_bottleneck_and_default_output_is_unchanged():
    m = _perturbed_unet()
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    t = jnp.array([10.0, 500.0])
    out = _call(m, x, t)
    out2, h = _call(m, x, t, return_features=True)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
    assert h.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(h), np.asarray(_bottleneck_by_hand(m, x, t)), rtol=1e-6, atol=1e-6)
    # an identity hook leaves the output alone; a real edit of h changes it; a wrong shape is an error
    np.testing.assert_array_equal(np.asarray(_call(m, x, t, mid_hook=lambda h: h)), np.asarray(out))
    assert float(jnp.abs(_call(m, x, t, mid_hook=lambda h: h + 1.0) - out).max()) > 1e-3
    with pytest.raises(ValueError, match="mid_hook must keep the bottleneck's shape"):
        _call(m, x, t, mid_hook=lambda h: h[:, :2])


def test_apply_passes_hooks_and_feature_shape():
    m = _perturbed_unet()
    g, p, r = split_model(m)
    apply, params = make_apply(g, r), nnx.to_pure_dict(p)
    x = jnp.ones((1, 8, 8, 1))
    out, h = jax.jit(lambda p, x: apply(p, x, jnp.array([3.0]), None, return_features=True))(params, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(apply)(params, x, jnp.array([3.0]))))
    assert h.shape == (1, 4, 4, 16)
    sm = SamplingModel(apply=apply, params=params, process=make_process("vp_cosine"), prediction="eps",
                       shape=(8, 8, 1))
    assert db.feature_shape(sm) == (4, 4, 16)


# ----------------------------------------------------------------------------------------------------
# gradients against float64 finite differences
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["distribution", pytest.param("sample", marks=pytest.mark.slow)])
def test_guidance_loss_gradient_wrt_sample_matches_float64_finite_difference(kind):
    """Through a float64 UNet (whose GroupNorm statistics are float32 by design, hence rtol 1e-3 and a
    larger step), and exactly (rtol 1e-7) with respect to h itself, where the guidance step acts."""
    m = _perturbed_unet(jnp.float64)
    adp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _adp(4 * 4 * 16, 3, seed=1, scale=0.3))
    p_ref = jnp.array([0.3, 0.7])
    t = jnp.array([200.0, 200.0, 200.0])

    def loss_h(h):
        return db.guidance_loss(adp, 1, h, p_ref, kind, temperature=2.0)

    @nnx.jit
    def loss_and_grad(m, x):
        return jax.value_and_grad(lambda x: loss_h(m(x, t, return_features=True)[1]))(x)

    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1), jnp.float64)
    v = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    val, g = loss_and_grad(m, x)
    eps = 1e-3
    fd = (loss_and_grad(m, x + eps * v)[0] - loss_and_grad(m, x - eps * v)[0]) / (2 * eps)
    assert float(jnp.abs(val)) > 0 and abs(float(fd)) > 1e-6
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-3)
    h = jax.random.normal(jax.random.key(2), (3, 4, 4, 16), jnp.float64)
    u = jax.random.normal(jax.random.key(3), h.shape, jnp.float64)
    fd_h = (loss_h(h + 1e-6 * u) - loss_h(h - 1e-6 * u)) / 2e-6
    np.testing.assert_allclose(float(jnp.vdot(jax.grad(loss_h)(h), u)), float(fd_h), rtol=1e-7)


def _mixture_setup():
    process = make_process("vp_cosine")
    mix = GaussianMixture(jnp.array([0.8, 0.2]), jnp.array([[-1.5, 0.0], [1.5, 0.0]]),
                          jnp.full((2, 2), 0.09))
    grid = jnp.linspace(process.t_max, process.t_min, 9)

    def features_denoiser(x, t, hook):            # h-space = x itself; the "decoder" is the exact denoiser
        return mix.prediction(hook(x), t, process, "eps")

    # one head per grid time, logit of "right" ~ 3 x_0 (a fixed, sensible attribute direction)
    w = jnp.broadcast_to(jnp.array([[-1.5, 1.5], [0.0, 0.0]]), (8, 2, 2))
    adp = db.ADP(kernels=w, biases=jnp.zeros((8, 2)), times=grid[:-1], attributes=("left", "right"))
    return process, mix, grid, features_denoiser, adp


@pytest.mark.parametrize("kind,solver", [("distribution", "ddim"), ("sample", "ddim"),
                                         pytest.param("distribution", "dpm_solver++", marks=pytest.mark.slow)])
def test_sampler_output_gradient_wrt_scale_matches_float64_finite_difference(kind, solver):
    """d(sampler output)/d(guidance scale) through the whole solver loop on the exact mixture denoiser."""
    process, mix, grid, fden, adp = _mixture_setup()
    guidance = db.HGuidance(kind=kind, temperature=1.0)
    x_T = jax.random.normal(jax.random.key(0), (6, 2), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
    gp0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                       db.guidance_params(adp, [0.5, 0.5], 1.0, process=process))

    def out(scale):
        x = sample(db.guided_denoiser(fden, guidance, {**gp0, "scale": scale}), process, x_T, grid,
                   solver=solver, prediction="eps")
        return jnp.sum(w * x)

    s0, eps = 0.7, 1e-5
    g = jax.jit(jax.grad(out))(jnp.asarray(s0, jnp.float64))
    plus, minus = jax.jit(jax.vmap(out))(jnp.array([s0 + eps, s0 - eps], jnp.float64))
    fd = (plus - minus) / (2 * eps)
    assert abs(float(fd)) > 1e-4
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-6)


def test_distribution_guidance_balances_a_biased_mixture():
    """On the exact 80/20 mixture, distribution guidance toward 50/50 moves the share of samples that end
    on the minority side from ~0.2 to near 0.5."""
    process, mix, grid, fden, adp = _mixture_setup()
    x_T = jax.random.normal(jax.random.key(5), (400, 2))

    gp0 = db.guidance_params(adp, [0.5, 0.5], 1.0, process=process)

    @jax.jit
    def share(scale):
        x = sample(db.guided_denoiser(fden, db.HGuidance(temperature=1.0), {**gp0, "scale": scale}), process, x_T,
                   grid, solver="ddim", prediction="eps")
        return jnp.mean(x[:, 0] > 0)

    base, guided = float(share(0.0)), float(share(3.0))
    assert 0.1 < base < 0.3
    assert abs(guided - 0.5) < 0.1 and abs(guided - 0.5) < abs(base - 0.5) - 0.15


# ----------------------------------------------------------------------------------------------------
# the ADP, the sampler path and the errors
# ----------------------------------------------------------------------------------------------------

def test_train_adp_reads_raw_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(np.int32)
    direction = rng.normal(size=(3, 12))
    feats = rng.normal(size=(3, 200, 12)) * 5 + 40 + 6 * (2 * labels[None, :, None] - 1) * direction[:, None]
    adp = db.train_adp(feats, labels, np.array([0.9, 0.5, 0.1]), ("x", "y"), steps=200)
    assert adp.kernels.shape == (3, 12, 2)
    assert np.all(db.adp_accuracy(adp, feats, labels) > 0.9)
    assert np.all(db.adp_accuracy(adp, feats, 1 - labels) < 0.1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        db.train_adp(feats, labels + 1, np.array([0.9, 0.5, 0.1]), ("x", "y"))


def test_guided_sampler_records_trains_and_guides_tiny_unet():
    m = _perturbed_unet()
    g, p, r = split_model(m)
    sm = SamplingModel(apply=make_apply(g, r), params=nnx.to_pure_dict(p), process=make_process("vp_cosine"),
                       prediction="x0", shape=(8, 8, 1))
    settings = SamplerSettings(solver="ddim", grid="uniform_t", steps=4)
    images, feats, times = db.record_features(sm, settings, 10, 0, 6)
    assert images.shape == (10, 8, 8, 1) and feats.shape == (4, 10, 4, 4, 16) and np.all(np.diff(times) < 0)
    labels = (images.mean((1, 2, 3)) > np.median(images.mean((1, 2, 3)))).astype(np.int32)
    adp = db.train_adp(feats, labels, times, ("dark", "bright"), steps=50)
    guided = db.guided_sampling_model(sm, db.HGuidance(), adp, {"dark": 0.5, "bright": 0.5}, 0.0)
    sampler = Sampler(guided, settings)
    ref = sampler(guided.params, None, jax.random.key(0), num=10)          # scale 0: the unguided samples
    size = float(np.abs(ref).max())
    np.testing.assert_allclose(images, ref, atol=1e-5 * size)   # recording does not change the samples
    pushed = sampler(db.with_guidance(guided, [0.05, 0.95], 50.0), None, jax.random.key(0), num=10)
    assert np.abs(pushed - ref).max() > 1e-3 * size             # same program, another target and scale
    # an ADP for another resolution / model is refused before sampling
    with pytest.raises(ValueError, match="trained for another model or resolution"):
        db.guided_sampling_model(sm, db.HGuidance(), _adp(100, 4), [0.5, 0.5], 1.0)


@pytest.mark.parametrize("reference,match", [
    ({"a": 0.6, "b": 0.6}, "must sum to one"),
    ([0.2, 0.3], "must sum to one"),
    ({"a": 0.5, "c": 0.5}, r"unknown attributes \['c'\]"),
    ({"a": 1.0}, r"no probability for attributes \['b'\]"),
    ([0.5, 0.25, 0.25], "must have 2 entries"),
    ([1.0, 0.0], "must be finite and > 0"),
])
def test_bad_reference_distribution_is_a_clear_error(reference, match):
    with pytest.raises(ValueError, match=match):
        db.reference_distribution(("a", "b"), reference)
    with pytest.raises(ValueError, match=match):
        db.guidance_params(_adp(4, 2), reference, 1.0)


def test_bad_guidance_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown guidance kind 'batch'"):
        db.HGuidance(kind="batch")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        db.HGuidance(temperature=0.0)
    with pytest.raises(ValueError, match="constant alpha"):
        db.step_weights(make_process("ve"), np.array([0.5]), 0.05)
    assert np.allclose(db.step_weights(make_process("ve"), np.array([0.5]), 0.0), 1.0)


def test_quota_targets_follow_the_reference():
    t = np.asarray(db.quota_targets(jnp.array([0.3, 0.7]), 10))
    assert t.tolist() == [0] * 3 + [1] * 7
    assert np.bincount(np.asarray(db.quota_targets(jnp.array([0.2, 0.5, 0.3]), 100)), minlength=3).tolist() == [20, 50, 30]


def test_pseudo_labels_from_the_digits_classifier_and_stroke_thickness():
    from jaxdiff.data.digits import load_digits_arrays
    images, labels = load_digits_arrays("test", 16)
    keep = np.isin(labels, (0, 1))
    x = images[keep].astype(np.float32) / 127.5 - 1.0
    pseudo, conf = db.digit_class_labels(x, (0, 1))
    assert np.mean(pseudo == labels[keep]) > 0.95 and np.median(conf) > 0.9
    with pytest.raises(ValueError, match="at least two distinct digits"):
        db.digit_class_labels(x, (3, 3))
    thin = -np.ones((2, 16, 16, 1), np.float32)
    thin[:, 2:14, 7:8] = 1.0                     # a 1-pixel stroke
    thick = -np.ones((2, 16, 16, 1), np.float32)
    thick[:, 2:14, 5:10] = 1.0                   # a 5-pixel stroke
    assert db.stroke_thickness_labels(np.concatenate([thin, thick]), 1.5).tolist() == [0, 0, 1, 1]
