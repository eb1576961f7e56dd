"""Native behaviour of the KL and VQ autoencoders: posterior maths, latent scaling, VQ
straight-through gradients and losses, input validation, dtypes under x64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, VectorQuantizer, VQModel

CFG = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=2,
                        scaling_factor=0.5, shift_factor=0.1)


def test_diagonal_gaussian_kl_sample_and_clamp():
    mean = jnp.array([[[[0.5, -1.0]]]])
    logvar = jnp.array([[[[np.log(2.0), 40.0]]]])  # second is clamped to 20
    d = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
    assert float(d.logvar[0, 0, 0, 1]) == 20.0
    expect = 0.5 * ((0.25 + 2.0 - 1 - np.log(2.0)) + (1.0 + np.exp(20.0) - 1 - 20.0))
    np.testing.assert_allclose(float(d.kl()[0]), expect, rtol=1e-5)
    d1 = DiagonalGaussian(jnp.full((4000, 1, 1, 1), 0.3), jnp.full((4000, 1, 1, 1), np.log(0.25)))
    s = d1.sample(jax.random.key(0))
    assert abs(float(s.mean()) - 0.3) < 0.03 and abs(float(s.std()) - 0.5) < 0.03
    assert d1.mode() is d1.mean


def test_autoencoder_kl_shapes_dtype_and_latent_scaling():
    m = AutoencoderKL(CFG, rngs=nnx.Rngs(0))
    x = np.random.RandomState(0).randn(2, 8, 8, 3)  # float64 input with x64 on
    post = m.encode(x)
    assert post.mean.shape == (2, 4, 4, 2) and post.mean.dtype == jnp.float32
    z = m.to_latents(x)
    np.testing.assert_allclose(np.asarray(z), (np.asarray(post.mean) - 0.1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m.from_latents(z)), np.asarray(m.decode(post.mean)), atol=1e-5)
    rec, p2 = m(x, jax.random.key(1))
    assert rec.shape == (2, 8, 8, 3) and rec.dtype == jnp.float32
    assert float(jnp.abs(m(x)[0] - rec).max()) > 0  # sampling differs from the mode


def test_autoencoder_bad_inputs():
    m = AutoencoderKL(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"image must have shape \(B, H, W, 3\)"):
        m.encode(jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="7x8 is not divisible by the downsampling factor 2"):
        m.encode(jnp.zeros((1, 7, 8, 3)))
    with pytest.raises(ValueError, match=r"latent must have shape \(B, H, W, 2\)"):
        m.decode(jnp.zeros((1, 4, 4, 3)))
    v = VQModel(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"image must have shape"):
        v.encode(jnp.zeros((1, 8, 8, 1)))


def test_vector_quantizer_nearest_code_straight_through_and_loss():
    q = VectorQuantizer(5, 3, beta=0.25, rngs=nnx.Rngs(0))
    codes = np.asarray(q.embedding.embedding.get_value())
    z = jnp.asarray(np.random.RandomState(0).randn(2, 3, 3, 3) * 0.01, jnp.float32)
    zq, loss, idx = q(z)
    d = ((np.asarray(z)[..., None, :] - codes) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(idx), d.argmin(-1))
    np.testing.assert_allclose(np.asarray(zq), codes[d.argmin(-1)], atol=1e-6)
    mse = np.mean((codes[d.argmin(-1)] - np.asarray(z)) ** 2)
    np.testing.assert_allclose(float(loss), 1.25 * mse, rtol=1e-4)
    g = jax.grad(lambda z: jnp.sum(q(z)[0] * jnp.arange(3.0)))(z)  # straight-through: identity Jacobian
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.arange(3.0), z.shape))


def test_vq_model_roundtrip_shapes():
    v = VQModel(CFG.replace(vq_embed_dim=3, num_vq_embeddings=16), rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 8, 3))
    h = v.encode(x)
    assert h.shape == (1, 4, 4, 3)
    rec, loss = v(x)
    assert rec.shape == (1, 8, 8, 3) and loss.shape == () and float(loss) >= 0
    rec2, loss2 = v.decode(h, force_not_quantize=True)
    assert float(loss2) == 0.0 and float(jnp.abs(rec2 - rec).max()) > 0
