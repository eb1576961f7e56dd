"""Inception-v3 feature extractor for FID / Inception Score, as used by pytorch-fid (NHWC, Flax NNX).

:class:`InceptionV3FID` is the network pytorch-fid builds with ``use_fid_inception=True``: the
torchvision Inception-v3 layout with the changes of the TensorFlow 2015-12-05 graph that the
original FID code used:

* ``Mixed_5b/5c/5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E, first) average-pool their
  pooling branch over the *valid* pixels only (zero padding is not counted in the mean);
* ``Mixed_7c`` (E, second) max-pools its pooling branch instead of averaging;
* the classifier has 1008 outputs (the TF graph's label set), no auxiliary head.

Every convolution is bias-free and followed by inference-mode BatchNorm (eps ``1e-3``) and ReLU.
Module and attribute names follow torchvision's (``Mixed_6b.branch7x7dbl_3.conv``), so the
state-dict key of a variable is its path with ``kernel/scale/mean/var`` renamed
(see :mod:`jaxdiff.convert.inception`).

Input pipeline (pytorch-fid's ``InceptionV3.forward`` with ``resize_input=True,
normalize_input=True``): images are mapped to ``[0, 1]``, resized to 299x299 with bilinear
interpolation as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` does
(half-pixel centres, no antialiasing, source coordinates clamped at 0), then mapped to ``[-1, 1]``.
jaxdiff takes NHWC batches: floating-point images in ``[-1, 1]`` or integer (uint8) images in
``[0, 255]``.
"""
from __future__ import annotations

import math
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3

_DN = ("NHWC", "HWIO", "NHWC")


# --------------------------------------------------------------------------------------------
# input pipeline


@lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix ``M`` with ``M @ v`` the 1-D bilinear resize of ``v``
    under PyTorch's ``align_corners=False`` rule (no antialiasing).

    Output sample ``i`` reads source position ``s = max((i + 0.5) * in/out - 0.5, 0)``, mixing
    ``floor(s)`` and ``min(floor(s) + 1, in - 1)`` with weights ``1 - frac(s)`` and ``frac(s)``.
    """
    # evaluated in float32, the arithmetic type PyTorch's CPU kernel uses for float32 images
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), np.float32(1) - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int] | int = FID_SIZE, *, precision=jax.lax.Precision.HIGHEST
                    ) -> jax.Array:
    """Bilinear resize of an NHWC batch ``(B, H, W, C) -> (B, h, w, C)``, matching
    ``F.interpolate(x_nchw, size=(h, w), mode="bilinear", align_corners=False)`` (no antialias).

    Computed as two small matmuls with the interpolation matrices of :func:`bilinear_matrix`; the
    input dtype is kept for floating inputs (integers are converted to float32 first).
    """
    if isinstance(size, int):
        size = (size, size)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear expects an NHWC batch (B, H, W, C), got shape {x.shape}")
    _, h, w, _ = x.shape
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(bilinear_matrix(h, size[0]), x.dtype)
    mw = jnp.asarray(bilinear_matrix(w, size[1]), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=precision)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=precision)


def preprocess_fid(images: jax.Array, *, size: int = FID_SIZE, dtype=jnp.float32) -> jax.Array:
    """pytorch-fid's input pipeline on NHWC images: ``(B, H, W, 3) -> (B, size, size, 3)`` in ``[-1, 1]``.

    ``images`` are floating point in ``[-1, 1]`` or integers (uint8) in ``[0, 255]``, chosen by
    dtype. They are mapped to ``[0, 1]``, bilinearly resized (:func:`resize_bilinear`) and mapped
    to ``[-1, 1]`` with ``2 x - 1``, in this order, as pytorch-fid does on ``[0, 1]`` input.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images of shape (B, H, W, 3), got {images.shape}")
    if jnp.issubdtype(images.dtype, jnp.floating):
        x = (images.astype(dtype) + 1) / 2
    elif jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(dtype) / 255
    else:
        raise ValueError(f"images must be floating ([-1, 1]) or integer ([0, 255]), got dtype {images.dtype}")
    x = resize_bilinear(x, size)
    return 2 * x - 1


# --------------------------------------------------------------------------------------------
# layers


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Bias-free convolution, inference BatchNorm (eps 1e-3), ReLU. ``(B, H, W, in) -> (B, H', W', out)``.

    Variables: ``conv.kernel`` ``(kh, kw, in, out)``; ``bn.scale``, ``bn.bias`` (``nnx.Param``) and
    ``bn.mean``, ``bn.var`` (``nnx.BatchStat``, the running statistics), all ``(out,)``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size=1, *, stride: int = 1, padding=0,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs | None = None):
        kh, kw = _pair(kernel_size)
        ph, pw = _pair(padding)
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))
        self.dtype, self.precision = dtype, precision
        self.conv = _ConvKernel(kh, kw, in_ch, out_ch, param_dtype, rngs)
        self.bn = _BatchNormStats(out_ch, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jax.lax.conv_general_dilated(x, self.conv.kernel.get_value().astype(self.dtype),
                                         (self.stride, self.stride), self.padding,
                                         dimension_numbers=_DN, precision=self.precision)
        bn = self.bn
        inv = jax.lax.rsqrt(bn.var.get_value().astype(jnp.float32) + BN_EPS) * bn.scale.get_value()
        shift = bn.bias.get_value() - bn.mean.get_value() * inv
        return jax.nn.relu(y * inv.astype(self.dtype) + shift.astype(self.dtype))


class _ConvKernel(nnx.Module):
    def __init__(self, kh, kw, in_ch, out_ch, param_dtype, rngs):
        shape = (kh, kw, in_ch, out_ch)
        std = math.sqrt(2.0 / (kh * kw * in_ch))
        if rngs is None:
            value = jnp.zeros(shape, param_dtype)
        else:
            value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(param_dtype)
        self.kernel = nnx.Param(value)


class _BatchNormStats(nnx.Module):
    def __init__(self, ch, param_dtype):
        self.scale = nnx.Param(jnp.ones((ch,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((ch,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((ch,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((ch,), jnp.float32))


def max_pool(x: jax.Array, k: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
    """``k x k`` max pooling, NHWC; padding (if any) never wins (``-inf``), floor output size."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1), pad)


def avg_pool_valid(x: jax.Array, k: int = 3, padding: int = 1) -> jax.Array:
    """``k x k`` stride-1 average pooling, NHWC, averaging over in-image pixels only
    (PyTorch ``avg_pool2d(..., count_include_pad=False)``, TensorFlow ``SAME`` average pooling)."""
    _, h, w, _ = x.shape
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    s = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, k, k, 1), (1, 1, 1, 1), pad)
    ones = np.pad(np.ones((h, w), np.float32), padding)
    counts = np.lib.stride_tricks.sliding_window_view(ones, (k, k)).sum(axis=(-1, -2))
    return s / jnp.asarray(counts[None, :, :, None], x.dtype)


# --------------------------------------------------------------------------------------------
# inception blocks


class InceptionA(nnx.Module):
    """Mixed_5b/c/d (FID variant): ``(B, H, W, in) -> (B, H, W, 224 + pool_features)``."""

    def __init__(self, in_ch: int, pool_features: int, **kw):
        conv = partial(BasicConv2d, **kw)
        self.branch1x1 = conv(in_ch, 64, 1)
        self.branch5x5_1 = conv(in_ch, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_ch, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_valid(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction): ``(B, H, W, in) -> (B, (H-3)//2+1, (W-3)//2+1, 480 + in)``."""

    def __init__(self, in_ch: int, **kw):
        conv = partial(BasicConv2d, **kw)
        self.branch3x3 = conv(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..6e (FID variant), factorised 7x7: ``(B, H, W, in) -> (B, H, W, 768)``."""

    def __init__(self, in_ch: int, channels_7x7: int, **kw):
        conv = partial(BasicConv2d, **kw)
        c7 = channels_7x7
        self.branch1x1 = conv(in_ch, 192, 1)
        self.branch7x7_1 = conv(in_ch, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_ch, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_ch, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_valid(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction): ``(B, H, W, in) -> (B, (H-3)//2+1, (W-3)//2+1, 512 + in)``."""

    def __init__(self, in_ch: int, **kw):
        conv = partial(BasicConv2d, **kw)
        self.branch3x3_1 = conv(in_ch, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_ch, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b / Mixed_7c (FID variants): ``(B, H, W, in) -> (B, H, W, 2048)``.

    ``pool="avg"`` (7b): valid-pixel 3x3 average pooling; ``pool="max"`` (7c): 3x3 max pooling.
    """

    def __init__(self, in_ch: int, *, pool: str, **kw):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        conv = partial(BasicConv2d, **kw)
        self.pool = pool
        self.branch1x1 = conv(in_ch, 320, 1)
        self.branch3x3_1 = conv(in_ch, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_ch, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_ch, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_valid(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Linear(nnx.Module):
    def __init__(self, in_f, out_f, param_dtype, rngs):
        if rngs is None:
            w = jnp.zeros((in_f, out_f), param_dtype)
        else:
            w = (jax.random.normal(rngs.params(), (in_f, out_f), jnp.float32) / math.sqrt(in_f)).astype(param_dtype)
        self.kernel = nnx.Param(w)
        self.bias = nnx.Param(jnp.zeros((out_f,), param_dtype))


# --------------------------------------------------------------------------------------------
# network


class InceptionV3FID(nnx.Module):
    """pytorch-fid's FID Inception-v3 (``InceptionV3(use_fid_inception=True)``), NHWC, inference only.

    ``model(images)`` runs the whole pytorch-fid pipeline on ``(B, H, W, 3)`` images (floating in
    ``[-1, 1]`` or uint8 in ``[0, 255]``) and returns the ``(B, 2048)`` pool3 features;
    ``model(images, return_logits=True)`` also returns the ``(B, 1008)`` classifier logits (for the
    Inception Score; softmax over them, as in the TF graph, includes the 8 unused classes).

    Weights come from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` via
    :func:`jaxdiff.convert.inception.load_inception_fid`; the constructor's random weights only
    give the variables their shapes. ``rngs=None`` builds zero kernels (cheap; for loading).
    ``precision`` is passed to the convolutions (``None``: backend default; use
    ``jax.lax.Precision.HIGHEST`` on accelerators that default to reduced-precision float32).
    """

    def __init__(self, *, dtype=jnp.float32, param_dtype=jnp.float32, precision=None,
                 rngs: nnx.Rngs | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.dtype = dtype
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = InceptionE(2048, pool="max", **kw)
        self.fc = _Linear(FEATURE_DIM, NUM_CLASSES, param_dtype, rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Pool3 features of preprocessed images: ``(B, H, W, 3)`` in ``[-1, 1]`` (299x299 for
        FID) ``-> (B, 2048)``, the global average of ``Mixed_7c``'s output."""
        x = x.astype(self.dtype)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = max_pool(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)

    def logits(self, features: jax.Array) -> jax.Array:
        """Classifier logits from pool3 features: ``(B, 2048) -> (B, 1008)`` (no dropout: inference)."""
        w = self.fc.kernel.get_value().astype(features.dtype)
        return jnp.dot(features, w, precision=jax.lax.Precision.HIGHEST) + self.fc.bias.get_value().astype(
            features.dtype)

    def __call__(self, images: jax.Array, *, return_logits: bool = False):
        """pytorch-fid pipeline: ``(B, H, W, 3)`` images (float ``[-1, 1]`` / uint8 ``[0, 255]``)
        ``-> (B, 2048)`` features, or ``((B, 2048), (B, 1008))`` with ``return_logits=True``."""
        feats = self.features(preprocess_fid(images, dtype=self.dtype))
        if return_logits:
            return feats, self.logits(feats)
        return feats
