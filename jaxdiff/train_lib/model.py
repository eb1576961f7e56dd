"""The network a training config describes: ``build_model`` turns ``config.model`` into a
:class:`jaxdiff.nn.UNet` (``jaxdiff.nn.functional`` splits it into graph and parameters)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxdiff.nn import UNet, UNetConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NOT_UNET_FIELDS = ("dtype", "remat")


def unet_config(config) -> UNetConfig:
    """``UNetConfig`` from ``config.model`` and ``config.data`` (channels; ``class_null`` when labels drop)."""
    m = config.model
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in _NOT_UNET_FIELDS}
    channels = config.latent.channels if config.latent.autoencoder else config.data.channels
    super_res = config.cascade.low_res_size is not None      # a super-resolution stage of a cascade
    cfg = UNetConfig(in_channels=channels, out_channels=channels,
                     class_null=bool(m.num_classes) and config.train.label_dropout > 0,
                     low_res_channels=channels if super_res else 0, aug_level_embedding=super_res, **fields)
    return cfg


def build_model(config, seed: int = 0) -> UNet:
    """The UNet of ``config`` with parameters initialised from ``seed`` (float32 storage)."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
    latent = config.latent.autoencoder is not None
    if latent and not (config.latent.size and config.latent.channels):
        raise ValueError("latent.autoencoder is set: give latent.size and latent.channels (the latent shape the "
                         "UNet sees), e.g. 8 and 3 for an f4 autoencoder with 3 latent channels on 32x32 images")
    size = config.latent.size if latent else config.data.image_size
    levels = len(config.model.block_out_channels)
    if size % (2 ** (levels - 1)):
        raise ValueError(f"image_size {size} is not divisible by 2^{levels - 1} (the UNet's "
                         f"{levels - 1} downsamplings)")
    return UNet(unet_config(config), dtype=DTYPES[config.model.dtype], remat=config.model.remat,
                rngs=nnx.Rngs(seed))
