"""Latent diffusion end to end on the real digits: a tiny autoencoder run, a diffusion model trained on its
scaled latents (encoded inside the step), sample.py decoding to images, and the named errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from test_train import data_dir, tiny_config  # noqa: F401  (fixture; also puts ROOT on sys.path)
from test_train_autoencoder import ae_config

from jaxdiff.cli import sample as sample_cli  # noqa: E402
from jaxdiff.train_lib import loop as train_loop  # noqa: E402



def _one():
    return jax.devices()[:1]


def latent_config(data_dir, ae_workdir, steps=3, size=8, channels=2, **train):  # noqa: F811
    c = tiny_config(data_dir, train=dict(steps=steps, batch_size=16, log_every=1, sample_every=steps,
                                         ema_decay=0.9, label_dropout=0.2, **train))
    c.model.block_out_channels = (8, 16)
    c.latent.autoencoder = ae_workdir
    c.latent.size, c.latent.channels = size, channels
    c.sample.num, c.sample.steps = 10, 3
    return c


@pytest.fixture(scope="module")
def ae_run(data_dir, tmp_path_factory):  # noqa: F811
    """A 4-step f2 KL autoencoder on 16x16 digits: 8x8x2 latents."""
    workdir = str(tmp_path_factory.mktemp("ae") / "ae")
    train_loop.train(ae_config(data_dir, 4), workdir, devices=_one())
    return workdir


@pytest.mark.slow      # a latent diffusion training run end to end (~2-4 min on 2 cores): make test-slow
def test_latent_diffusion_trains_on_scaled_latents_and_samples_decode(tmp_path, data_dir, ae_run):  # noqa: F811
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    c = latent_config(data_dir, ae_run)
    exp = build_experiment(c, make_mesh(1, 1, _one()))
    assert exp.model_shape == (8, 8, 2) and exp.unet.in_channels == 2
    scale = json.load(open(f"{ae_run}/latent_scale.json"))["scale_factor"]
    assert exp.autoencoder.scale == scale
    x = np.zeros((2, 16, 16, 1), np.float32)
    z = np.asarray(exp.autoencoder.encode(x))
    assert z.shape == (2, 8, 8, 2)
    assert np.asarray(exp.autoencoder.decode(z)).shape == (2, 16, 16, 1)

    workdir = str(tmp_path / "ldm")
    out = train_loop.train(c, workdir, devices=_one())
    assert out["step"] == 3 and np.isfinite(out["final_loss"])
    assert (tmp_path / "ldm" / "samples" / "step_0000003.png").exists()
    rc = sample_cli.main(["--workdir", workdir, "--num", "6", "--steps", "3", "--guidance_scale", "2",
                             "--out", str(tmp_path / "s")])
    assert rc == 0
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert images.shape == (6, 16, 16, 1) and np.all(np.isfinite(images))


def test_latent_configuration_errors(tmp_path, data_dir, ae_run):  # noqa: F811
    with pytest.raises(ValueError, match=r"latent shape \(4, 4, 2\).*does not match the autoencoder.*\(8, 8, 2\)"):
        train_loop.train(latent_config(data_dir, ae_run, size=4), str(tmp_path / "a"), devices=_one())
    with pytest.raises(ValueError, match="no autoencoder checkpoint there"):
        train_loop.train(latent_config(data_dir, str(tmp_path / "missing")), str(tmp_path / "b"), devices=_one())
    c = latent_config(data_dir, ae_run)
    c.latent.size = None
    with pytest.raises(ValueError, match="give latent.size and latent.channels"):
        train_loop.train(c, str(tmp_path / "c"), devices=_one())
    # a pixel-space diffusion run's folder: its step-0 checkpoint, written as train.py writes checkpoints
    # (config, data state, state); the check reads the checkpoint's config, so no training step is needed
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib import checkpoint as ckpt
    from jaxdiff.train_lib import config as config_lib
    from jaxdiff.train_lib.experiment import build_experiment
    pixel_run = str(tmp_path / "pixel")
    pixel = tiny_config(data_dir, train=dict(steps=1, batch_size=16, sample_every=0))
    writer = ckpt.Checkpointer(f"{pixel_run}/checkpoints", async_save=False)
    writer.save(0, build_experiment(pixel, make_mesh(1, 1, _one())).init_state(), {"next": 0},
                config_lib.to_dict(pixel))
    writer.wait()
    writer.close()
    with pytest.raises(ValueError, match="is a 'diffusion' run, not an autoencoder"):
        train_loop.train(latent_config(data_dir, pixel_run), str(tmp_path / "d"), devices=_one())


@pytest.mark.parity
def test_a_diffusers_vae_folder_is_a_frozen_first_stage(tmp_path, data_dir):  # noqa: F811
    """A diffusers AutoencoderKL saved by diffusers serves as latent.autoencoder: its scaling factor is used
    and encode/decode equal the converted model's to_latents/from_latents."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.convert import load_autoencoder_kl
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=2, norm_num_groups=4, layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    c = latent_config(data_dir, str(tmp_path / "pipe"))
    out = train_loop.train(c, str(tmp_path / "ldm"), devices=_one())
    assert out["step"] == 3 and np.isfinite(out["final_loss"])
    from jaxdiff.train_lib.latent import load_frozen_autoencoder
    ae = load_frozen_autoencoder(str(tmp_path / "pipe"), 16)
    assert ae.scale == 0.5 and ae.shape == (8, 8, 2)
    ref = load_autoencoder_kl(str(tmp_path / "pipe" / "vae"))
    x = np.linspace(-1, 1, 2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16, 1)
    np.testing.assert_allclose(np.asarray(ae.encode(x)), np.asarray(ref.to_latents(x)), rtol=1e-5, atol=1e-6)
