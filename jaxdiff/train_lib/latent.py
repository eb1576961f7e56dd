"""Latent diffusion's frozen first stage: a trained autoencoder run (``task="autoencoder"``) or a diffusers
``AutoencoderKL`` folder (e.g. Stable Diffusion's ``vae/``), loaded as ``encode`` (images -> scaled
latents) and ``decode`` (scaled latents -> images) for a diffusion model trained on its latents
(``config.latent.autoencoder``)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax

from jaxdiff.parallel import make_mesh
from jaxdiff.train_lib.ae_experiment import SCALE_FILE, build_autoencoder_experiment
from jaxdiff.train_lib.checkpoint import restore_workdir


@dataclasses.dataclass
class FrozenAutoencoder:
    """``encode(x (B,H,W,C) in [-1,1]) -> (B,h,w,c)`` latents times ``scale``; ``decode`` the inverse map
    back to images. ``shape``: ``(h, w, c)`` for the config's image size. Parameters: the run's EMA."""

    workdir: str
    step: int
    scale: float
    shape: tuple[int, int, int]
    encode: Callable[[jax.Array], jax.Array]
    decode: Callable[[jax.Array], jax.Array]


def load_frozen_autoencoder(workdir: str, image_size: int) -> FrozenAutoencoder:
    """The autoencoder of a finished ``task="autoencoder"`` run in ``workdir`` (or of a diffusers
    ``AutoencoderKL`` folder, see :func:`load_diffusers_autoencoder`); raises ValueError naming what is
    missing (no checkpoint, not an autoencoder run, no measured latent scale)."""
    for folder in (workdir, os.path.join(workdir, "vae")):
        if os.path.exists(os.path.join(folder, "config.json")):
            return load_diffusers_autoencoder(folder, image_size)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"latent.autoencoder={workdir!r}: no autoencoder checkpoint there (train one with "
                         f"python train.py --config configs/ae_digits.py --workdir {workdir})")
    try:
        exp, state, step = restore_workdir(workdir, build_autoencoder_experiment, task="autoencoder",
                                           mesh=make_mesh(1, 1, jax.devices()[:1]))
    except FileNotFoundError as e:
        raise ValueError(f"latent.autoencoder={workdir!r}: {e}") from None
    scale_path = os.path.join(workdir, SCALE_FILE)
    if not os.path.exists(scale_path):
        raise ValueError(f"latent.autoencoder={workdir!r} has no {SCALE_FILE}: its training has not finished "
                         "(the latent scale factor is measured at the end)")
    with open(scale_path) as f:
        scale = float(json.load(f)["scale_factor"])
    params = jax.device_get(state.ema_params)
    a = exp.config.autoencoder
    f = 2 ** (len(a.block_out_channels) - 1)
    if image_size % f:
        raise ValueError(f"image_size {image_size} is not divisible by the autoencoder's factor {f}")
    merged = exp.merged

    def encode(x):
        return exp.encode(params, x) * scale

    def decode(z):
        return merged(params).decode(z / scale)

    return FrozenAutoencoder(workdir=workdir, step=step, scale=scale,
                             shape=(image_size // f, image_size // f, a.latent_channels), encode=encode, decode=decode)


def load_diffusers_autoencoder(folder: str, image_size: int) -> FrozenAutoencoder:
    """A diffusers ``AutoencoderKL`` folder (``config.json`` + weights) as the frozen first stage, with the
    ``scaling_factor`` (and ``shift_factor``) of its config, as Stable Diffusion uses it."""
    from flax import nnx

    from jaxdiff.convert import load_autoencoder_kl
    model = load_autoencoder_kl(folder)
    c = model.config
    f = c.downsample_factor
    if image_size % f:
        raise ValueError(f"image_size {image_size} is not divisible by the autoencoder's factor {f}")
    graphdef, state = nnx.split(model)

    def encode(x):
        return nnx.merge(graphdef, state).to_latents(x)

    def decode(z):
        return nnx.merge(graphdef, state).from_latents(z)

    return FrozenAutoencoder(workdir=folder, step=-1, scale=float(c.scaling_factor),
                             shape=(image_size // f, image_size // f, c.latent_channels), encode=encode, decode=decode)


def check_latent_config(config, ae: FrozenAutoencoder) -> None:
    """ValueError unless ``config.latent.size`` / ``.channels`` equal the autoencoder's latent shape and the
    data's channels its input channels."""
    want = (config.latent.size, config.latent.size, config.latent.channels)
    if want != ae.shape:
        raise ValueError(f"latent shape {want} (latent.size, latent.channels) does not match the autoencoder in "
                         f"{ae.workdir}: it maps {config.data.image_size}x{config.data.image_size} images to "
                         f"{ae.shape} latents")
