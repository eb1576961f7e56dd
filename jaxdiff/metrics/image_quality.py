"""Reconstruction quality: PSNR and SSIM per image, NHWC, in JAX (jit/vmap-able).

SSIM follows Wang, Bovik, Sheikh & Simoncelli (IEEE TIP 2004): local statistics under an 11x11
Gaussian window (sigma 1.5, normalised to sum 1), ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` with
``K1 = 0.01``, ``K2 = 0.03`` and ``L`` the data range,

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

biased (population) local variances, the map taken over "valid" window positions only and averaged,
then averaged over channels. That is ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=L, channel_axis=-1)`` (which filters the whole
image and then crops the 5-pixel border: the same numbers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(a, b, what):
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{what}: images differ in shape: {np.shape(a)} vs {np.shape(b)}")
    if len(np.shape(a)) != 4:
        raise ValueError(f"{what}: images must be (B, H, W, C) (NHWC), got shape {np.shape(a)}")


def psnr(a: jax.Array, b: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(L^2 / mean((a - b)^2))``.

    ``a, b``: ``(B, H, W, C)``; ``data_range`` ``L`` is 2 for images in ``[-1, 1]`` (255 for uint8).
    Returns ``(B,)`` float32 (``inf`` for identical images).
    """
    _check_pair(a, b, "psnr")
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return (10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)).astype(jnp.float32)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian ``(size,)`` float32 centred on the middle tap."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, w: jax.Array) -> jax.Array:
    """Separable "valid" filtering of ``(N, H, W)`` with the 1-D window ``w (k,)`` along H then W."""
    k = w.shape[0]
    h = x.shape[1] - k + 1
    rows = sum(w[i] * x[:, i:i + h, :] for i in range(k))
    wd = x.shape[2] - k + 1
    return sum(w[i] * rows[:, :, i:i + wd] for i in range(k))


def ssim_map(a: jax.Array, b: jax.Array, data_range: float = 2.0, *, win_size: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA, k1: float = SSIM_K1, k2: float = SSIM_K2) -> jax.Array:
    """Local SSIM ``(B, H - win + 1, W - win + 1, C)`` (valid window positions), float32."""
    _check_pair(a, b, "ssim")
    bsz, h, wdt, c = np.shape(a)
    if min(h, wdt) < win_size:
        raise ValueError(f"ssim: images of {h}x{wdt} are smaller than the {win_size}x{win_size} window")
    w = jnp.asarray(gaussian_window(win_size, sigma))
    to_planes = lambda t: jnp.moveaxis(jnp.asarray(t, jnp.float32), -1, 1).reshape(bsz * c, h, wdt)
    x, y = to_planes(a), to_planes(b)
    mx, my = _filter_valid(x, w), _filter_valid(y, w)
    sxx = _filter_valid(x * x, w) - mx * mx
    syy = _filter_valid(y * y, w) - my * my
    sxy = _filter_valid(x * y, w) - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.moveaxis(s.reshape(bsz, c, s.shape[1], s.shape[2]), 1, -1)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 2.0, **kw) -> jax.Array:
    """Mean SSIM per image, ``(B, H, W, C) x (B, H, W, C) -> (B,)`` float32 (see the module docstring;
    ``kw``: ``win_size``, ``sigma``, ``k1``, ``k2``). Images must be at least 11x11."""
    return jnp.mean(ssim_map(a, b, data_range, **kw), axis=(1, 2, 3))


__all__ = ["gaussian_window", "psnr", "ssim", "ssim_map"]
