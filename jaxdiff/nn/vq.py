"""Vector-quantised autoencoder of latent diffusion (diffusers ``VQModel``), NHWC."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.autoencoder import AutoencoderConfig, Decoder, Encoder
from jaxdiff.nn.layers import Conv2d, Embed, _uniform, make_param


class VectorQuantizer(nnx.Module):
    """Nearest-codebook quantiser with straight-through gradients.

    ``z (B, h, w, D) -> (z_q (B, h, w, D), loss (), indices (B, h, w))``. ``loss`` is the VQ-VAE
    codebook + commitment loss; with ``legacy=True`` (diffusers' default) it is
    ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``, otherwise the terms' weights swap.
    Sub-module ``embedding`` (codebook ``(num_codes, D)``).
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, legacy: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.beta, self.legacy, self.dtype = beta, legacy, dtype
        self.embedding = Embed(num_codes, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embedding.embedding = make_param(rngs, lambda g, s: _uniform(g, s, -1.0 / num_codes, 1.0 / num_codes),
                                              (num_codes, dim), param_dtype, ("vocab", "embed"))

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook rows for integer ``indices (...)`` -> ``(..., D)``."""
        return self.embedding(indices)

    def __call__(self, z: jax.Array):
        """``z``: ``(B, h, w, D)`` -> ``(z_q, loss, indices)``."""
        z = jnp.asarray(z, jnp.float32)
        codes = self.embedding.embedding[...].astype(jnp.float32)
        flat = z.reshape(-1, z.shape[-1])
        d2 = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ codes.T + jnp.sum(codes ** 2, -1)[None])
        idx = jnp.argmin(d2, axis=-1)
        z_q = codes[idx].reshape(z.shape)
        sg = jax.lax.stop_gradient
        commit = jnp.mean(jnp.square(sg(z_q) - z))
        codebook = jnp.mean(jnp.square(z_q - sg(z)))
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + sg(z_q - z)
        return z_q.astype(self.dtype), loss, idx.reshape(z.shape[:-1])


class VQModel(nnx.Module):
    """VQ autoencoder. ``encode(x (B, H, W, in)) -> (B, H/f, W/f, vq_embed_dim)`` pre-quantisation
    latents; ``decode(h) -> (B, H, W, out)`` quantises first (as diffusers does);
    ``__call__(x) -> (reconstruction, commit_loss)``.
    Sub-modules ``encoder, quant_conv, quantize, post_quant_conv, decoder``.
    """

    def __init__(self, config: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        d = c.vq_embed_dim or c.latent_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(c, double_z=False, remat=remat, **kw)
        self.quant_conv = Conv2d(c.latent_channels, d, 1, **kw)
        self.quantize = VectorQuantizer(c.num_vq_embeddings, d, **kw)
        self.post_quant_conv = Conv2d(d, c.latent_channels, 1, **kw)
        self.decoder = Decoder(c, remat=remat, **kw)

    def encode(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, in_channels)`` -> ``(B, H/f, W/f, vq_embed_dim)`` (not yet quantised)."""
        s, c = np.shape(x), self.config
        f = c.downsample_factor
        if len(s) != 4 or s[-1] != c.in_channels:
            raise ValueError(f"image must have shape (B, H, W, {c.in_channels}) (NHWC), got {tuple(s)}")
        if s[1] % f or s[2] % f:
            raise ValueError(f"image size {s[1]}x{s[2]} is not divisible by the downsampling factor {f}")
        return self.quant_conv(self.encoder(jnp.asarray(x, self.dtype)))

    def decode(self, h: jax.Array, force_not_quantize: bool = False):
        """``h``: ``(B, h, w, vq_embed_dim)`` -> ``(reconstruction (B, H, W, out), commit_loss ())``."""
        if force_not_quantize:
            q, loss = jnp.asarray(h, self.dtype), jnp.zeros((), jnp.float32)
        else:
            q, loss, _ = self.quantize(h)
        return self.decoder(self.post_quant_conv(q)), loss

    def __call__(self, x: jax.Array):
        """``x``: ``(B, H, W, in)`` -> ``(reconstruction (B, H, W, out), commit_loss ())``."""
        return self.decode(self.encode(x))
