"""Layer-level checks: the custom-gradient convolution against lax autodiff, GroupNorm against a
direct formula, dtype handling under x64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn import layers
from jaxdiff.nn.layers import Conv2d, GroupNorm, conv2d


@pytest.fixture
def conv_grad():
    """Set the conv kernel-gradient implementation for one test, restoring it afterwards."""
    before = layers.conv_grad_impl()
    yield layers.set_conv_grad_impl
    layers.set_conv_grad_impl(before)


CONV_CASES = [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))), (3, 2, ((1, 1), (1, 1))), (1, 1, ((0, 0), (0, 0)))]


@pytest.mark.parametrize("impl", layers.CONV_GRAD_IMPLS)
@pytest.mark.parametrize("k,stride,padding", CONV_CASES)
def test_conv2d_gradients_match_lax(k, stride, padding, impl, conv_grad):
    conv_grad(impl)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 5), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (k, k, 5, 7), jnp.float32)
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: conv2d(x, w, stride, padding)
    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(ref(x, w)), atol=1e-5)
    cot = jax.random.normal(jax.random.key(2), ref(x, w).shape, jnp.float32)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, w)
    g_our = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1)))(x, w)
    for a, b in zip(g_our, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride,padding", CONV_CASES)
def test_conv_grad_impls_agree(k, stride, padding, conv_grad):
    """The matmul (custom_vjp) and XLA kernel gradients of conv2d are the same."""
    x = jax.random.normal(jax.random.key(3), (3, 8, 8, 6), jnp.float32)
    w = jax.random.normal(jax.random.key(4), (k, k, 6, 4), jnp.float32)
    grads = {}
    for impl in ("matmul", "xla"):
        conv_grad(impl)
        f = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, stride, padding))), argnums=(0, 1)))
        grads[impl] = f(x, w)
    for a, b in zip(grads["matmul"], grads["xla"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_conv_grad_switch_resolution(conv_grad, monkeypatch):
    """"auto" uses the tap matmuls on CPU for pointwise convs only, never on other backends."""
    pw, k3 = ((0, 0), (0, 0)), ((1, 1), (1, 1))
    conv_grad("auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layers._matmul_kernel_grad((1, 1, 4, 4), 1, pw) and not layers._matmul_kernel_grad((3, 3, 4, 4), 1, k3)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not layers._matmul_kernel_grad((1, 1, 4, 4), 1, pw)
    conv_grad("matmul")
    assert layers._matmul_kernel_grad((3, 3, 4, 4), 1, k3) and layers.conv_grad_impl() == "matmul"
    conv_grad("xla")
    assert not layers._matmul_kernel_grad((1, 1, 4, 4), 1, pw)
    with pytest.raises(ValueError, match="conv grad impl"):
        layers.set_conv_grad_impl("cudnn")


def test_groupnorm_matches_formula_and_keeps_dtype():
    x = np.random.RandomState(0).randn(2, 4, 4, 8) * 3 + 5  # float64 input, large mean
    gn = GroupNorm(2, 8, eps=1e-6)
    y = gn(x)
    assert y.dtype == jnp.float32
    xg = x.reshape(2, 16, 2, 4)
    ref = ((xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    assert GroupNorm(2, 8, dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="not divisible"):
        GroupNorm(3, 8)


def test_conv_module_layout_and_dtype():
    c = Conv2d(3, 4, 3, stride=2, padding=((0, 1), (0, 1)), rngs=nnx.Rngs(0))
    assert c.kernel.get_value().shape == (3, 3, 3, 4)
    y = c(np.ones((1, 8, 8, 3)))
    assert y.shape == (1, 4, 4, 4) and y.dtype == jnp.float32
