"""Layer-level checks: the custom-gradient convolution against lax autodiff, GroupNorm against a
direct formula, dtype handling under x64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn.layers import Conv2d, GroupNorm, conv2d


@pytest.mark.parametrize("k,stride,padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                              (3, 2, ((1, 1), (1, 1))), (1, 1, ((0, 0), (0, 0)))])
def test_conv2d_gradients_match_lax(k, stride, padding):
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
