"""LPIPS perceptual distance (Zhang et al. 2018, "v0.1", VGG16 trunk) as an NNX module, NHWC.

``LPIPS(x (B, H, W, 3), y (B, H, W, 3)) -> (B,)`` with images in ``[-1, 1]``:

1. scaling layer: ``(x - shift) / scale`` with the lpips package's constants
   ``shift = (-0.030, -0.088, -0.188)``, ``scale = (0.458, 0.448, 0.450)`` (ImageNet mean/std
   re-expressed for ``[-1, 1]`` inputs);
2. VGG16 ``features`` (13 3x3 convs + ReLU, 2x2 max-pools); the taps are the ReLU outputs
   ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` (64, 128, 256, 512, 512 channels);
3. each tap unit-normalised over channels, ``f / (||f||_2 + 1e-10)``;
4. squared difference, a learned 1x1 conv to one channel without bias (``lin0..lin4``; the
   released weights are non-negative, the package clamps them at 0 while training), spatial mean;
5. sum over the five taps.

This matches ``lpips.LPIPS(net="vgg", version="0.1")`` and taming-transformers' ``LPIPS`` (which
hard-codes the VGG variant) in eval mode (dropout before the 1x1 convs is off). Weights are not bundled:
:func:`jaxdiff.convert.lpips.load_lpips` reads them from local files. The VGG trunk is frozen when
used as a loss: close over its parameters (they are not part of any train state).

``widths`` shrinks the trunk for tests (``(64, 128, 256, 512, 512)`` is VGG16); the structure, taps
and numerics are unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.layers import Conv2d

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
#: number of 3x3 convs in each VGG16 stage (a 2x2 max-pool precedes every stage but the first)
VGG16_STAGE_CONVS = (2, 2, 3, 3, 3)
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """``f / (||f||_2 over channels + eps)``, ``(B, H, W, C) -> (B, H, W, C)``.

    The norm is written so that its gradient is finite where a feature vector is exactly zero
    (``sqrt`` at 0 would give ``0 * inf = nan``); values are unchanged.
    """
    s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = s > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)
    return f / (norm + eps)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (floor for odd sizes, as ``nn.MaxPool2d(2, 2)``), NHWC."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nnx.Module):
    """The 13 conv layers of torchvision's ``vgg16().features``; ``(B, H, W, 3) -> 5 taps``.

    ``convs[i]`` is torchvision's ``features[VGG16_CONV_INDICES[i]]``
    (see :data:`jaxdiff.convert.lpips.VGG16_CONV_INDICES`).
    """

    def __init__(self, widths=VGG16_WIDTHS, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if len(widths) != 5:
            raise ValueError(f"VGG16Features: need 5 stage widths, got {tuple(widths)}")
        convs, cin = [], 3
        for width, n in zip(widths, VGG16_STAGE_CONVS):
            for _ in range(n):
                convs.append(Conv2d(cin, width, 3, padding=1, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs))
                cin = width
        self.convs = nnx.List(convs)
        self.widths = tuple(widths)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``x``: ``(B, H, W, 3)`` (already scaled) -> ``[relu1_2, ..., relu5_3]``, tap ``k`` of shape
        ``(B, H / 2^k, W / 2^k, widths[k])``."""
        taps, i = [], 0
        h = x
        for stage, n in enumerate(VGG16_STAGE_CONVS):
            if stage:
                h = max_pool_2x2(h)
            for _ in range(n):
                h = jax.nn.relu(self.convs[i](h))
                i += 1
            taps.append(h)
        return taps


class LPIPS(nnx.Module):
    """LPIPS distance, VGG16 variant. ``(x, y)``: ``(B, H, W, 3)`` in ``[-1, 1]`` -> ``(B,)``.

    Images must be at least 16x16 (four max-pools leave ``relu5_3`` at least 1x1).
    Sub-modules ``net`` (:class:`VGG16Features`) and ``lins`` (five 1x1 convs ``(1, 1, C, 1)``, no
    bias). Randomly initialised lins are drawn non-negative (uniform ``[0, 1/C)``).
    """

    def __init__(self, widths=VGG16_WIDTHS, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.net = VGG16Features(widths, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lins = []
        for c in widths:
            lin = Conv2d(c, 1, 1, padding=0, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            lin.kernel[...] = jnp.abs(lin.kernel[...]) / float(np.sqrt(c))   # U[0, 1/C): non-negative
            lins.append(lin)
        self.lins = nnx.List(lins)
        self.dtype = dtype

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Unit-normalised taps of ``x (B, H, W, 3)`` in ``[-1, 1]``."""
        s = np.shape(x)
        if len(s) != 4 or s[-1] != 3:
            raise ValueError(f"LPIPS input must have shape (B, H, W, 3) (NHWC, RGB in [-1, 1]), got {tuple(s)}")
        if min(s[1], s[2]) < 16:
            raise ValueError(f"LPIPS input {s[1]}x{s[2]} is too small: VGG16's four max-pools need >= 16x16")
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        x = (jnp.asarray(x, jnp.float32) - shift) / scale
        return [normalize_channels(f.astype(jnp.float32)) for f in self.net(x.astype(self.dtype))]

    def __call__(self, x: jax.Array, y: jax.Array, *, per_layer: bool = False):
        """``x, y``: ``(B, H, W, 3)`` in ``[-1, 1]`` -> distance ``(B,)`` float32 (and the five
        per-tap ``(B,)`` terms when ``per_layer``)."""
        if np.shape(x) != np.shape(y):
            raise ValueError(f"LPIPS inputs differ in shape: {np.shape(x)} vs {np.shape(y)}")
        b = np.shape(x)[0]
        fx = self.features(jnp.concatenate([jnp.asarray(x), jnp.asarray(y)], axis=0))
        terms = []
        for f, lin in zip(fx, self.lins):
            d = jnp.square(f[:b] - f[b:])
            terms.append(jnp.mean(lin(d).astype(jnp.float32), axis=(1, 2, 3)))
        total = sum(terms)
        return (total, terms) if per_layer else total
