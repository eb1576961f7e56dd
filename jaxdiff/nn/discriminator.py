"""PatchGAN discriminator of pix2pix / taming-transformers (``NLayerDiscriminator``), NHWC.

``NLayerDiscriminator(x (B, H, W, C)) -> logits (B, H', W', 1)``: one real/fake logit per
overlapping patch (70x70 receptive field for ``n_layers=3``). Layout, for ``n_layers = n``::

    conv4x4/2 (C -> ndf)                         + LeakyReLU(0.2)          [bias, no norm]
    for k in 1..n-1: conv4x4/2 (ndf*m_{k-1} -> ndf*m_k) + norm + LeakyReLU   [no bias]
    conv4x4/1 (ndf*m_{n-1} -> ndf*m_n)           + norm + LeakyReLU(0.2)   [no bias]
    conv4x4/1 (ndf*m_n -> 1)                                                [bias]

with ``m_k = min(2**k, 8)`` and padding 1 everywhere, so a 32x32 input gives 2x2 logits and a
256x256 input 30x30 (the same shapes as the PyTorch model).

Normalisation (a documented deviation): taming uses ``BatchNorm2d`` in training mode. Batch statistics
make the discriminator's output for one image depend on the rest of the batch and need mutable running
averages threaded through a pure train step; here ``norm="group"`` (default) uses GroupNorm (32 groups,
or fewer when the width is smaller), which has no state and is per-example, and ``norm="none"`` drops
the normalisation (the ``use_bias`` of the normed convs is then switched back on).

Initialisation as pix2pix's ``weights_init``: every conv kernel ``N(0, 0.02)``, biases 0, norm scales
``N(1, 0.02)``, norm biases 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.layers import CONV_AXES, Conv2d, GroupNorm, make_param

NORMS = ("group", "none")


def _normal(std: float, mean: float = 0.0):
    def init(gen, shape):
        if isinstance(gen, np.random.Generator):
            return (mean + std * gen.standard_normal(shape)).astype(np.float32)
        return mean + std * jax.random.normal(gen, shape, jnp.float32)
    return init


def _conv(rngs, cin, cout, stride, use_bias, dtype, param_dtype) -> Conv2d:
    conv = Conv2d(cin, cout, 4, stride=stride, padding=1, use_bias=use_bias, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
    conv.kernel = make_param(rngs, _normal(0.02), (4, 4, cin, cout), param_dtype, CONV_AXES)
    if use_bias:
        conv.bias = make_param(None, lambda g, s: jnp.zeros(s, jnp.float32), (cout,), param_dtype,
                               ("conv_out",))
    return conv


class NLayerDiscriminator(nnx.Module):
    """PatchGAN discriminator. ``(B, H, W, in_channels) -> (B, H', W', 1)`` float32 logits.

    Args:
      in_channels: image channels (3 for RGB).
      ndf: width of the first conv (64 in taming).
      n_layers: number of stride-2 convs (3 in taming; H' = H/2^n_layers - 2).
      norm: ``"group"`` (GroupNorm, default) or ``"none"``; see the module docstring.
      num_groups: GroupNorm groups (clipped to the layer width).

    Sub-modules ``convs`` (``n_layers + 2`` convs) and ``norms`` (``n_layers`` GroupNorms, or empty).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *, norm: str = "group",
                 num_groups: int = 32, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if norm not in NORMS:
            raise ValueError(f"NLayerDiscriminator: norm must be one of {NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        self.n_layers, self.dtype, self.in_channels = n_layers, dtype, in_channels
        normed = norm != "none"
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        widths = [ndf * min(2 ** k, 8) for k in range(n_layers + 1)]
        convs = [_conv(rngs, in_channels, widths[0], 2, True, **kw)]
        norms = []
        for k in range(1, n_layers + 1):
            stride = 2 if k < n_layers else 1
            convs.append(_conv(rngs, widths[k - 1], widths[k], stride, not normed, **kw))
            if normed:
                g = np.gcd(min(num_groups, widths[k]), widths[k])
                gn = GroupNorm(int(g), widths[k], eps=1e-5, **kw)
                gn.scale = make_param(rngs, _normal(0.02, 1.0), (widths[k],), param_dtype, ("norm",))
                norms.append(gn)
        convs.append(_conv(rngs, widths[-1], 1, 1, True, **kw))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, in_channels)`` images (``H, W >= 2**n_layers * 3``) -> ``(B, H', W', 1)``."""
        s = np.shape(x)
        if len(s) != 4 or s[-1] != self.in_channels:
            raise ValueError(f"discriminator input must have shape (B, H, W, {self.in_channels}) (NHWC), "
                             f"got {tuple(s)}")
        min_size = 2 ** self.n_layers * 3
        if min(s[1], s[2]) < min_size:
            raise ValueError(f"discriminator input {s[1]}x{s[2]} is too small for n_layers={self.n_layers}: "
                             f"need at least {min_size}x{min_size} to leave one logit")
        h = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for k in range(1, self.n_layers + 1):
            h = self.convs[k](h)
            if len(self.norms):
                h = self.norms[k - 1](h)
            h = jax.nn.leaky_relu(h, 0.2)
        return self.convs[-1](h).astype(jnp.float32)
