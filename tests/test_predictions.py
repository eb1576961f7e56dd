"""Prediction conversions, EDM preconditioning, guidance and thresholding."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.noise import make_process
from jaxdiff.predictions import (KINDS, cfg_combine, classifier_free_guidance, convert, dynamic_threshold,
                                 edm_coefficients, edm_denoiser, from_x0_eps, static_threshold, to_x0_eps)

PROCESSES = ["vp_linear", "vp_continuous_cosine", "ve", "edm", "flow"]


def _state(name, b=6, d=5):
    p = make_process(name)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.normal(k1, (b, d))
    eps = jax.random.normal(k2, (b, d))
    t = jax.random.uniform(k3, (b,), minval=p.t_min, maxval=p.t_max * 0.99)
    return p, x0, eps, t, p.q_sample(x0, t, eps)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(name, kind):
    p, x0, eps, t, x = _state(name)
    pred = from_x0_eps(x0, eps, kind, x, t, p)
    x0_back, eps_back = to_x0_eps(pred, kind, x, t, p)
    np.testing.assert_allclose(x0_back, x0, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(eps_back, eps, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", PROCESSES)
def test_convert_between_all_pairs(name):
    p, x0, eps, t, x = _state(name)
    for a, b in itertools.product(KINDS, KINDS):
        got = convert(from_x0_eps(x0, eps, a, x, t, p), a, b, x, t, p)
        np.testing.assert_allclose(got, from_x0_eps(x0, eps, b, x, t, p), rtol=1e-7, atol=1e-7)


def test_definitions():
    p, x0, eps, t, x = _state("vp_linear")
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    v = from_x0_eps(x0, eps, "v", x, t, p)
    np.testing.assert_allclose(v, a * eps - s * x0, rtol=1e-12)
    np.testing.assert_allclose(a * v + s * x, eps, rtol=1e-10, atol=1e-12)        # eps = alpha v + sigma x
    np.testing.assert_allclose(from_x0_eps(x0, eps, "score", x, t, p), -eps / s, rtol=1e-12)
    pf, x0f, epsf, tf, xf = _state("flow")
    np.testing.assert_allclose(from_x0_eps(x0f, epsf, "flow", xf, tf, pf), epsf - x0f, rtol=1e-12)


@pytest.mark.parametrize("name", ["vp_continuous_linear", "vp_linear", "edm", "ve"])
def test_flow_velocity_is_time_derivative_of_q_sample(name):
    p, x0, eps, t, x = _state(name)
    h = 1e-6 * (p.t_max - p.t_min)
    fd = (p.q_sample(x0, t + h, eps) - p.q_sample(x0, t - h, eps)) / (2 * h)
    np.testing.assert_allclose(from_x0_eps(x0, eps, "flow", x, t, p), fd, rtol=1e-6, atol=1e-6)


def test_edm_coefficients():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(jnp.float64(sd), sd)
    assert float(c_skip) == pytest.approx(0.5)
    assert float(c_out) == pytest.approx(sd / np.sqrt(2))
    assert float(c_in) == pytest.approx(1 / (sd * np.sqrt(2)))
    assert float(c_noise) == pytest.approx(np.log(sd) / 4)
    # c_in normalises the input: Var(c_in x) = 1 for x = y + sigma n, Var(y) = sd^2
    for sig in (0.01, 1.0, 80.0):
        c_skip, c_out, c_in, _ = edm_coefficients(jnp.float64(sig), sd)
        assert float(c_in ** 2 * (sd ** 2 + sig ** 2)) == pytest.approx(1.0)
        # the effective training target (y - c_skip x)/c_out has unit variance
        assert float((sd ** 2 * (1 - c_skip) ** 2 + c_skip ** 2 * sig ** 2) / c_out ** 2) == pytest.approx(1.0)


def test_edm_denoiser_recovers_exact_gaussian_denoiser():
    """With F chosen as the exact residual of a Gaussian data model, D equals the posterior mean, for EDM and for
    a VP process (alpha != 1, EDM's x/alpha rescaling)."""
    sd = 0.5
    for name in ("edm", "vp_continuous_linear"):
        p, x0, eps, t, x = _state(name)

        def net(x_in, c_noise):
            sig = jnp.exp(4 * c_noise)[:, None]
            c_skip, c_out, c_in, _ = edm_coefficients(sig, sd)
            x_hat = x_in / c_in
            exact = sd ** 2 / (sd ** 2 + sig ** 2) * x_hat                   # E[y | y + sig n] for y ~ N(0, sd^2)
            return (exact - c_skip * x_hat) / c_out

        d = edm_denoiser(net, p, sd)(x, t)
        a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
        sig_hat = s / a
        np.testing.assert_allclose(d, sd ** 2 / (sd ** 2 + sig_hat ** 2) * x / a, rtol=1e-10)


def test_guidance():
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, 0.0])
    np.testing.assert_allclose(cfg_combine(c, u, 1.0), c)
    np.testing.assert_allclose(cfg_combine(c, u, 0.0), u)
    np.testing.assert_allclose(cfg_combine(c, u, 3.0), u + 3 * (c - u))
    calls = []

    def model(x, t, label):
        calls.append(x.shape[0])
        return x * label[:, None] + t[:, None]

    x = jnp.ones((3, 2))
    out = classifier_free_guidance(model, jnp.full(3, 2.0), jnp.zeros(3), 1.5)(x, jnp.full(3, 0.1))
    assert calls == [6]                                   # one call on the doubled batch
    np.testing.assert_allclose(out, 0.1 + 1.5 * 2.0 * x)


def test_thresholding_matches_the_rule():
    x0 = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 8, 8)) * jnp.array([0.3, 1.0, 2.0, 5.0])[:, None, None, None]
    np.testing.assert_allclose(static_threshold(x0), np.clip(x0, -1, 1))
    flat = np.abs(np.asarray(x0).reshape(4, -1))
    for max_value in (None, 1.0, 3.0):
        s = np.quantile(flat, 0.995, axis=1)
        s = np.maximum(s, 1.0) if max_value is None else np.clip(s, 1.0, max_value)
        want = np.clip(np.asarray(x0), -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None]
        np.testing.assert_allclose(dynamic_threshold(x0, 0.995, max_value), want, rtol=1e-6)
    assert float(jnp.abs(dynamic_threshold(x0)).max()) <= 1.0 + 1e-7


def test_bad_kind():
    p, x0, eps, t, x = _state("vp_linear")
    with pytest.raises(ValueError, match="unknown prediction kind 'noise'"):
        to_x0_eps(eps, "noise", x, t, p)
    with pytest.raises(ValueError, match="does not match a batch"):
        to_x0_eps(eps, "eps", x, t[:3], p)


def test_conversions_under_jit_vmap_pmap_and_sharding():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    p, x0, eps, t, x = _state("vp_continuous_cosine", b=8)

    def f(x0, eps, x, t):
        return jnp.stack([convert(from_x0_eps(x0, eps, "v", x, t, p), "v", k, x, t, p) for k in KINDS])

    eager = f(x0, eps, x, t)
    np.testing.assert_allclose(jax.jit(f)(x0, eps, x, t), eager, rtol=1e-12)
    vm = jax.vmap(lambda a, b, c, d: f(a[None], b[None], c[None], d[None])[:, 0], out_axes=1)(x0, eps, x, t)
    np.testing.assert_allclose(vm, eager, rtol=1e-12)
    pm = jax.pmap(lambda a, b, c, d: f(a[None], b[None], c[None], d[None])[:, 0], out_axes=1)(x0, eps, x, t)
    np.testing.assert_allclose(pm, eager, rtol=1e-12)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))        # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(put(x0), put(eps), put(x), put(t)), eager, rtol=1e-12)
