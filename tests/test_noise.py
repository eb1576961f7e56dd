"""Noise processes: identities, exact inverses, diffusers' schedules, transforms and errors."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.noise import (PROCESSES, VPDiscrete, broadcast_to_batch, cosine_betas, linear_betas, make_process,
                           rescale_zero_terminal_snr, scaled_linear_betas)

ALL = sorted(PROCESSES)
VP = ["vp_linear", "vp_scaled_linear", "vp_cosine", "vp_continuous_linear", "vp_continuous_cosine"]


def _fine(p, n=2001):
    return jnp.linspace(p.t_min, p.t_max, n)


@pytest.mark.parametrize("name", VP)
def test_vp_is_variance_preserving(name):
    p = make_process(name)
    t = jnp.concatenate([_fine(p), jnp.array([p.t_zero])])
    np.testing.assert_allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, 1.0, rtol=1e-13)


@pytest.mark.parametrize("name", ALL)
def test_logsnr_strictly_decreasing(name):
    p = make_process(name)
    lam = np.asarray(p.logsnr(_fine(p)))
    assert np.all(np.diff(lam) < 0)
    assert np.isfinite(lam[:-1]).all()


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=200, deadline=None)
@given(u=st.floats(0.0, 1.0))
def test_t_from_logsnr_inverts_logsnr(name, u):
    p = make_process(name)
    t = p.t_min + u * (p.t_max - p.t_min)
    if name == "flow":
        t = min(t, 1 - 1e-9)      # logsnr(1) = -inf for flow
    back = float(p.t_from_logsnr(p.logsnr(jnp.float64(t))))
    assert back == pytest.approx(t, rel=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_t_zero_is_clean_data(name):
    p = make_process(name)
    assert float(p.sigma(p.t_zero)) == 0.0
    assert float(p.alpha(p.t_zero)) == 1.0


def test_reference_constants():
    """Half-logSNR end points and EDM sigma (computed from the definitions in solvers.md section 1)."""
    p = make_process("vp_linear")
    np.testing.assert_allclose(0.5 * p.logsnr(jnp.array([1.0, 1e-3])), [-5.0588, 4.6051], atol=1e-4)
    np.testing.assert_allclose(p.sigma(1.0) / p.alpha(1.0), 157.41, atol=0.01)
    p = make_process("vp_continuous_linear")
    np.testing.assert_allclose(0.5 * p.logsnr(jnp.array([1.0, 1e-3, 1e-4])), [-5.0250, 4.5577, 5.7515], atol=1e-4)
    assert make_process("vp_cosine", logsnr_min=-10.2).log_alphas.shape == (996,)   # DPM-Solver's clip at -5.1
    np.testing.assert_allclose(make_process("vp_scaled_linear").sigma(1.0), 0.99767, atol=1e-5)


def test_discrete_knots_and_model_time():
    p = make_process("vp_linear")
    ac = np.cumprod(1 - linear_betas())
    t = (np.arange(1000) + 1) / 1000
    np.testing.assert_allclose(p.alpha(t) ** 2, ac, rtol=1e-13)
    np.testing.assert_allclose(p.model_time(t), np.arange(1000), atol=1e-9)
    assert float(p.model_time(p.t_max)) == pytest.approx(999)


@contextlib.contextmanager
def _torch_float64():
    torch = pytest.importorskip("torch")
    real = torch.float32
    torch.float32 = torch.float64      # diffusers builds its betas with dtype=torch.float32
    try:
        yield
    finally:
        torch.float32 = real


@pytest.mark.parity
@pytest.mark.parametrize("schedule,ours", [("linear", linear_betas), ("scaled_linear", scaled_linear_betas),
                                           ("squaredcos_cap_v2", cosine_betas)])
def test_alphas_cumprod_equal_diffusers(schedule, ours):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    with _torch_float64():
        ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, **kw).alphas_cumprod
    assert ref.dtype.is_floating_point and ref.element_size() == 8
    ref = ref.numpy()
    np.testing.assert_allclose(np.cumprod(1 - ours()), ref, rtol=1e-14, atol=0)
    name = {"linear": "vp_linear", "scaled_linear": "vp_scaled_linear", "squaredcos_cap_v2": "vp_cosine"}[schedule]
    np.testing.assert_allclose(make_process(name).alphas_cumprod, ref, rtol=1e-13)


@pytest.mark.parity
def test_zero_terminal_snr_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    with _torch_float64():
        ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      rescale_betas_zero_snr=True).alphas_cumprod
    ours = rescale_zero_terminal_snr(np.cumprod(1 - scaled_linear_betas()))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-12, atol=1e-15)
    assert ours[-1] == 0.0
    p = make_process("vp_scaled_linear", zero_terminal_snr=True)
    assert float(p.alphas_cumprod[-1]) == pytest.approx(2.0 ** -24, rel=1e-12)


@pytest.mark.parametrize("name", ["vp_linear", "edm", "flow", "ve"])
def test_q_sample_moments(name):
    p = make_process(name)
    x0 = jnp.full((200_000, 1), 0.7)
    t = jnp.asarray(0.5 * (p.t_min + p.t_max))
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    xt = p.q_sample(x0, jnp.full((x0.shape[0],), t), noise)
    a, s = float(p.alpha(t)), float(p.sigma(t))
    assert float(xt.mean()) == pytest.approx(0.7 * a, abs=4 * s / np.sqrt(x0.shape[0]))
    assert float(xt.std()) == pytest.approx(s, rel=0.01)


@pytest.mark.parametrize("name", ALL)
def test_jit_vmap_pmap_and_sharding_agree(name):
    p = make_process(name)
    t = jnp.linspace(p.t_min, p.t_max * 0.999, 16)

    def f(proc, t):
        return jnp.stack([proc.alpha(t), proc.sigma(t), proc.logsnr(t), proc.t_from_logsnr(proc.logsnr(t)),
                          proc.model_time(t)])

    eager = f(p, t)
    np.testing.assert_allclose(jax.jit(f)(p, t), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0), out_axes=1)(p, t), eager, rtol=1e-12)
    pm = jax.pmap(f, in_axes=(None, 0), out_axes=1)(p, t.reshape(8, 2))
    np.testing.assert_allclose(pm.reshape(5, 16), eager, rtol=1e-12)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    ts = jax.device_put(t, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(jax.jit(f)(p, ts), eager, rtol=1e-12)


def test_process_is_a_pytree_with_array_leaves():
    p = make_process("vp_linear")
    leaves = jax.tree.leaves(p)
    assert len(leaves) == 1 and leaves[0].shape == (1000,)
    assert jax.tree.leaves(make_process("edm")) == []


def test_bad_input():
    with pytest.raises(ValueError, match="unknown noise process 'vp_lin'.*vp_linear"):
        make_process("vp_lin")
    with pytest.raises(ValueError, match="accepted.*beta_start"):
        make_process("vp_linear", beta_strat=0.1)
    with pytest.raises(ValueError, match="accepted.*sigma_max"):
        make_process("edm", sigma=3)
    p = make_process("vp_linear")
    with pytest.raises(ValueError, match="outside the range"):
        p.q_sample(jnp.zeros((2, 3)), jnp.array([0.5, 1.5]), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        p.q_sample(jnp.zeros((2, 3)), jnp.array([0.5, 0.5]), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="does not match a batch"):
        broadcast_to_batch(jnp.zeros(3), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="decrease strictly"):
        VPDiscrete.from_alphas_cumprod(np.array([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="betas"):
        VPDiscrete.from_betas(np.array([0.1, 1.5]))
