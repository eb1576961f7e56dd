"""train.py with task="autoencoder" on the real digits: the GAN switches on, the latent scale factor is
measured and stored, and a resumed run continues bitwise (generator, discriminator, both optimizers, EMA)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from test_train import _final_params, data_dir, tiny_config  # noqa: F401  (fixture; also puts ROOT on sys.path)

from jaxdiff.train_lib import loop as train_loop  # noqa: E402
from jaxdiff.train_lib.writer import read_metrics  # noqa: E402

TINY_AE = dict(kind="kl", block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4,
               mid_attention=False, disc_start=2, disc_channels=8, disc_layers=1, perceptual_weight=0.0,
               scale_images=64)


def ae_config(data_dir, steps, **ae):
    c = tiny_config(data_dir, train=dict(steps=steps, batch_size=8, label_dropout=0.0, log_every=1, sample_every=0,
                                              ema_decay=0.9),
                    optim=dict(lr=1e-3, b1=0.5, b2=0.9, warmup_steps=0, schedule="constant"),
                    checkpoint=dict(every=2), model=dict(num_classes=None))
    c.task = "autoencoder"
    c.data.label_key = None
    for k, v in {**TINY_AE, **ae}.items():
        c.autoencoder[k] = v
    return c


def test_autoencoder_training_gan_scale_and_exact_resume(tmp_path, data_dir):  # noqa: F811
    one = jax.devices()[:1]
    train_loop.train(ae_config(data_dir, 4), str(tmp_path / "straight"), devices=one)
    m = read_metrics(str(tmp_path / "straight"))
    steps = [r for r in m if "d_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["disc_factor"] == 0.0 and r["d_loss"] == 0.0 for r in steps[:2])     # before disc_start
    assert all(r["disc_factor"] == 1.0 and r["d_loss"] > 0.0 for r in steps[2:])      # GAN on
    scale = json.loads((tmp_path / "straight" / "latent_scale.json").read_text())
    assert scale["checkpoint_step"] == 4 and scale["num_images"] == 64 and 0 < scale["scale_factor"] < 1e3
    assert any(r.get("latent_scale") == scale["scale_factor"] for r in m)

    train_loop.train(ae_config(data_dir, 2), str(tmp_path / "resumed"), devices=one)
    train_loop.train(ae_config(data_dir, 4), str(tmp_path / "resumed"), devices=one)
    (s1, a), (s2, b) = _final_params(str(tmp_path / "straight")), _final_params(str(tmp_path / "resumed"))
    assert s1 == s2 == 4
    assert set(a) >= {"params", "disc_params", "opt_state", "disc_opt_state", "ema_params"}
    for key in ("params", "disc_params", "opt_state", "disc_opt_state", "ema_params"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            np.testing.assert_array_equal(x, y)


def test_autoencoder_config_errors(tmp_path, data_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("JAXDIFF_LPIPS_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="lpips_weights"):
        train_loop.train(ae_config(data_dir, 1, perceptual_weight=1.0, lpips_weights=str(tmp_path / "none")),
                           str(tmp_path / "a"), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"'autoencoder.kind' must be one of \['kl', 'vq'\]"):
        train_loop.train(ae_config(data_dir, 1, kind="vae"), str(tmp_path / "b"), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="not divisible by the autoencoder's downsampling factor"):
        train_loop.train(ae_config(data_dir, 1, block_out_channels=(8, 8, 8, 8, 8, 8)), str(tmp_path / "c"),
                           devices=jax.devices()[:1])
    with pytest.warns(UserWarning, match="WITHOUT its perceptual term"):
        from jaxdiff.parallel import make_mesh
        from jaxdiff.train_lib.experiment import build_experiment
        build_experiment(ae_config(data_dir, 1, perceptual_weight=1.0), make_mesh(1, 1, jax.devices()[:1]))


def test_vq_autoencoder_trains_through_train_py(tmp_path, data_dir):  # noqa: F811
    c = ae_config(data_dir, 2, kind="vq", num_vq_embeddings=16)
    out = train_loop.train(c, str(tmp_path / "vq"), devices=jax.devices()[:1])
    assert out["step"] == 2
    m = [r for r in read_metrics(str(tmp_path / "vq")) if "codebook" in r]
    assert len(m) == 2 and all(np.isfinite(r["codebook"]) and r["codebook"] > 0 for r in m)
