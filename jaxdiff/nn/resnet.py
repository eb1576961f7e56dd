"""Residual block of DDPM/ADM/LDM UNets and autoencoders."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nn.layers import Conv2d, Dense, GroupNorm


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with time-embedding injection and a (1x1) shortcut.

    ``x (B, H, W, in_ch)``, ``temb (B, temb_dim)`` or None -> ``(B, H, W, out_ch)``.

    ``time_embedding_norm``: ``"default"`` adds ``proj(silu(temb))`` after ``conv1``;
    ``"scale_shift"`` (AdaGN) applies ``norm2(h) * (1 + scale) + shift``. The output is
    ``(shortcut(x) + h) / output_scale_factor``. Sub-modules ``norm1, conv1, time_emb_proj,
    norm2, conv2, conv_shortcut`` (the last only when ``in_ch != out_ch``).
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_dim: int | None = None,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6,
                 dropout: float = 0.0, time_embedding_norm: str = "default",
                 output_scale_factor: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        out_ch = out_ch or in_ch
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"unsupported time_embedding_norm={time_embedding_norm!r} "
                             "(expected 'default' or 'scale_shift')")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_ch, **nkw)
        self.conv1 = Conv2d(in_ch, out_ch, 3, **kw)
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.time_emb_proj = (Dense(temb_dim, out_ch * (2 if self.scale_shift else 1),
                                    axes=("embed", "conv_out"), **kw) if temb_dim else None)
        self.norm2 = GroupNorm(groups_out or groups, out_ch, **nkw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.conv2 = Conv2d(out_ch, out_ch, 3, **kw)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor
        self.dtype = dtype

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """``x``: ``(B, H, W, in_ch)``; ``temb``: ``(B, temb_dim)`` or None -> ``(B, H, W, out_ch)``."""
        x = jnp.asarray(x, self.dtype)
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(jax.nn.silu(jnp.asarray(temb, self.dtype)))[:, None, None, :]
        if t is not None and self.scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            if t is not None:
                h = h + t
            h = self.norm2(h)
        h = jax.nn.silu(h)
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out
