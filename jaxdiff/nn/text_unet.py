"""A UNet conditioned on text through its cross-attention, with the text encoder inside the module: the network of
text-conditioned training (a small encoder trained jointly with the UNet, as LDM's text-to-image model, or a
pretrained one kept frozen by the trainer's parameter filter).

``TextConditionedUNet(x (B, H, W, C), t (B,), condition) -> (B, H, W, C)`` where ``condition`` is either token ids
``(B, S)`` int (encoded here: :meth:`encode_text`) or an already encoded context ``(B, S, D)`` float (sampling
encodes each prompt once and reuses it over the solver's steps). Any encoder with ``encode(ids, clip_skip=k) ->
(B, S, D)`` and ``config.hidden_size`` fits (the CLIP text transformer of :mod:`jaxdiff.nn.clip_text`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.unet import UNet


class TextConditionedUNet(nnx.Module):
    """``unet`` (with ``cross_attention_dim`` equal to the encoder's width) + ``text_encoder``; see the module
    docstring. Parameter paths start with ``unet`` and ``text_encoder``."""

    def __init__(self, unet: UNet, text_encoder: nnx.Module, *, clip_skip: int = 0):
        width, cross = text_encoder.config.hidden_size, unet.config.cross_attention_dim
        if cross is None:
            raise ValueError("text conditioning needs a UNet with cross-attention: put 'cross' in "
                             "down_attention / mid_attention (cross_attention_dim is None)")
        if width != cross:
            raise ValueError(f"the text encoder's width ({width}) does not match the UNet's cross_attention_dim "
                             f"({cross})")
        self.unet, self.text_encoder, self.clip_skip = unet, text_encoder, int(clip_skip)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """``tokens (B, S)`` int -> context ``(B, S, D)`` (the encoder's last or, with ``clip_skip``, an earlier
        layer through its final LayerNorm)."""
        return self.text_encoder.encode(jnp.asarray(tokens, jnp.int32), clip_skip=self.clip_skip)

    def __call__(self, x: jax.Array, t, condition: jax.Array) -> jax.Array:
        """``condition``: token ids ``(B, S)`` (integers) or a context ``(B, S, D)`` (floats)."""
        ndim = np.ndim(condition)
        if ndim == 2 and jnp.issubdtype(jnp.asarray(condition).dtype, jnp.integer):
            context = self.encode_text(condition)
        elif ndim == 3:
            context = condition
        else:
            raise ValueError(f"condition must be token ids (B, S) int or a context (B, S, "
                             f"{self.unet.config.cross_attention_dim}) float, got shape {np.shape(condition)} "
                             f"{jnp.asarray(condition).dtype}")
        return self.unet(x, t, context)


__all__ = ["TextConditionedUNet"]
