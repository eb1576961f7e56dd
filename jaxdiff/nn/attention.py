"""Attention layers: multi-head (self/cross) attention, the spatial self-attention block of
DDPM/LDM UNets and VAEs, and the Stable-Diffusion transformer block (self-attn, cross-attn,
GEGLU feed-forward). All act on NHWC feature maps or ``(B, T, C)`` sequences and call
``jax.nn.dot_product_attention``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nn.layers import Conv2d, Dense, GroupNorm, LayerNorm


class Attention(nnx.Module):
    """Multi-head scaled dot-product attention with ``to_q/to_k/to_v/to_out`` projections.

    ``x (B, T, query_dim)``, optional ``context (B, S, context_dim)`` (self-attention when absent)
    -> ``(B, T, query_dim)``. Scale ``1/sqrt(head_dim)``; softmax in float32.
    """

    def __init__(self, query_dim: int, *, heads: int, head_dim: int, context_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim, self.dtype = heads, head_dim, dtype
        self.to_q = Dense(query_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_k = Dense(context_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_v = Dense(context_dim, inner, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
        self.to_out = Dense(inner, query_dim, use_bias=out_bias, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x``: ``(B, T, Cq)``; ``context``: ``(B, S, Cc)`` or None -> ``(B, T, Cq)``."""
        context = x if context is None else context
        b, t, _ = x.shape
        s = context.shape[1]
        q = self.to_q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.to_k(context).reshape(b, s, self.heads, self.head_dim)
        v = self.to_v(context).reshape(b, s, self.heads, self.head_dim)
        o = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.to_out(o.reshape(b, t, self.heads * self.head_dim))


class SpatialSelfAttention(Attention):
    """Residual self-attention over the pixels of a feature map (DDPM / LDM ``AttnBlock``).

    ``(B, H, W, C) -> (B, H, W, C)``: ``(x + to_out(attn(group_norm(x)))) / rescale_output_factor``.
    Sub-modules ``group_norm`` (absent when ``norm_groups is None``), ``to_q/to_k/to_v/to_out``
    (all with bias).
    """

    def __init__(self, channels: int, *, heads: int = 1, norm_groups: int | None = 32,
                 eps: float = 1e-6, rescale_output_factor: float = 1.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if heads < 1 or channels % heads:
            raise ValueError(f"attention: channels={channels} not divisible by heads={heads}")
        super().__init__(channels, heads=heads, head_dim=channels // heads, qkv_bias=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = (GroupNorm(norm_groups, channels, eps=eps, dtype=dtype, param_dtype=param_dtype)
                           if norm_groups else None)
        self.rescale = rescale_output_factor

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        b, h, w, c = x.shape
        y = self.group_norm(x) if self.group_norm is not None else x
        y = super().__call__(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        return (y + x.astype(y.dtype)) / self.rescale


class GEGLUFeedForward(nnx.Module):
    """GEGLU MLP: ``out(a * gelu(g))`` with ``[a, g] = geglu(x)``. ``(B, T, C) -> (B, T, C)``.

    Sub-modules ``geglu (C -> 2*mult*C)`` and ``out (mult*C -> C)``; exact (erf) GELU.
    """

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.geglu = Dense(dim, 2 * inner, axes=("embed", "mlp"), **kw)
        self.out = Dense(inner, dim, axes=("mlp", "embed"), **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, T, C)`` -> ``(B, T, C)``."""
        a, g = jnp.split(self.geglu(x), 2, axis=-1)
        y = a * jax.nn.gelu(g, approximate=False)
        if self.dropout is not None:
            y = self.dropout(y)
        return self.out(y)


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on ``context``, GEGLU feed-forward.

    ``x (B, T, C)``, ``context (B, S, context_dim)`` -> ``(B, T, C)``. Sub-modules ``norm1, attn1,
    norm2, attn2, norm3, ff`` (attention projections without bias, output projection with bias).
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int, eps: float = 1e-5,
                 dropout: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, **nkw)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, **kw)
        self.norm2 = LayerNorm(dim, **nkw)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim, **kw)
        self.norm3 = LayerNorm(dim, **nkw)
        self.ff = GEGLUFeedForward(dim, dropout=dropout, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x``: ``(B, T, C)``, ``context``: ``(B, S, Cc)`` -> ``(B, T, C)``."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """Spatial transformer of Stable Diffusion: GroupNorm, ``proj_in``, ``depth`` transformer blocks,
    ``proj_out``, residual. ``x (B, H, W, C)``, ``context (B, S, Cc)`` -> ``(B, H, W, C)``.

    ``linear_projection`` selects Dense (SD 2.x) or 1x1 Conv (SD 1.x) projections; inner width is
    ``heads * head_dim``.
    """

    def __init__(self, channels: int, *, heads: int, head_dim: int, context_dim: int, depth: int = 1,
                 norm_groups: int = 32, linear_projection: bool = False, dropout: float = 0.0,
                 remat: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
        self.linear_projection = linear_projection
        if linear_projection:
            self.proj_in = Dense(channels, inner, axes=("embed", "mlp"), **kw)
            self.proj_out = Dense(inner, channels, axes=("mlp", "embed"), **kw)
        else:
            self.proj_in = Conv2d(channels, inner, 1, **kw)
            self.proj_out = Conv2d(inner, channels, 1, **kw)
        self.transformer_blocks = nnx.List([
            TransformerBlock(inner, heads=heads, head_dim=head_dim, context_dim=context_dim,
                             dropout=dropout, **kw) for _ in range(depth)])
        self.remat = remat

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, C)``, ``context``: ``(B, S, Cc)`` -> ``(B, H, W, C)``."""
        b, h, w, c = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.reshape(b, h * w, c))
        else:
            y = self.proj_in(y)
            y = y.reshape(b, h * w, y.shape[-1])
        for blk in self.transformer_blocks:
            y = nnx.remat(lambda m, a, cx: m(a, cx))(blk, y, context) if self.remat else blk(y, context)
        if self.linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c)
        else:
            y = self.proj_out(y.reshape(b, h, w, y.shape[-1]))
        return y + x.astype(y.dtype)
