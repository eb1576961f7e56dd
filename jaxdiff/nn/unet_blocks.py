"""Down, mid and up stages of the UNet: residual blocks interleaved with optional spatial
self-attention (``"self"``) or cross-attention transformers (``"cross"``), then a resampler."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.nn.attention import SpatialSelfAttention, Transformer2D
from jaxdiff.nn.layers import Downsample2D, Upsample2D
from jaxdiff.nn.resnet import ResnetBlock2D

ATTENTION_KINDS = (None, "self", "cross")


@dataclass(frozen=True)
class BlockOptions:
    """Options shared by every stage of one UNet (see :class:`jaxdiff.nn.unet.UNetConfig`)."""

    temb_dim: int | None
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    time_embedding_norm: str = "default"
    context_dim: int | None = None
    transformer_depth: int = 1
    linear_projection: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


def _call(remat: bool, module, *args):
    """Call ``module(*args)``, rematerialised (``nnx.remat``) when ``remat`` is set."""
    if remat:
        return nnx.remat(lambda m, *a: m(*a))(module, *args)
    return module(*args)


def _resnet(o: BlockOptions, in_ch, out_ch, rngs, scale=1.0, temb=True):
    return ResnetBlock2D(in_ch, out_ch, temb_dim=o.temb_dim if temb else None, groups=o.groups,
                         eps=o.eps, dropout=o.dropout, time_embedding_norm=o.time_embedding_norm,
                         output_scale_factor=scale, dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs)


def make_attention(o: BlockOptions, kind, ch, heads, rngs, *, scale=1.0, norm_groups=-1):
    """Build the attention layer of ``kind`` (``"self"`` or ``"cross"``) for ``ch`` channels."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
    if kind is None:
        return None
    if ch % heads:
        raise ValueError(f"channels={ch} not divisible by heads={heads}")
    if kind == "self":
        groups = o.groups if norm_groups == -1 else norm_groups
        return SpatialSelfAttention(ch, heads=heads, norm_groups=groups, eps=o.eps,
                                    rescale_output_factor=scale, dtype=o.dtype,
                                    param_dtype=o.param_dtype, rngs=rngs)
    if o.context_dim is None:
        raise ValueError("cross attention needs cross_attention_dim (context_dim) to be set")
    return Transformer2D(ch, heads=heads, head_dim=ch // heads, context_dim=o.context_dim,
                         depth=o.transformer_depth, norm_groups=o.groups,
                         linear_projection=o.linear_projection, dropout=o.dropout, remat=o.remat,
                         dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs)


def _apply_attn(o: BlockOptions, attn, h, context):
    if attn is None:
        return h
    if isinstance(attn, Transformer2D):
        return attn(h, context)  # the transformer rematerialises its own blocks
    return _call(o.remat, attn, h)


class DownBlock(nnx.Module):
    """``num_layers`` residual blocks (each optionally followed by attention), then an optional
    stride-2 downsampler. ``(B, H, W, in_ch) -> (B, H/2, W/2, out_ch)`` plus the skip tensors.

    Sub-modules ``resnets``, ``attentions`` (or None), ``downsampler`` (or None).
    """

    def __init__(self, o: BlockOptions, in_ch: int, out_ch: int, *, num_layers: int,
                 attention: str | None, heads: int, add_downsample: bool, downsample_padding: int = 1,
                 resample_with_conv: bool = True, temb: bool = True, rngs: nnx.Rngs):
        self.o = o
        self.resnets = nnx.List([_resnet(o, in_ch if i == 0 else out_ch, out_ch, rngs, temb=temb)
                                 for i in range(num_layers)])
        self.attentions = (nnx.List([make_attention(o, attention, out_ch, heads, rngs)
                                     for _ in range(num_layers)]) if attention else None)
        self.downsampler = (Downsample2D(out_ch, use_conv=resample_with_conv, padding=downsample_padding,
                                         dtype=o.dtype, param_dtype=o.param_dtype, rngs=rngs)
                            if add_downsample else None)

    def __call__(self, h, temb=None, context=None):
        """``h``: ``(B, H, W, C)`` -> ``(h_out, skips)``; ``skips`` is a list of feature maps."""
        skips = []
        for i, res in enumerate(self.resnets):
            h = _call(self.o.remat, res, h, temb)
            if self.attentions is not None:
                h = _apply_attn(self.o, self.attentions[i], h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    """Residual block, then ``num_layers`` x (attention, residual block), at constant width.

    ``(B, H, W, C) -> (B, H, W, C)``. Sub-modules ``resnets`` and ``attentions`` (or None).
    """

    def __init__(self, o: BlockOptions, ch: int, *, attention: str | None, heads: int,
                 num_layers: int = 1, output_scale_factor: float = 1.0, attn_norm_groups: int | None = -1,
                 temb: bool = True, rngs: nnx.Rngs):
        self.o = o
        self.resnets = nnx.List([_resnet(o, ch, ch, rngs, scale=output_scale_factor, temb=temb)
                                 for _ in range(num_layers + 1)])
        self.attentions = (nnx.List([make_attention(o, attention, ch, heads, rngs, scale=output_scale_factor,
                                                    norm_groups=attn_norm_groups)
                                     for _ in range(num_layers)]) if attention and num_layers else None)

    def __call__(self, h, temb=None, context=None):
        """``h``: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        h = _call(self.o.remat, self.resnets[0], h, temb)
        for i, res in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                h = _apply_attn(self.o, self.attentions[i], h, context)
            h = _call(self.o.remat, res, h, temb)
        return h


class UpBlock(nnx.Module):
    """Residual blocks that each first concatenate one skip tensor (last-in first-out), each
    optionally followed by attention, then an optional nearest-x2 upsampler with a 3x3 conv.

    ``(B, H, W, in_ch)`` and skips -> ``(B, 2H, 2W, out_ch)``. ``skip_channels`` lists the
    channels of the skips in the order they are consumed. With ``skip_channels=None`` (decoder)
    no skips are used and ``num_layers`` gives the block count.
    Sub-modules ``resnets``, ``attentions`` (or None), ``upsampler`` (or None).
    """

    def __init__(self, o: BlockOptions, in_ch: int, out_ch: int, *, skip_channels: list[int] | None,
                 num_layers: int | None = None, attention: str | None, heads: int, add_upsample: bool,
                 resample_with_conv: bool = True, temb: bool = True, rngs: nnx.Rngs):
        self.o = o
        skips = list(skip_channels) if skip_channels is not None else [0] * num_layers
        self.resnets = nnx.List([_resnet(o, (in_ch if i == 0 else out_ch) + s, out_ch, rngs, temb=temb)
                                 for i, s in enumerate(skips)])
        self.attentions = (nnx.List([make_attention(o, attention, out_ch, heads, rngs) for _ in skips])
                           if attention else None)
        self.upsampler = (Upsample2D(out_ch, use_conv=resample_with_conv, dtype=o.dtype,
                                     param_dtype=o.param_dtype, rngs=rngs) if add_upsample else None)

    def __call__(self, h, skips=None, temb=None, context=None):
        """``h``: ``(B, H, W, C)``; ``skips``: list consumed from its end -> ``(B, 2H, 2W, out_ch)``."""
        skips = list(skips) if skips is not None else None
        for i, res in enumerate(self.resnets):
            if skips is not None:
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = _call(self.o.remat, res, h, temb)
            if self.attentions is not None:
                h = _apply_attn(self.o, self.attentions[i], h, context)
        if self.upsampler is not None:
            h = self.upsampler(h)
        return h
