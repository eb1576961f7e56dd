"""Autoencoder training (CompVis recipe): the adaptive GAN weight, which parameters each update moves,
the disc_start switch, short real-data runs of tiny KL and VQ autoencoders on 32x32 digits, bitwise
resume through orbax, the non-finite guard, PSNR/SSIM references and the latent scale factor.

The models are tiny (f4, widths 8/16/16) and the LPIPS trunk a random narrow VGG16
(``widths=(4, 8, 8, 8, 8)``): the tests check the training machinery, not perceptual quality.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxdiff.data.digits import load_digits_arrays
from jaxdiff.metrics.image_quality import gaussian_window, psnr, ssim
from jaxdiff.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from jaxdiff.nn.discriminator import NLayerDiscriminator
from jaxdiff.nn.lpips import LPIPS
from jaxdiff.nn.vq import VQModel
from jaxdiff.train_lib.autoencoder import (adaptive_weight, create_autoencoder_state, hinge_d_loss,
                                           latent_scale_factor, make_autoencoder_step, select_leaf)

TINY = AutoencoderConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
                         latent_channels=2, norm_num_groups=4, mid_block_add_attention=False)
BATCH = 16
STEPS = 40
DISC_START = 12
LAST = ("decoder", "conv_out", "kernel")


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def _digits(n=BATCH * 8):
    images, _ = load_digits_arrays("train", 32)
    return (images[:n].astype(np.float32) / 127.5 - 1.0)


def _batches(data, steps, offset=0):
    n = len(data) // BATCH
    return [{"image": jnp.asarray(data[((s + offset) % n) * BATCH:((s + offset) % n + 1) * BATCH])}
            for s in range(steps)]


def _kl_parts():
    ae = AutoencoderKL(TINY, rngs=nnx.Rngs(0))
    disc = NLayerDiscriminator(1, ndf=8, n_layers=2, num_groups=4, rngs=nnx.Rngs(1))
    lp = LPIPS((4, 8, 8, 8, 8), rngs=nnx.Rngs(2))
    g_ae, p_ae, r_ae = _split(ae)
    g_d, p_d, r_d = _split(disc)

    def ae_apply(params, x, key):
        return nnx.merge(g_ae, params, r_ae)(x, key)

    def disc_apply(params, x):
        return nnx.merge(g_d, params, r_d)(x)

    def lpips_fn(a, b):   # grey digits -> 3 channels
        return lp(jnp.repeat(a, 3, -1), jnp.repeat(b, 3, -1))

    return ae_apply, disc_apply, lpips_fn, p_ae, p_d


@pytest.fixture(scope="module")
def kl_run():
    """40 Adam steps of the tiny KL autoencoder with LPIPS and the GAN switched on at step 12."""
    ae_apply, disc_apply, lpips_fn, p_ae, p_d = _kl_parts()
    gen_opt, disc_opt = optax.adam(2e-3, b1=0.5, b2=0.9), optax.adam(2e-3, b1=0.5, b2=0.9)
    step = jax.jit(make_autoencoder_step(ae_apply, disc_apply, lpips_fn, gen_opt, disc_opt, kind="kl",
                                         kl_weight=1e-6, disc_start=DISC_START, disc_weight=0.5,
                                         ema_decay=0.99))
    # committed to one device, like the restored checkpoint, so both share one compiled step
    state0 = jax.device_put(create_autoencoder_state(p_ae, p_d, gen_opt, disc_opt, seed=0), jax.devices()[0])
    batches = _batches(_digits(), STEPS)
    states, history = [state0], []
    state = state0
    for b in batches:
        state, m = step(state, b)
        states.append(state)
        history.append(jax.device_get(m))
    return dict(step=step, states=states, history=history, batches=batches, ae_apply=ae_apply,
                disc_apply=disc_apply, lpips_fn=lpips_fn, gen_opt=gen_opt, disc_opt=disc_opt)


# ----------------------------------------------------------------------------------------------
# one step against direct computations


def test_adaptive_weight_and_updates_match_direct_gradients(kl_run):
    """At the first GAN step of the run: the adaptive weight equals the ratio of the directly computed
    last-layer gradient norms, and each update used the gradient of its own loss only. The generator's
    gradient is that of nll + 1e-6 KL + lambda * g_loss with the discriminator held at its old
    parameters; the discriminator's that of the hinge loss on D(x) and D(x_rec of the old generator).
    Gradients are read back from Adam's first moments (b1 = 0.5: g = 2 mu_new - mu_old)."""
    ae_apply, disc_apply, lpips_fn = kl_run["ae_apply"], kl_run["disc_apply"], kl_run["lpips_fn"]
    s = DISC_START
    old, new, m = kl_run["states"][s], kl_run["states"][s + 1], kl_run["history"][s]
    x = kl_run["batches"][s]["image"]
    key = jax.random.fold_in(jax.random.wrap_key_data(old.rng), old.step)

    def pieces(params, dp):
        x_rec, post = ae_apply(params, x, key)
        nll = jnp.sum(jnp.abs(x - x_rec) + lpips_fn(x, x_rec)[:, None, None, None]) / x.shape[0]
        kl = jnp.sum(post.kl()) / x.shape[0]
        g = -jnp.mean(disc_apply(dp, x_rec))
        return nll, kl, g, x_rec

    @jax.jit
    def direct(p_ae, p_d):
        g_nll = jax.grad(lambda p: pieces(p, p_d)[0])(p_ae)
        g_g = jax.grad(lambda p: pieces(p, p_d)[2])(p_ae)
        ratio = jnp.linalg.norm(g_nll["decoder"]["conv_out"]["kernel"]) / (
            jnp.linalg.norm(g_g["decoder"]["conv_out"]["kernel"]) + 1e-4)
        lam = jnp.clip(ratio, 0, 1e4) * 0.5

        def total(p):
            nll, kl, g, _ = pieces(p, p_d)
            return nll + 1e-6 * kl + lam * g

        g_total = jax.grad(total)(p_ae)
        x_rec = pieces(p_ae, p_d)[3]
        g_disc = jax.grad(lambda dp: hinge_d_loss(disc_apply(dp, x), disc_apply(dp, x_rec)))(p_d)
        return lam, g_total, g_disc

    lam, g_total, g_disc = direct(old.params, old.disc_params)
    assert float(m["d_weight"]) > 0 and float(m["disc_factor"]) == 1.0
    np.testing.assert_allclose(float(m["d_weight"]), float(lam), rtol=1e-5)
    for mu_old, mu_new, want in ((old.opt_state[0].mu, new.opt_state[0].mu, g_total),
                                 (old.disc_opt_state[0].mu, new.disc_opt_state[0].mu, g_disc)):
        for a, b, g in zip(jax.tree.leaves(mu_old), jax.tree.leaves(mu_new), jax.tree.leaves(want)):
            g = np.asarray(g, np.float64)
            got = 2.0 * np.asarray(b, np.float64) - np.asarray(a, np.float64)
            np.testing.assert_allclose(got, g, rtol=1e-4, atol=1e-5 * np.abs(g).max() + 1e-7)


def test_adaptive_weight_helper_and_hinge():
    g1 = {"w": jnp.array([3.0, 4.0])}
    g2 = {"w": jnp.array([0.0, 1.0])}
    np.testing.assert_allclose(float(adaptive_weight(g1, g2, 0.5)), 0.5 * 5.0 / (1.0 + 1e-4), rtol=1e-6)
    assert float(adaptive_weight(g1, {"w": jnp.zeros(2)}, 1.0)) == 1e4   # clipped
    np.testing.assert_allclose(float(hinge_d_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.5]))),
                               0.5 * (0.5 + 0.75))
    with pytest.raises(KeyError, match="conv_out"):
        select_leaf({"decoder": {"conv": {}}}, LAST)


# ----------------------------------------------------------------------------------------------
# short real-data runs


def test_gan_terms_zero_before_disc_start_and_on_after(kl_run):
    h, states = kl_run["history"], kl_run["states"]
    for s in range(DISC_START):
        assert h[s]["disc_factor"] == 0 and h[s]["gan_term"] == 0 and h[s]["d_loss"] == 0, s
        assert h[s]["disc_grad_norm"] == 0
        for a, b in zip(jax.tree.leaves(states[s + 1].disc_params), jax.tree.leaves(states[0].disc_params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for s in range(DISC_START, STEPS):
        assert h[s]["disc_factor"] == 1 and h[s]["gan_term"] != 0 and h[s]["d_loss"] > 0, s
        assert h[s]["d_weight"] > 0
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states[-1].disc_params),
                                                         jax.tree.leaves(states[0].disc_params)))


def test_kl_autoencoder_learns_with_gan_on(kl_run):
    h, states = kl_run["history"], kl_run["states"]
    for m in h:
        assert all(np.isfinite(v) for v in m.values()), m
    assert int(states[-1].bad_step) == -1 and int(states[-1].step) == STEPS
    first = np.mean([m["rec"] for m in h[:3]])
    last = np.mean([m["rec"] for m in h[-3:]])
    assert last < 0.6 * first, (first, last)
    assert h[-1]["p_loss"] > 0 and h[-1]["kl"] > 0
    assert h[-1]["logits_real"] != h[-1]["logits_fake"]
    # EMA trails the parameters
    a, b = jax.tree.leaves(states[-1].ema_params)[0], jax.tree.leaves(states[-1].params)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_vq_autoencoder_learns():
    cfg = TINY.replace(num_vq_embeddings=32, vq_embed_dim=2)
    ae = VQModel(cfg, rngs=nnx.Rngs(0))
    disc = NLayerDiscriminator(1, ndf=8, n_layers=2, num_groups=4, rngs=nnx.Rngs(1))
    g_ae, p_ae, r_ae = _split(ae)
    g_d, p_d, r_d = _split(disc)
    ae_apply = lambda p, x, key: nnx.merge(g_ae, p, r_ae)(x)
    disc_apply = lambda p, x: nnx.merge(g_d, p, r_d)(x)
    opt = optax.adam(2e-3, b1=0.5, b2=0.9)
    step = jax.jit(make_autoencoder_step(ae_apply, disc_apply, None, opt, opt, kind="vq", rec_loss="l2",
                                         disc_start=10, disc_weight=0.75))
    state = create_autoencoder_state(p_ae, p_d, opt, opt, seed=0)
    hist = []
    for b in _batches(_digits(), 30):
        state, m = step(state, b)
        hist.append(jax.device_get(m))
    assert all(np.isfinite(v) for m in hist for v in m.values())
    assert int(state.bad_step) == -1
    assert np.mean([m["rec"] for m in hist[-3:]]) < 0.6 * np.mean([m["rec"] for m in hist[:3]])
    assert hist[-1]["codebook"] > 0 and hist[-1]["d_loss"] > 0 and hist[5]["d_loss"] == 0
    assert hist[0]["p_loss"] == 0


# ----------------------------------------------------------------------------------------------
# resume and the non-finite guard


def test_resume_from_orbax_is_bitwise(kl_run, tmp_path):
    from jaxdiff.train_lib.checkpoint import Checkpointer, abstract_like

    step, states, batches = kl_run["step"], kl_run["states"], kl_run["batches"]
    mid, end = DISC_START - 2, DISC_START + 3     # crosses disc_start after the restore
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(mid, states[mid], {"position": mid}, {"kind": "kl"})
    ckpt.close()
    reader = Checkpointer(str(tmp_path / "ckpt"))
    restored_step, state, data, _ = reader.restore(abstract_like(states[mid]))
    reader.close()
    assert restored_step == mid and data["position"] == mid
    for s in range(mid, end):
        state, _ = step(state, batches[s])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[end])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_batch_is_skipped(kl_run):
    step, states, batches = kl_run["step"], kl_run["states"], kl_run["batches"]
    s0 = states[DISC_START + 1]
    bad = {"image": batches[0]["image"].at[0, 0, 0, 0].set(jnp.nan)}
    s1, m = step(s0, bad)
    assert not np.isfinite(m["loss"])
    assert int(s1.step) == int(s0.step) + 1 and int(s1.bad_step) == int(s0.step)
    for name in ("params", "disc_params", "opt_state", "disc_opt_state", "ema_params"):
        for a, b in zip(jax.tree.leaves(getattr(s1, name)), jax.tree.leaves(getattr(s0, name))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s2, m2 = step(s1, batches[1])
    assert np.isfinite(m2["loss"]) and int(s2.bad_step) == int(s0.step)


# ----------------------------------------------------------------------------------------------
# metrics


def _ssim_numpy(a, b, data_range):
    """Wang et al. (2004) written out: Gaussian-weighted local means/variances/covariance at every
    valid 11x11 window position, per channel, averaged. a, b: (H, W, C)."""
    g = gaussian_window(11, 1.5).astype(np.float64)
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_psnr_ssim_against_references():
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[0][100:164:2, 200:264:2].astype(np.float32) / 127.5 - 1.0  # 32x32x3
    rng = np.random.RandomState(0)
    noisy = np.clip(photo + 0.1 * rng.standard_normal(photo.shape), -1, 1).astype(np.float32)
    a, b = np.stack([photo, noisy]), np.stack([noisy, np.roll(photo, 1, axis=0)])
    got_ssim = np.asarray(ssim(a, b, data_range=2.0))
    got_psnr = np.asarray(psnr(a, b, data_range=2.0))
    for k in range(2):
        mse = np.mean((a[k].astype(np.float64) - b[k]) ** 2)
        np.testing.assert_allclose(got_psnr[k], 10 * np.log10(4.0 / mse), rtol=1e-5)
        np.testing.assert_allclose(got_ssim[k], _ssim_numpy(a[k], b[k], 2.0), rtol=1e-4, atol=1e-5)
    assert np.asarray(ssim(a, a)).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    metrics = pytest.importorskip("skimage.metrics")
    for k in range(2):
        want = metrics.structural_similarity(a[k], b[k], data_range=2.0, channel_axis=-1, gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False)
        np.testing.assert_allclose(got_ssim[k], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_psnr[k], metrics.peak_signal_noise_ratio(a[k], b[k], data_range=2.0),
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="smaller than the 11x11"):
        ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))


def test_latent_scale_factor_known_std():
    rng = np.random.RandomState(0)
    images = rng.standard_normal((64, 8, 8, 4)).astype(np.float32)
    encode = lambda x: 3.0 * x[:, ::2, ::2, :] + 5.0     # std 3 about a non-zero mean
    z = 3.0 * images[:, ::2, ::2, :].astype(np.float64) + 5.0
    want = 1.0 / np.std(z, ddof=1)
    np.testing.assert_allclose(latent_scale_factor(encode, images), want, rtol=1e-6)
    np.testing.assert_allclose(latent_scale_factor(encode, images, batch_size=10), want, rtol=1e-6)
    assert abs(latent_scale_factor(encode, images) * 3.0 - 1.0) < 0.03
    with pytest.raises(ValueError, match="std"):
        latent_scale_factor(lambda x: jnp.zeros_like(x), images)


def test_discriminator_shapes_init_and_per_example():
    d = NLayerDiscriminator(3, ndf=64, n_layers=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    out = d(x)
    assert out.shape == (2, 2, 2, 1) and out.dtype == jnp.float32
    # GroupNorm, not BatchNorm: an image's logits do not depend on the rest of the batch
    np.testing.assert_allclose(np.asarray(d(x[:1])), np.asarray(out[:1]), rtol=1e-5, atol=1e-6)
    k = np.asarray(d.convs[2].kernel[...])
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
    assert d.convs[1].bias is None and d.convs[0].bias is not None
    n_params = sum(v.size for v in jax.tree.leaves(nnx.state(d, nnx.Param)))
    assert n_params == 2_765_633       # taming's 3-layer ndf=64 discriminator (BatchNorm affine = GroupNorm affine)
    with pytest.raises(ValueError, match="too small"):
        d(jnp.zeros((1, 16, 16, 3)))
