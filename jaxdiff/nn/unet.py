"""One configurable UNet for the DDPM/ADM family and Stable-Diffusion-style latent UNets.

NHWC throughout: ``UNet(x (B, H, W, C_in), t (B,) or scalar, context (B, S, D) | None,
labels (B,) | None) -> (B, H, W, C_out)``. :func:`jaxdiff.convert.load_unet` builds it from a
diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.embeddings import TimestepEmbedding, timestep_embedding
from jaxdiff.nn.layers import Conv2d, Embed, GroupNorm
from jaxdiff.nn.unet_blocks import ATTENTION_KINDS, BlockOptions, DownBlock, MidBlock, UpBlock


def _per_level(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} levels")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet`. Per-level tuples are in resolution order (highest first)
    for the down path and in execution order (lowest resolution first) for the up path.

    Attributes:
      block_out_channels: channels per level; ``len`` = number of levels, ``len - 1`` downsamplings.
      layers_per_block: residual blocks per down level (int or per level); up levels get one more.
      down_attention / up_attention: per level ``None``, ``"self"`` (spatial self-attention,
        DDPM-style) or ``"cross"`` (SD transformer with cross-attention to ``context``).
        ``up_attention=None`` mirrors ``down_attention``.
      down_heads / up_heads / mid_heads: attention heads per level (head width = channels / heads).
      attention_head_dim: if set, a fixed head *width* instead: heads = channels // width at every
        attention layer (overrides the head counts).
      mid_block, mid_attention, mid_num_layers: the bottleneck (``mid_num_layers`` attention +
        residual pairs after a first residual block).
      mid_attn_norm_groups: GroupNorm groups of the mid self-attention (``-1``: ``norm_num_groups``;
        ``None``: no norm).
      transformer_depth, cross_attention_dim, linear_projection: SD transformer options.
      resnet_time_scale_shift: ``"default"`` (add) or ``"scale_shift"`` (AdaGN).
      num_classes, class_null: class conditioning; ``class_null`` adds a null class (index
        ``num_classes``) for classifier-free guidance.
      downsample_padding: 1 (symmetric) or 0 (pad bottom/right, LDM style).
      resample_with_conv: learned (conv) resampling, else average-pool / nearest only.
      low_res_channels: super-resolution: channels of the low-resolution conditioning image, upsampled
        (bilinear) to the input size and concatenated to it; 0: not a super-resolution model.
      aug_level_embedding: add an embedding of the noise-conditioning augmentation level (sinusoidal, as
        the time) to the time embedding (the ``aug_level`` input of a super-resolution model).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 256, 256)
    layers_per_block: int | tuple = 2
    down_attention: tuple = (None, "self", None, None)
    up_attention: tuple | None = None
    down_heads: int | tuple = 1
    up_heads: int | tuple | None = None
    mid_block: bool = True
    mid_attention: str | None = "self"
    mid_heads: int | None = None
    attention_head_dim: int | None = None
    mid_num_layers: int = 1
    mid_attn_norm_groups: int | None = -1
    mid_block_scale_factor: float = 1.0
    transformer_depth: int = 1
    cross_attention_dim: int | None = None
    linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    resnet_time_scale_shift: str = "default"
    num_classes: int | None = None
    class_null: bool = False
    center_input_sample: bool = False
    downsample_padding: int = 1
    resample_with_conv: bool = True
    dropout: float = 0.0
    low_res_channels: int = 0
    aug_level_embedding: bool = False

    def replace(self, **kw) -> "UNetConfig":
        """Copy with fields replaced."""
        return dataclasses.replace(self, **kw)


class UNet(nnx.Module):
    """Diffusion UNet (DDPM/ADM/LDM/SD family), NHWC.

    ``__call__(x (B, H, W, in_channels), t (B,) | scalar, context (B, S, cross_attention_dim) | None,
    labels (B,) int | None) -> (B, H, W, out_channels)``, in ``dtype``.

    Args:
      config: :class:`UNetConfig`.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``param_dtype``: storage dtype of parameters.
      remat: rematerialise residual/attention blocks in the backward pass (``nnx.remat``).
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        c = config
        n = len(c.block_out_channels)
        chs = tuple(c.block_out_channels)
        layers = _per_level(c.layers_per_block, n, "layers_per_block")
        down_attn = _per_level(c.down_attention, n, "down_attention")
        up_attn = tuple(reversed(down_attn)) if c.up_attention is None else _per_level(
            c.up_attention, n, "up_attention")
        down_heads = _per_level(c.down_heads, n, "down_heads")
        up_heads = tuple(reversed(down_heads)) if c.up_heads is None else _per_level(c.up_heads, n, "up_heads")
        if c.attention_head_dim:
            w = c.attention_head_dim
            bad = [ch for ch in chs if ch % w]
            if bad:
                raise ValueError(f"attention_head_dim={w} does not divide channels {bad}")
            down_heads = tuple(ch // w for ch in chs)
            up_heads = tuple(reversed(down_heads))
            # store the resolved head counts (what export and the blocks use)
            c = c.replace(down_heads=down_heads, up_heads=up_heads, mid_heads=chs[-1] // w, attention_head_dim=None)
        for kind in down_attn + up_attn + (c.mid_attention,):
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
        self.config = c
        self.dtype = dtype
        self.num_downsamples = n - 1
        temb_dim = c.time_embed_dim or 4 * chs[0]
        o = BlockOptions(temb_dim=temb_dim, groups=c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout,
                         time_embedding_norm=c.resnet_time_scale_shift, context_dim=c.cross_attention_dim,
                         transformer_depth=c.transformer_depth, linear_projection=c.linear_projection,
                         remat=remat, dtype=dtype, param_dtype=param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = Conv2d(c.in_channels + c.low_res_channels, chs[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim, **kw)
        if c.aug_level_embedding:
            self.aug_embedding = TimestepEmbedding(chs[0], temb_dim, **kw)
        self.class_embedding = (Embed(c.num_classes + int(c.class_null), temb_dim, **kw)
                                if c.num_classes else None)

        skip_chs = [chs[0]]
        blocks, ch = [], chs[0]
        for i in range(n):
            last = i == n - 1
            blocks.append(DownBlock(o, ch, chs[i], num_layers=layers[i], attention=down_attn[i],
                                    heads=down_heads[i], add_downsample=not last,
                                    downsample_padding=c.downsample_padding,
                                    resample_with_conv=c.resample_with_conv, rngs=rngs))
            ch = chs[i]
            skip_chs += [ch] * (layers[i] + (0 if last else 1))
        self.down_blocks = nnx.List(blocks)

        self.mid_block = (MidBlock(o, ch, attention=c.mid_attention,
                                   heads=c.mid_heads or down_heads[-1], num_layers=c.mid_num_layers,
                                   output_scale_factor=c.mid_block_scale_factor,
                                   attn_norm_groups=c.mid_attn_norm_groups, rngs=rngs)
                          if c.mid_block else None)

        blocks = []
        rev_layers = tuple(reversed(layers))
        for i in range(n):
            out = chs[n - 1 - i]
            k = rev_layers[i] + 1
            mine = [skip_chs.pop() for _ in range(k)]
            blocks.append(UpBlock(o, ch, out, skip_channels=mine, attention=up_attn[i], heads=up_heads[i],
                                  add_upsample=i != n - 1, resample_with_conv=c.resample_with_conv,
                                  rngs=rngs))
            ch = out
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, chs[0], eps=c.norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
        self.conv_out = Conv2d(chs[0], c.out_channels, 3, **kw)

    @property
    def null_label(self) -> int:
        """Label of the unconditional (null) class for classifier-free guidance."""
        if not (self.config.num_classes and self.config.class_null):
            raise ValueError("this UNet has no null class (needs num_classes and class_null=True)")
        return self.config.num_classes

    def check_inputs(self, x_shape, context_shape=None, labels_given: bool = False, low_res_shape=None,
                     aug_level_given: bool = False) -> None:
        """Raise ``ValueError`` naming the mismatch if inputs of these shapes cannot be used."""
        c = self.config
        if len(x_shape) != 4:
            raise ValueError(f"UNet expects x of shape (B, H, W, C), got shape {tuple(x_shape)}")
        if x_shape[-1] != c.in_channels:
            raise ValueError(f"UNet input has {x_shape[-1]} channels but the config has "
                             f"in_channels={c.in_channels} (layout is NHWC: channels last)")
        f = 2 ** self.num_downsamples
        if x_shape[1] % f or x_shape[2] % f:
            raise ValueError(f"UNet image size {x_shape[1]}x{x_shape[2]} is not divisible by {f}, the "
                             f"total downsampling factor of {self.num_downsamples + 1} levels")
        needs_ctx = "cross" in (tuple(c.down_attention) + tuple(c.up_attention or ()) + (c.mid_attention,))
        if needs_ctx and context_shape is None:
            raise ValueError("this UNet has cross-attention: pass context (B, S, cross_attention_dim)")
        if context_shape is not None and needs_ctx and (
                len(context_shape) != 3 or context_shape[-1] != c.cross_attention_dim):
            raise ValueError(f"context must have shape (B, S, {c.cross_attention_dim}), "
                             f"got {tuple(context_shape)}")
        if c.num_classes and not labels_given:
            raise ValueError("this UNet is class-conditional: pass labels (B,)")
        if not c.num_classes and labels_given:
            raise ValueError("labels given but the UNet has no class embedding (num_classes=None)")
        check_low_res(c, x_shape, low_res_shape, aug_level_given)

    def __call__(self, x: jax.Array, t, context: jax.Array | None = None,
                 labels: jax.Array | None = None, low_res: jax.Array | None = None,
                 aug_level: jax.Array | None = None, *, mid_hook=None, return_features: bool = False):
        """``x``: ``(B, H, W, in_channels)``; ``t``: ``(B,)`` or scalar time steps;
        ``context``: ``(B, S, cross_attention_dim)``; ``labels``: ``(B,)`` ints; super-resolution models:
        ``low_res`` ``(B, H/f, W/f, low_res_channels)`` and ``aug_level`` ``(B,)`` or scalar (embedded like
        ``t``) -> ``(B, H, W, out_channels)``.

        h-space (the bottleneck: the mid block's output, or the last down block's without a mid block),
        ``(B, H / 2^(levels-1), W / 2^(levels-1), block_out_channels[-1])``:
        ``mid_hook(h) -> h`` of the same shape replaces it before the decoder runs (e.g. a guidance step,
        ``jaxdiff.research.debias``); ``return_features=True`` returns ``(output, h)`` with ``h`` as the
        encoder produced it (before any hook)."""
        self.check_inputs(np.shape(x), None if context is None else np.shape(context), labels is not None,
                          None if low_res is None else np.shape(low_res), aug_level is not None)
        c = self.config
        x = jnp.asarray(x, self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        temb = self.time_embedding(timestep_embedding(
            t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift))
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(labels)
        if c.aug_level_embedding:
            s = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32).reshape(-1), (b,))
            temb = temb + self.aug_embedding(timestep_embedding(
                s, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift))
        if context is not None:
            context = jnp.asarray(context, self.dtype)
        if c.low_res_channels:
            up = jax.image.resize(jnp.asarray(low_res, self.dtype), x.shape[:3] + (low_res.shape[-1],), "linear")
            x = jnp.concatenate([x, up], axis=-1)
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down_blocks:
            h, s = blk(h, temb, context)
            skips += s
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context)
        features = h
        if mid_hook is not None:
            h = mid_hook(h)
            if h.shape != features.shape:
                raise ValueError(f"mid_hook must keep the bottleneck's shape {features.shape}, returned {h.shape}")
        for blk in self.up_blocks:
            k = len(blk.resnets)
            h = blk(h, skips[-k:], temb, context)
            skips = skips[:-k]
        h = jax.nn.silu(self.conv_norm_out(h))
        out = self.conv_out(h)
        return (out, features) if return_features else out


def check_low_res(c: UNetConfig, x_shape, low_res_shape, aug_level_given: bool) -> None:
    """ValueError unless a super-resolution UNet (``low_res_channels``) gets a ``(B, H/f, W/f, C_lr)`` low-res
    image (integer ``f``) and an ``aug_level`` when it embeds one, and any other UNet gets neither."""
    if not c.low_res_channels:
        if low_res_shape is not None:
            raise ValueError("low_res given but the UNet is not a super-resolution model (low_res_channels=0)")
    elif low_res_shape is None:
        raise ValueError(f"this UNet is a super-resolution model: pass low_res (B, h, w, {c.low_res_channels})")
    else:
        lr = tuple(low_res_shape)
        if (len(lr) != 4 or lr[0] != x_shape[0] or lr[-1] != c.low_res_channels or not lr[1] or not lr[2]
                or x_shape[1] % lr[1] or x_shape[2] % lr[2] or lr[1] > x_shape[1] or lr[2] > x_shape[2]):
            raise ValueError(f"low_res must have shape ({x_shape[0]}, h, w, {c.low_res_channels}) with h, w dividing "
                             f"the input's {x_shape[1]}x{x_shape[2]}, got {lr}")
    if c.aug_level_embedding and not aug_level_given:
        raise ValueError("this UNet embeds a conditioning-augmentation level: pass aug_level (B,)")
    if aug_level_given and not c.aug_level_embedding:
        raise ValueError("aug_level given but the UNet has no augmentation-level embedding (aug_level_embedding=False)")


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
