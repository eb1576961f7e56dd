"""CLIP's text transformer in Flax NNX: the text encoder of Stable Diffusion 1.x / 2.x.

``CLIPTextModel(input_ids (B, S) int) -> CLIPTextOutput(last_hidden_state (B, S, D), pooler_output (B, D),
hidden_states)``: token + position embeddings, ``num_layers`` pre-LayerNorm blocks (causal multi-head
self-attention, an MLP with quick-GELU or GELU), a final LayerNorm. The pooled output is the final state at
the end-of-text token, found as transformers finds it (the first ``eos_token_id``; the largest id for the
legacy configs with ``eos_token_id == 2``).

Stable Diffusion conditions on ``last_hidden_state`` (SD 1.x, and SD 2.x whose checkpoint already drops the
last layer); diffusers' ``clip_skip=k`` takes the output of layer ``L - k`` through the final LayerNorm:
:meth:`CLIPTextModel.encode` does both.

Module tree (what :mod:`jaxdiff.convert.clip` maps to transformers' ``text_model.*`` keys):
``embeddings.{token_embedding, position_embedding}``, ``layers[i].{layer_norm1, self_attn.{to_q, to_k, to_v,
to_out}, layer_norm2, mlp.{fc1, fc2}}``, ``final_layer_norm``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.attention import Attention
from jaxdiff.nn.layers import Dense, Embed, LayerNorm, make_param

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of :class:`CLIPTextModel` (the fields of transformers' ``CLIPTextConfig`` that change the
    network; ``eos_token_id`` chooses the pooled position)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406       # metadata (kept for export)
    pad_token_id: int | None = 1           # metadata (kept for export)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text encoder: unsupported hidden_act {self.hidden_act!r} "
                             f"(supported: {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"CLIP text encoder: hidden_size={self.hidden_size} not divisible by "
                             f"num_heads={self.num_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"CLIP text encoder: {name} must be a positive integer, got {v!r}")

    def replace(self, **kw) -> "CLIPTextConfig":
        return dataclasses.replace(self, **kw)


class CLIPTextOutput(NamedTuple):
    """``last_hidden_state (B, S, D)`` (after the final LayerNorm), ``pooler_output (B, D)`` and, when asked,
    ``hidden_states``: the embeddings and each layer's output (``num_layers + 1`` arrays, before the final
    LayerNorm, as transformers returns them)."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple | None = None


class CLIPEmbeddings(nnx.Module):
    """Token + learned position embeddings. ``ids (B, S)`` -> ``(B, S, D)``."""

    def __init__(self, c: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = Embed(c.vocab_size, c.hidden_size, **kw)
        self.position_embedding = Embed(c.max_position_embeddings, c.hidden_size, **kw)

    def __call__(self, ids: jax.Array) -> jax.Array:
        s = ids.shape[-1]
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(s))[None]


class CausalSelfAttention(Attention):
    """Multi-head self-attention (all projections with bias) under a causal mask, optionally also masking
    padded keys. ``x (B, S, D)``, ``attention_mask (B, S)`` of 1 (keep) / 0 (pad) or None -> ``(B, S, D)``."""

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(dim, heads=heads, head_dim=dim // heads, qkv_bias=True, out_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        q, k, v = (p(x).reshape(shape) for p in (self.to_q, self.to_k, self.to_v))
        mask = None
        if attention_mask is not None:
            causal = jnp.tril(jnp.ones((s, s), bool))
            mask = causal[None, None] & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        o = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask,
                                         is_causal=mask is None)
        return self.to_out(o.reshape(b, s, self.heads * self.head_dim))


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))``. ``(B, S, D) -> (B, S, D)``."""

    def __init__(self, c: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = c.hidden_act
        self.fc1 = Dense(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(.))``."""

    def __init__(self, c: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(eps=c.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(c.hidden_size, **nkw)
        self.self_attn = CausalSelfAttention(c.hidden_size, c.num_heads, **kw)
        self.layer_norm2 = LayerNorm(c.hidden_size, **nkw)
        self.mlp = CLIPMLP(c, **kw)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), attention_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
    """CLIP's text transformer (see the module docstring). Parameters in ``param_dtype``, compute in ``dtype``
    (LayerNorm statistics and the attention softmax in float32)."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        c = config
        self.config, self.dtype, self.param_dtype = c, dtype, param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPEmbeddings(c, **kw)
        self.layers = nnx.List([CLIPEncoderLayer(c, **kw) for _ in range(c.num_layers)])
        self.final_layer_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype,
                                          param_dtype=param_dtype)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _check_ids(self, ids) -> None:
        shape = np.shape(ids)
        if len(shape) != 2:
            raise ValueError(f"CLIP text encoder: input_ids must have shape (B, S), got {tuple(shape)}")
        if shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIP text encoder: sequence length {shape[1]} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}: truncate the tokens")

    def _run(self, ids, attention_mask, num_layers, keep_hidden):
        h = self.embeddings(jnp.asarray(ids, jnp.int32))
        hidden = [h] if keep_hidden else None
        for layer in list(self.layers)[:num_layers]:
            h = layer(h, attention_mask)
            if keep_hidden:
                hidden.append(h)
        return h, hidden

    def pooled(self, ids: jax.Array, last_hidden_state: jax.Array) -> jax.Array:
        """``(B, D)``: ``last_hidden_state`` at the end-of-text position of each row of ``ids``."""
        ids = jnp.asarray(ids, jnp.int32)
        if self.config.eos_token_id == 2:      # legacy configs: the eos token has the largest id
            pos = jnp.argmax(ids, axis=-1)
        else:                                  # the first eos token (padding may repeat it)
            pos = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, pos[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        """``input_ids (B, S)`` (``S <= max_position_embeddings``), optional padding ``attention_mask (B, S)``
        -> :class:`CLIPTextOutput` (as transformers' ``CLIPTextModel``)."""
        self._check_ids(input_ids)
        h, hidden = self._run(input_ids, attention_mask, self.config.num_layers, output_hidden_states)
        last = self.final_layer_norm(h)
        return CLIPTextOutput(last, self.pooled(input_ids, last), tuple(hidden) if hidden is not None else None)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               clip_skip: int = 0) -> jax.Array:
        """Prompt embeddings ``(B, S, D)`` as diffusers' Stable Diffusion pipelines compute them:
        ``last_hidden_state`` (``clip_skip=0``), or the output of layer ``num_layers - clip_skip`` through the
        final LayerNorm (the later layers are not run)."""
        self._check_ids(input_ids)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not (
                0 <= clip_skip < self.config.num_layers):
            raise ValueError(f"clip_skip must be an integer in [0, {self.config.num_layers}), got {clip_skip!r}")
        h, _ = self._run(input_ids, attention_mask, self.config.num_layers - clip_skip, False)
        return self.final_layer_norm(h)

    def resize_token_embeddings(self, num_tokens: int, new_rows=None) -> None:
        """Grow (or shrink) the token table to ``num_tokens`` rows (added tokens: textual inversion,
        personalization). Existing rows are kept; new rows are ``new_rows`` (``(num_new, D)``) or, when None,
        the mean of the existing embeddings. Updates ``config.vocab_size``."""
        table = self.embeddings.token_embedding.embedding
        old = table.get_value()
        n_old, d = old.shape
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if num_tokens <= n_old:
            if new_rows is not None:
                raise ValueError("new_rows given but the table does not grow")
            value = old[:num_tokens]
        else:
            n_new = num_tokens - n_old
            if new_rows is None:
                rows = jnp.broadcast_to(jnp.mean(old.astype(jnp.float32), axis=0), (n_new, d))
            else:
                rows = jnp.asarray(new_rows, jnp.float32)
                if rows.shape != (n_new, d):
                    raise ValueError(f"new_rows must have shape {(n_new, d)}, got {tuple(rows.shape)}")
            value = jnp.concatenate([old, rows.astype(old.dtype)], axis=0)
        self.embeddings.token_embedding.embedding = make_param(None, lambda _, s: value, value.shape,
                                                               old.dtype, ("vocab", "embed"))
        self.config = self.config.replace(vocab_size=int(num_tokens))

    def add_token_embeddings(self, vectors) -> list[int]:
        """Append ``vectors (n, D)`` as new token embeddings; returns their ids (``vocab_size .. + n``)."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.config.hidden_size:
            raise ValueError(f"token embeddings must have shape (n, {self.config.hidden_size}), got {vectors.shape}")
        start = self.config.vocab_size
        self.resize_token_embeddings(start + len(vectors), vectors)
        return list(range(start, start + len(vectors)))


__all__ = ["ACTIVATIONS", "CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "CausalSelfAttention"]
