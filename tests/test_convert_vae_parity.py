"""Parity: diffusers AutoencoderKL / VQModel (random init, safetensors folder) vs jaxdiff.

Compares the encoder posterior (mean, logvar), the decoder output and, for VQ, the quantised
latents, the commitment loss and the decode, in float32 within 1e-4 (max abs)."""
import numpy as np
import pytest

pytestmark = pytest.mark.parity

ATOL = 1e-4

SMALL_KL = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                latent_channels=4, norm_num_groups=8, sample_size=32)
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
SMALL_VQ = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                latent_channels=3, num_vq_embeddings=64, vq_embed_dim=5, norm_num_groups=8, sample_size=16)


def _nhwc(a):
    import jax.numpy as jnp
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.abs(a - b).max())
    assert err <= ATOL, f"{what}: max abs error {err}"


def _kl_parity(cfg, tmp_path, batch, size):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from flax import nnx
    from jaxdiff.convert import load_autoencoder_kl
    from jaxdiff.nn import AutoencoderKL

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**cfg).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    model = load_autoencoder_kl(str(tmp_path))
    assert isinstance(model, AutoencoderKL)
    assert model.config.scaling_factor == cfg.get("scaling_factor", 0.18215)
    x = np.random.RandomState(1).randn(batch, 3, size, size).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        mean, logvar = post.mean.numpy(), post.logvar.numpy()
        kl = post.kl().numpy()
        dec = ref.decode(post.mean).sample.numpy()
    enc = nnx.jit(lambda m, x: m.encode(x))(model, _nhwc(x))
    _close(_nchw(enc.mean), mean, "posterior mean")
    _close(_nchw(enc.logvar), logvar, "posterior logvar")
    np.testing.assert_allclose(np.asarray(enc.kl()), kl, rtol=1e-4)
    out = nnx.jit(lambda m, z: m.decode(z))(model, _nhwc(mean))
    assert out.dtype == np.float32
    _close(_nchw(out), dec, "decoder output")


def test_autoencoder_kl_small_parity(tmp_path):
    _kl_parity(SMALL_KL, tmp_path, batch=2, size=32)


@pytest.mark.slow
def test_sd_v1_vae_parity(tmp_path):
    _kl_parity(SD_VAE, tmp_path, batch=1, size=256)


def test_vq_model_small_parity(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from flax import nnx
    from jaxdiff.convert import load_vq_model

    torch.manual_seed(0)
    ref = diffusers.VQModel(**SMALL_VQ).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    model = load_vq_model(str(tmp_path))
    x = np.random.RandomState(2).randn(2, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        h = ref.encode(torch.from_numpy(x)).latents
        q, ref_loss, (_, _, ref_idx) = ref.quantize(h)
        dec = ref.decode(h)
    h_j = nnx.jit(lambda m, x: m.encode(x))(model, _nhwc(x))
    _close(_nchw(h_j), h.numpy(), "pre-quantisation latents")
    q_j, loss_j, idx_j = nnx.jit(lambda m, h: m.quantize(h))(model, h_j)
    np.testing.assert_array_equal(np.asarray(idx_j).reshape(-1), ref_idx.numpy().reshape(-1))
    _close(_nchw(q_j), q.numpy(), "quantised latents")
    assert abs(float(loss_j) - float(ref_loss)) <= ATOL
    out, commit = nnx.jit(lambda m, h: m.decode(h))(model, h_j)
    _close(_nchw(out), dec.sample.numpy(), "decoder output")
    assert abs(float(commit) - float(dec.commit_loss)) <= ATOL
