"""Primitive NNX layers in NHWC layout with logical-axis sharding metadata.

Every layer keeps its parameters in ``param_dtype`` and computes in ``dtype``: inputs and
parameters are cast on entry, so results keep ``dtype`` even when ``jax_enable_x64`` is on.
Normalisation statistics are always taken in float32.

Parameter names (``kernel``, ``bias``, ``scale``, ``embedding``) and kernel layouts
(convolutions ``(kh, kw, in, out)``, dense ``(in, out)``) are what :mod:`jaxdiff.convert` maps
to and from PyTorch's ``OIHW`` / ``(out, in)``.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


def make_param(rngs: nnx.Rngs | None, init, shape: Sequence[int], param_dtype, names) -> nnx.Param:
    """Create an ``nnx.Param`` of ``shape`` carrying logical axis ``names`` (one per dimension).

    ``init(gen, shape) -> array`` receives a ``numpy.random.Generator`` seeded from the next
    ``rngs.params()`` key (eager construction: no per-shape XLA compilation) or, while tracing
    (``nnx.eval_shape`` / ``nnx.jit``), the key itself. ``rngs`` may be ``None`` for zeros/ones.
    """
    key = rngs.params() if rngs is not None else None
    if key is not None and not isinstance(key, jax.core.Tracer):
        key = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    value = jnp.asarray(init(key, tuple(shape)), param_dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _uniform(gen, shape, lo, hi):
    if isinstance(gen, np.random.Generator):
        return gen.uniform(lo, hi, shape).astype(np.float32)
    return jax.random.uniform(gen, shape, jnp.float32, lo, hi)


def _normal(gen, shape):
    if isinstance(gen, np.random.Generator):
        return gen.standard_normal(shape).astype(np.float32)
    return jax.random.normal(gen, shape, jnp.float32)


def _uniform_fan_in(fan_in: int):
    """PyTorch's default init for conv/linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return lambda gen, shape: _uniform(gen, shape, -bound, bound)


def _zeros(gen, shape):
    return jnp.zeros(shape, jnp.float32)


def _ones(gen, shape):
    return jnp.ones(shape, jnp.float32)


_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)


# How conv2d computes its kernel gradient (issue 12: a hardware-specific trick behind a switch).
CONV_GRAD_IMPLS = ("auto", "matmul", "xla")
_conv_grad_impl = os.environ.get("JAXDIFF_CONV_GRAD", "auto")


def set_conv_grad_impl(impl: str) -> None:
    """Choose how :func:`conv2d` computes its kernel gradient.

    * ``"xla"``: plain autodiff of ``lax.conv_general_dilated`` (XLA's backward-filter convolution);
      what GPU/TPU compilers optimise best.
    * ``"matmul"``: a ``custom_vjp`` that computes the kernel gradient as ``kh * kw`` matmuls of shifted
      input views with the output gradient (no layout transposes, but one strided copy per tap).
    * ``"auto"`` (default): on the CPU backend (``jax.default_backend() == "cpu"``) ``"matmul"`` for
      pointwise convolutions (1x1, stride 1, no padding: a single matmul, no copies) and ``"xla"`` for
      the others; ``"xla"`` on every other backend. Measured with jax 0.10.2 on 2 CPU cores
      (benchmarks/results/train_vs_pytorch.md): XLA:CPU's YNNPACK backward-filter convolution beats the
      tap matmuls (whose strided copies dominate) on most 3x3 convs of the digits and CIFAR-10 UNets (1.2-3.2x;
      the whole training step needs 1.4x / 1.1x less CPU), the tap matmuls win on 1x1 convs (1.6-3.5x).

    The environment variable ``JAXDIFF_CONV_GRAD`` sets the initial value. The choice is read at trace
    time: functions already traced by ``jax.jit`` keep the implementation they were traced with.
    """
    global _conv_grad_impl
    if impl not in CONV_GRAD_IMPLS:
        raise ValueError(f"conv grad impl must be one of {CONV_GRAD_IMPLS}, got {impl!r}")
    _conv_grad_impl = impl


def conv_grad_impl() -> str:
    """The current setting of :func:`set_conv_grad_impl` (``"auto"``, ``"matmul"`` or ``"xla"``)."""
    if _conv_grad_impl not in CONV_GRAD_IMPLS:
        raise ValueError(f"JAXDIFF_CONV_GRAD must be one of {CONV_GRAD_IMPLS}, got {_conv_grad_impl!r}")
    return _conv_grad_impl


def _matmul_kernel_grad(kernel_shape, stride: int, padding) -> bool:
    impl = conv_grad_impl()
    if impl != "auto":
        return impl == "matmul"
    pointwise = tuple(kernel_shape[:2]) == (1, 1) and stride == 1 and all(p == 0 for pp in padding for p in pp)
    return pointwise and jax.default_backend() == "cpu"


def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: tuple) -> jax.Array:
    """NHWC convolution ``(B, H, W, Ci) x (kh, kw, Ci, Co) -> (B, H', W', Co)``.

    Same values and gradients as ``lax.conv_general_dilated``; how the kernel gradient is computed is
    chosen by :func:`set_conv_grad_impl` (at trace time).
    """
    if _matmul_kernel_grad(w.shape, stride, padding):
        return _conv2d_matmul_grad(x, w, stride, padding)
    return _conv(x, w, stride, padding)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_matmul_grad(x, w, stride, padding):
    return _conv(x, w, stride, padding)


def _conv_fwd(x, w, stride, padding):
    return _conv(x, w, stride, padding), (x, w)


def _conv_bwd(stride, padding, res, dy):
    x, w = res
    kh, kw, cin, cout = w.shape
    (dx,) = jax.vjp(lambda x: _conv(x, w, stride, padding), x)[1](dy)
    ho, wo = dy.shape[1], dy.shape[2]
    xp = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
    dyf = dy.reshape(-1, cout)
    taps = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :].reshape(-1, cin).T @ dyf
            for i in range(kh) for j in range(kw)]
    return dx, jnp.stack(taps).reshape(kh, kw, cin, cout).astype(w.dtype)


_conv2d_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


class Conv2d(nnx.Module):
    """2-D convolution, NHWC. ``(B, H, W, in_ch) -> (B, H', W', out_ch)``.

    ``padding`` is an int (symmetric) or ``((top, bottom), (left, right))``.
    Kernel ``(k, k, in_ch, out_ch)`` with logical axes
    ``("conv_height", "conv_width", "conv_in", "conv_out")``; bias ``(out_ch,)`` on ``("conv_out",)``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | tuple = None, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if padding is None:
            padding = (kernel_size - 1) // 2
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        self.padding = tuple(tuple(p) for p in padding)
        self.stride = stride
        self.in_ch, self.out_ch = in_ch, out_ch
        self.dtype = dtype
        fan_in = in_ch * kernel_size * kernel_size
        self.kernel = make_param(rngs, _uniform_fan_in(fan_in),
                                 (kernel_size, kernel_size, in_ch, out_ch), param_dtype, CONV_AXES)
        self.bias = (make_param(rngs, _uniform_fan_in(fan_in), (out_ch,), param_dtype, ("conv_out",))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, in_ch)`` -> ``(B, H', W', out_ch)`` in ``dtype``."""
        x = jnp.asarray(x, self.dtype)
        y = conv2d(x, self.kernel[...].astype(self.dtype), self.stride, self.padding)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Dense(nnx.Module):
    """Affine map on the last axis. ``(..., in_f) -> (..., out_f)``.

    Kernel ``(in_f, out_f)`` with logical axes ``axes`` (default ``("embed", "mlp")``).
    """

    def __init__(self, in_f: int, out_f: int, *, use_bias: bool = True,
                 axes: tuple[str, str] = ("embed", "mlp"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = make_param(rngs, _uniform_fan_in(in_f), (in_f, out_f), param_dtype, axes)
        self.bias = (make_param(rngs, _uniform_fan_in(in_f), (out_f,), param_dtype, (axes[1],))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in_f)`` -> ``(..., out_f)`` in ``dtype``."""
        x = jnp.asarray(x, self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """Group normalisation over channels-last input. ``(B, ..., C) -> (B, ..., C)``.

    Statistics (biased variance, as in PyTorch) are computed in float32 over the spatial axes and the
    ``C // num_groups`` channels of each group; affine ``scale``/``bias`` ``(C,)`` on ``("norm",)``.
    """

    def __init__(self, num_groups: int, channels: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: channels={channels} not divisible by num_groups={num_groups}")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = make_param(None, _ones, (channels,), param_dtype, ("norm",))
        self.bias = make_param(None, _zeros, (channels,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, ..., C)`` -> normalised ``(B, ..., C)`` in ``dtype``."""
        # Channels stay the minor (contiguous) axis: reduce over the spatial axes per channel, then
        # sum channels within groups; two passes (mean, then centred variance) for accuracy, and one
        # fused affine pass ``x * a + b`` at the end.
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        axes = tuple(range(1, x.ndim - 1))
        n = float(np.prod(x.shape[1:-1])) * (c // g)
        xf = jnp.asarray(x, jnp.float32)
        bshape = (b,) + (1,) * len(axes) + (c,)
        mean = jnp.repeat(jnp.sum(xf, axis=axes).reshape(b, g, c // g).sum(-1) / n, c // g, axis=-1)
        var = jnp.sum(jnp.square(xf - mean.reshape(bshape)), axis=axes).reshape(b, g, c // g).sum(-1) / n
        a = jnp.repeat(jax.lax.rsqrt(var + self.eps), c // g, axis=-1) * self.scale[...].astype(jnp.float32)
        shift = self.bias[...].astype(jnp.float32) - mean * a
        return (xf * a.reshape(bshape) + shift.reshape(bshape)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation over the last axis, statistics in float32. ``(..., C) -> (..., C)``."""

    def __init__(self, channels: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = make_param(None, _ones, (channels,), param_dtype, ("norm",))
        self.bias = make_param(None, _zeros, (channels,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., C)`` -> ``(..., C)`` in ``dtype``."""
        xf = jnp.asarray(x, jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Lookup table. Integer ids ``(B,)`` -> ``(B, features)``; table ``(num, features)`` on ``("vocab", "embed")``."""

    def __init__(self, num: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = make_param(
            rngs, _normal, (num, features),
            param_dtype, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids``: integer ``(...)`` -> ``(..., features)`` in ``dtype``."""
        return jnp.take(self.embedding[...], jnp.asarray(ids, jnp.int32), axis=0).astype(self.dtype)


class Downsample2D(nnx.Module):
    """Halve H and W. ``(B, H, W, C) -> (B, H/2, W/2, C)``.

    ``use_conv``: learned 3x3 stride-2 convolution (``padding=1`` symmetric, ``padding=0``
    pads only bottom/right by one, as in LDM/diffusers); otherwise 2x2 average pooling.
    """

    def __init__(self, channels: int, *, use_conv: bool = True, padding: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = (Conv2d(channels, channels, 3, stride=2, padding=pad, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs) if use_conv else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, C)`` -> ``(B, H/2, W/2, C)``."""
        if self.conv is not None:
            return self.conv(x)
        b, h, w, c = x.shape
        x = jnp.asarray(x, self.dtype)
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample2D(nnx.Module):
    """Double H and W by nearest-neighbour repetition, then an optional 3x3 convolution.

    ``(B, H, W, C) -> (B, 2H, 2W, C)``.
    """

    def __init__(self, channels: int, *, use_conv: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.conv = (Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                     if use_conv else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, C)`` -> ``(B, 2H, 2W, C)``."""
        b, h, w, c = x.shape
        x = jnp.asarray(x, self.dtype)
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x) if self.conv is not None else x
