"""Time and class embeddings for diffusion UNets."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nn.layers import Dense


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) time steps, in float32.

    Args:
      t: ``(B,)`` time steps.
      dim: embedding width ``D``.
      flip_sin_to_cos: order ``[cos, sin]`` if True, ``[sin, cos]`` otherwise.
      freq_shift: frequencies are ``exp(-log(max_period) * i / (D/2 - freq_shift))``, ``i < D/2``.

    Returns:
      ``(B, D)`` float32 (zero-padded by one column when ``D`` is odd).
    """
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = scale * t[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """Two-layer SiLU MLP on the sinusoidal embedding. ``(B, in_dim) -> (B, out_dim)``.

    Sub-modules ``linear_1 (in_dim -> out_dim)``, ``linear_2 (out_dim -> out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Dense(in_dim, out_dim, axes=("embed", "mlp"), **kw)
        self.linear_2 = Dense(out_dim, out_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, in_dim)`` -> ``(B, out_dim)``."""
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
