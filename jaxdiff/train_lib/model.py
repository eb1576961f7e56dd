"""The network a training config describes, and the denoiser that sampling calls.

``build_model`` turns ``config.model`` into a :class:`jaxdiff.nn.UNet`; ``split_model`` separates its
graph from its parameters (what the train state holds); ``make_denoiser`` wraps merged parameters as the
solvers' ``f(x, t[, labels])`` in continuous time.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
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
    cfg = UNetConfig(in_channels=channels, out_channels=channels,
                     class_null=bool(m.num_classes) and config.train.label_dropout > 0, **fields)
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


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: the trainable parameters and any other state, apart."""
    return nnx.split(model, nnx.Param, ...)


def make_apply(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable[..., jax.Array]:
    """``apply(params, x (B,H,W,C), model_time (B,), labels (B,) | None, dropout_key=None) -> (B,H,W,C)``, pure.

    With a ``dropout_key`` the network runs in training mode (dropout masks drawn from that key); without
    one, in evaluation mode (dropout off). ``rest`` (dropout RNG state, if any) is kept as plain arrays
    and merged afresh inside each trace, so nothing is mutated across ``jit`` boundaries.
    """
    rest_values = nnx.to_pure_dict(rest)
    has_rngs = bool(jax.tree.leaves(rest_values))

    def apply(params, x, model_time, labels=None, dropout_key=None):
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest_values))
        if dropout_key is not None and has_rngs:
            nnx.reseed(model, default=dropout_key)
        else:
            model.eval()
        return model(x, model_time, labels=labels)
    return apply


def make_denoiser(apply: Callable[..., jax.Array], params: Any, process) -> Callable[..., jax.Array]:
    """Solver-facing ``f(x, t[, labels])`` in continuous time: the network sees ``process.model_time(t)``
    and returns its prediction in float32."""
    def denoiser(x, t, labels=None):
        return apply(params, x, process.model_time(t), labels).astype(jnp.float32)
    return denoiser
