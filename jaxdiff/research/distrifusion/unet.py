"""The jaxdiff UNet computed on one row patch: the same modules and parameters, walked block by block, with
the spatial operations replaced by their patch versions (:mod:`.ops`).

:func:`patch_unet_forward` mirrors ``jaxdiff.nn.unet.UNet.__call__`` and its blocks (DDPM/ADM residual blocks
with spatial self-attention, and the Stable-Diffusion transformer with cross-attention); it must be called
inside ``shard_map`` over the patch axis. :func:`check_covered` refuses a UNet holding a layer type the walk
does not know, before anything is traced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.attention import (Attention, GEGLUFeedForward, SpatialSelfAttention, Transformer2D,
                                  TransformerBlock)
from jaxdiff.nn.embeddings import TimestepEmbedding, timestep_embedding
from jaxdiff.nn.layers import Conv2d, Dense, Downsample2D, Embed, GroupNorm, LayerNorm, Upsample2D
from jaxdiff.nn.lora import LoRADense
from jaxdiff.nn.resnet import ResnetBlock2D
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.unet_blocks import DownBlock, MidBlock, UpBlock
from jaxdiff.research.distrifusion.ops import PatchComm, first_conv, halo_conv, patch_group_norm, patch_kv

# Every module type the walk handles: spatial ones get a patch version, the rest act per pixel / token.
COVERED = (UNet, DownBlock, MidBlock, UpBlock, ResnetBlock2D, SpatialSelfAttention, Transformer2D,
           TransformerBlock, Attention, GEGLUFeedForward, Conv2d, GroupNorm, Downsample2D, Upsample2D,
           TimestepEmbedding, Dense, Embed, LayerNorm, nnx.Dropout, nnx.List,
           LoRADense, nnx.LoRA)      # linear adapters act per token (adapters on 3x3 convs are not covered)


def check_covered(unet: nnx.Module) -> None:
    """ValueError naming the first sub-module whose type the patch-parallel walk does not cover (exact types:
    a subclass may compute something else)."""
    if type(unet) is not UNet:
        raise ValueError(f"patch parallelism covers jaxdiff.nn.unet.UNet, got {type(unet).__name__}")
    c = unet.config
    for field in ("low_res_channels", "aug_level_embedding"):      # super-resolution inputs: not walked
        if getattr(c, field, None):
            raise ValueError(f"patch parallelism does not cover super-resolution UNets ({field}={getattr(c, field)!r}): "
                             "the low-resolution conditioning input is not split into patches")
    bad = sorted(((tuple(path), type(m)) for path, m in nnx.iter_modules(unet) if type(m) not in COVERED),
                 key=lambda pm: len(pm[0]))
    if bad:                                   # the outermost unknown layer (not a piece inside it)
        path, kind = bad[0]
        raise ValueError(f"patch parallelism does not cover the layer {'/'.join(str(p) for p in path)} of type "
                         f"{kind.__module__}.{kind.__name__}: its spatial behaviour is unknown (covered: "
                         + ", ".join(t.__name__ for t in COVERED) + ")")


def check_rows(unet: UNet, height: int, patches: int) -> None:
    """ValueError unless ``height`` rows split into ``patches`` equal row blocks at every UNet level."""
    f = patches * 2 ** unet.num_downsamples
    if patches < 1 or height % f:
        raise ValueError(f"{patches} patches do not divide the latent rows: the UNet's {height} rows must be "
                         f"a multiple of patches x 2^downsamplings = {patches} x {2 ** unet.num_downsamples} "
                         f"= {f} (every level splits into equal row blocks)")


def _attend(comm: PatchComm, attn: Attention, x: jax.Array) -> jax.Array:
    """Self-attention of this patch's tokens ``x (B, L, C)`` to all patches' keys/values -> ``(B, L, C)``."""
    b, t, _ = x.shape
    q = attn.to_q(x).reshape(b, t, attn.heads, attn.head_dim)
    k, v = patch_kv(comm, attn.to_k(x), attn.to_v(x))
    s = k.shape[1]
    o = jax.nn.dot_product_attention(q, k.reshape(b, s, attn.heads, attn.head_dim),
                                     v.reshape(b, s, attn.heads, attn.head_dim), scale=attn.head_dim ** -0.5)
    out = attn.to_out(o.reshape(b, t, attn.heads * attn.head_dim))
    comm.note_tp(out.reshape(b, 1, t, -1))
    return out


def _spatial_attention(comm: PatchComm, m: SpatialSelfAttention, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = patch_group_norm(comm, m.group_norm, x) if m.group_norm is not None else x
    y = _attend(comm, m, y.reshape(b, h * w, c)).reshape(b, h, w, c)
    return (y + x.astype(y.dtype)) / m.rescale


def _transformer(comm: PatchComm, m: Transformer2D, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = patch_group_norm(comm, m.norm, x)
    y = m.proj_in(y.reshape(b, h * w, c)) if m.linear_projection else m.proj_in(y).reshape(b, h * w, -1)
    for blk in m.transformer_blocks:
        y = y + _attend(comm, blk.attn1, blk.norm1(y))
        y = y + blk.attn2(blk.norm2(y), context)     # keys/values from the text: nothing to exchange
        comm.note_tp(y.reshape(b, 1, h * w, -1))
        y = y + blk.ff(blk.norm3(y))
        comm.note_tp(y.reshape(b, 1, h * w, -1))
    y = m.proj_out(y).reshape(b, h, w, c) if m.linear_projection else m.proj_out(y.reshape(b, h, w, -1))
    return y + x.astype(y.dtype)


def _attention(comm: PatchComm, m, x, context):
    if m is None:
        return x
    if type(m) is Transformer2D:
        return _transformer(comm, m, x, context)
    return _spatial_attention(comm, m, x)


def _resnet(comm: PatchComm, m: ResnetBlock2D, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    x = jnp.asarray(x, m.dtype)
    h = halo_conv(comm, m.conv1, jax.nn.silu(patch_group_norm(comm, m.norm1, x)))
    t = None
    if m.time_emb_proj is not None and temb is not None:
        t = m.time_emb_proj(jax.nn.silu(jnp.asarray(temb, m.dtype)))[:, None, None, :]
    if t is not None and m.scale_shift:
        scale, shift = jnp.split(t, 2, axis=-1)
        h = patch_group_norm(comm, m.norm2, h) * (1 + scale) + shift
    else:
        h = patch_group_norm(comm, m.norm2, h + t if t is not None else h)
    h = halo_conv(comm, m.conv2, jax.nn.silu(h))          # sampling: dropout is off
    comm.note_tp(h)
    out = (m.conv_shortcut(x) if m.conv_shortcut is not None else x) + h
    return out / m.output_scale_factor if m.output_scale_factor != 1.0 else out


def _downsample(comm: PatchComm, m: Downsample2D, x: jax.Array) -> jax.Array:
    if m.conv is not None:
        y = halo_conv(comm, m.conv, x)
        comm.note_tp(y)
        return y
    b, h, w, c = x.shape
    return jnp.asarray(x, m.dtype).reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample(comm: PatchComm, m: Upsample2D, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.asarray(x, m.dtype)
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    if m.conv is None:
        return x
    y = halo_conv(comm, m.conv, x)
    comm.note_tp(y)
    return y


def patch_unet_forward(comm: PatchComm, unet: UNet, x_full: jax.Array, t: jax.Array,
                       context: jax.Array | None = None, labels: jax.Array | None = None) -> jax.Array:
    """This device's rows of ``unet(x_full, t, context, labels)``.

    ``x_full``: the whole fresh input ``(B, H, W, C_in)`` (every device holds it); ``t``: ``(B,)`` or scalar
    -> ``(B, H / N, W, C_out)``, rows ``[i H/N, (i+1) H/N)`` of device ``i``. Call inside ``shard_map``.
    """
    unet.check_inputs(np.shape(x_full), None if context is None else np.shape(context), labels is not None)
    c = unet.config
    x = jnp.asarray(x_full, unet.dtype)
    if c.center_input_sample:
        x = 2 * x - 1.0
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    temb = unet.time_embedding(timestep_embedding(
        t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift))
    if unet.class_embedding is not None:
        temb = temb + unet.class_embedding(labels)
    if context is not None:
        context = jnp.asarray(context, unet.dtype)
    h = first_conv(comm, unet.conv_in, x)
    comm.note_tp(h)
    skips = [h]
    for blk in unet.down_blocks:
        for i, res in enumerate(blk.resnets):
            h = _resnet(comm, res, h, temb)
            h = _attention(comm, blk.attentions[i] if blk.attentions is not None else None, h, context)
            skips.append(h)
        if blk.downsampler is not None:
            h = _downsample(comm, blk.downsampler, h)
            skips.append(h)
    if unet.mid_block is not None:
        mid = unet.mid_block
        h = _resnet(comm, mid.resnets[0], h, temb)
        for i, res in enumerate(mid.resnets[1:]):
            h = _attention(comm, mid.attentions[i] if mid.attentions is not None else None, h, context)
            h = _resnet(comm, res, h, temb)
    for blk in unet.up_blocks:
        for i, res in enumerate(blk.resnets):
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = _resnet(comm, res, h, temb)
            h = _attention(comm, blk.attentions[i] if blk.attentions is not None else None, h, context)
        if blk.upsampler is not None:
            h = _upsample(comm, blk.upsampler, h)
    h = jax.nn.silu(patch_group_norm(comm, unet.conv_norm_out, h))
    out = halo_conv(comm, unet.conv_out, h)
    comm.note_tp(out)
    return out
