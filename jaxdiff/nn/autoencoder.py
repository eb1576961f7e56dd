"""KL autoencoder of latent diffusion (CompVis / diffusers ``AutoencoderKL``), NHWC.

``encode(x (B, H, W, C)) -> DiagonalGaussian`` over ``(B, H/f, W/f, latent_channels)`` with
``f = 2 ** (len(block_out_channels) - 1)``; ``decode(z) -> (B, H, W, out_channels)``.
The latent scale (and optional shift) factor is part of the model: see :meth:`AutoencoderKL.to_latents`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.layers import Conv2d, GroupNorm
from jaxdiff.nn.unet_blocks import BlockOptions, DownBlock, MidBlock, UpBlock


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the LDM encoder/decoder pair (shared by :class:`AutoencoderKL` and
    :class:`jaxdiff.nn.vq.VQModel`). ``scaling_factor``/``shift_factor`` map posterior samples to
    diffusion latents: ``(z - shift) * scale``."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    num_vq_embeddings: int = 256       # VQ only
    vq_embed_dim: int | None = None    # VQ only (defaults to latent_channels)

    def replace(self, **kw) -> "AutoencoderConfig":
        """Copy with fields replaced."""
        return dataclasses.replace(self, **kw)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction ``f`` between images and latents."""
        return 2 ** (len(self.block_out_channels) - 1)


def _options(c: AutoencoderConfig, dtype, param_dtype, remat) -> BlockOptions:
    return BlockOptions(temb_dim=None, groups=c.norm_num_groups, eps=1e-6, remat=remat, dtype=dtype,
                        param_dtype=param_dtype)


class Encoder(nnx.Module):
    """``(B, H, W, in_channels) -> (B, H/f, W/f, out_ch)``; ``out_ch = 2 * latent`` when ``double_z``.

    Sub-modules ``conv_in, down_blocks, mid_block, conv_norm_out, conv_out``.
    """

    def __init__(self, c: AutoencoderConfig, *, double_z: bool, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        o = _options(c, dtype, param_dtype, remat)
        chs = tuple(c.block_out_channels)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_channels = c.in_channels
        self.conv_in = Conv2d(c.in_channels, chs[0], 3, **kw)
        blocks, ch = [], chs[0]
        for i, out in enumerate(chs):
            blocks.append(DownBlock(o, ch, out, num_layers=c.layers_per_block, attention=None, heads=1,
                                    add_downsample=i != len(chs) - 1, downsample_padding=0, temb=False,
                                    rngs=rngs))
            ch = out
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(o, ch, attention="self" if c.mid_block_add_attention else None, heads=1,
                                  temb=False, rngs=rngs)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, ch, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch, c.latent_channels * (2 if double_z else 1), 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, in_channels)`` -> ``(B, H/f, W/f, out_ch)``."""
        h = self.conv_in(x)
        for blk in self.down_blocks:
            h, _ = blk(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """``(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)``.

    Sub-modules ``conv_in, mid_block, up_blocks, conv_norm_out, conv_out``.
    """

    def __init__(self, c: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        o = _options(c, dtype, param_dtype, remat)
        chs = tuple(reversed(c.block_out_channels))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = Conv2d(c.latent_channels, chs[0], 3, **kw)
        self.mid_block = MidBlock(o, chs[0], attention="self" if c.mid_block_add_attention else None,
                                  heads=1, temb=False, rngs=rngs)
        blocks, ch = [], chs[0]
        for i, out in enumerate(chs):
            blocks.append(UpBlock(o, ch, out, skip_channels=None, num_layers=c.layers_per_block + 1,
                                  attention=None, heads=1, add_upsample=i != len(chs) - 1, temb=False,
                                  rngs=rngs))
            ch = out
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, ch, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch, c.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``z``: ``(B, h, w, latent_channels)`` -> ``(B, h*f, w*f, out_channels)``."""
        h = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            h = blk(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DiagonalGaussian:
    """Diagonal Gaussian posterior ``N(mean, exp(logvar))``; ``mean``/``logvar``: ``(B, h, w, C)``
    (logvar clamped to ``[-30, 20]``)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split ``(B, h, w, 2C)`` encoder moments into mean and clamped log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        """``(B, h, w, C)`` standard deviation."""
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """Reparameterised sample ``mean + std * eps``, ``(B, h, w, C)``."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """The mean, ``(B, h, w, C)``."""
        return self.mean

    def kl(self) -> jax.Array:
        """``KL(q || N(0, I))`` summed over latent dims, ``(B,)``."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                             axis=(1, 2, 3))

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of ``x (B, h, w, C)`` summed over latent dims, ``(B,)``."""
        return 0.5 * jnp.sum(np.log(2 * np.pi) + self.logvar + jnp.square(x - self.mean)
                             / jnp.exp(self.logvar), axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
    """KL-regularised autoencoder (LDM f4/f8). NHWC.

    ``encode(x (B, H, W, in)) -> DiagonalGaussian over (B, H/f, W/f, latent)``;
    ``decode(z) -> (B, H, W, out)``; ``__call__(x, key=None) -> (reconstruction, posterior)``.
    Sub-modules ``encoder, quant_conv, post_quant_conv, decoder``.
    """

    def __init__(self, config: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(c, double_z=True, remat=remat, **kw)
        self.quant_conv = Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1, **kw) if c.use_quant_conv else None
        self.post_quant_conv = (Conv2d(c.latent_channels, c.latent_channels, 1, **kw)
                                if c.use_post_quant_conv else None)
        self.decoder = Decoder(c, remat=remat, **kw)

    def _check(self, shape, channels, what):
        f = self.config.downsample_factor if what == "image" else 1
        if len(shape) != 4 or shape[-1] != channels:
            raise ValueError(f"{what} must have shape (B, H, W, {channels}) (NHWC), got {tuple(shape)}")
        if shape[1] % f or shape[2] % f:
            raise ValueError(f"image size {shape[1]}x{shape[2]} is not divisible by the downsampling factor {f}")

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """``x``: ``(B, H, W, in_channels)`` -> posterior over ``(B, H/f, W/f, latent_channels)``."""
        self._check(np.shape(x), self.config.in_channels, "image")
        h = self.encoder(jnp.asarray(x, self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """``z``: ``(B, h, w, latent_channels)`` (unscaled) -> ``(B, h*f, w*f, out_channels)``."""
        self._check(np.shape(z), self.config.latent_channels, "latent")
        z = jnp.asarray(z, self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def to_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion latents ``(sample_or_mode - shift) * scaling_factor``, ``(B, H/f, W/f, latent)``."""
        post = self.encode(x)
        z = post.sample(key) if key is not None else post.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def from_latents(self, z: jax.Array) -> jax.Array:
        """Decode diffusion latents: ``decode(z / scaling_factor + shift)``, ``(B, H, W, out)``."""
        return self.decode(z / self.config.scaling_factor + (self.config.shift_factor or 0.0))

    def __call__(self, x: jax.Array, key: jax.Array | None = None):
        """``x``: ``(B, H, W, in)`` -> ``(reconstruction (B, H, W, out), posterior)``; samples the
        posterior when ``key`` is given, else uses its mode."""
        post = self.encode(x)
        z = post.sample(key) if key is not None else post.mode()
        return self.decode(z), post
