"""What a network predicts, and how to turn one prediction into another.

Every affine Gaussian process has x_t = alpha x0 + sigma eps, so a prediction of any of the kinds below
determines the pair (x0, eps) given x_t:

  * "eps"   the noise eps
  * "x0"    the clean data x0
  * "v"     v = alpha eps - sigma x0 (Salimans & Ho); for VP processes eps = alpha v + sigma x
  * "score" grad log p_t(x) = -eps / sigma
  * "flow"  the velocity dx_t/dt = alpha'(t) x0 + sigma'(t) eps (for alpha = 1 - t, sigma = t: eps - x0)

Also here: EDM preconditioning, classifier-free guidance and static / dynamic thresholding of x0.
All functions are pure; `t` is a scalar or of shape (B,) against x of shape (B, ...).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.noise import NoiseProcess, broadcast_to_batch

Array = jax.Array
Denoiser = Callable[..., Array]

KINDS = ("eps", "x0", "v", "score", "flow")

__all__ = ["KINDS", "check_kind", "to_x0_eps", "from_x0_eps", "convert", "alpha_sigma_rates",
           "edm_coefficients", "edm_denoiser", "cfg_combine", "classifier_free_guidance",
           "static_threshold", "dynamic_threshold"]


def check_kind(kind: str) -> str:
    """Return `kind` if it is a known prediction kind, else raise ValueError listing them."""
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of {list(KINDS)}")
    return kind


def alpha_sigma_rates(process: NoiseProcess, t: Array) -> tuple[Array, Array]:
    """(d alpha/dt, d sigma/dt) at t (any shape), by forward-mode autodiff of the process."""
    t = jnp.asarray(t, jnp.result_type(float))
    ones = jnp.ones_like(t)
    _, da = jax.jvp(process.alpha, (t,), (ones,))
    _, ds = jax.jvp(process.sigma, (t,), (ones,))
    return da, ds


def to_x0_eps(pred: Array, kind: str, x: Array, t: Array, process: NoiseProcess) -> tuple[Array, Array]:
    """Turn a prediction of `kind` at (x, t) into (x0, eps), each shaped like x (B, ...)."""
    check_kind(kind)
    tb = broadcast_to_batch(t, x)
    a, s = process.alpha(tb), process.sigma(tb)
    if kind == "eps":
        return (x - s * pred) / a, pred
    if kind == "x0":
        return pred, (x - a * pred) / s
    if kind == "score":
        eps = -s * pred
        return (x - s * eps) / a, eps
    if kind == "v":
        norm = a * a + s * s
        return (a * x - s * pred) / norm, (s * x + a * pred) / norm
    da, ds = alpha_sigma_rates(process, tb)      # flow: solve [[a, s], [da, ds]] [x0, eps] = [x, u]
    det = a * ds - s * da
    return (ds * x - s * pred) / det, (a * pred - da * x) / det


def from_x0_eps(x0: Array, eps: Array, kind: str, x: Array, t: Array, process: NoiseProcess) -> Array:
    """The prediction of `kind` made by (x0, eps) at (x, t); shapes (B, ...)."""
    check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    tb = broadcast_to_batch(t, x)
    if kind == "score":
        return -eps / process.sigma(tb)
    if kind == "v":
        return process.alpha(tb) * eps - process.sigma(tb) * x0
    da, ds = alpha_sigma_rates(process, tb)
    return da * x0 + ds * eps


def convert(pred: Array, from_kind: str, to_kind: str, x: Array, t: Array, process: NoiseProcess) -> Array:
    """Convert a prediction between kinds at the same (x, t); shapes (B, ...)."""
    if check_kind(from_kind) == check_kind(to_kind):
        return pred
    x0, eps = to_x0_eps(pred, from_kind, x, t, process)
    return from_x0_eps(x0, eps, to_kind, x, t, process)


# ----------------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1)
# ----------------------------------------------------------------------------------------------------

def edm_coefficients(sigma: Array, sigma_data: float = 0.5) -> tuple[Array, Array, Array, Array]:
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning at EDM noise level sigma (any shape)."""
    sigma = jnp.asarray(sigma)
    total = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def edm_denoiser(network: Callable[..., Array], process: NoiseProcess, sigma_data: float = 0.5) -> Denoiser:
    """Wrap a raw network F(x_in, c_noise, *args) into an x0-predicting denoiser D(x, t, *args).

    For processes with alpha != 1 the input is first rescaled, x_hat = x / alpha, and EDM's sigma is
    sigma / alpha (the variables of EDM's section 4). x (B, ...), t scalar or (B,).
    """
    def denoise(x: Array, t: Array, *args: Any) -> Array:
        tb = broadcast_to_batch(t, x)
        a = process.alpha(tb)
        sig = process.sigma(tb) / a
        c_skip, c_out, c_in, c_noise = edm_coefficients(sig, sigma_data)
        x_hat = x / a
        c_noise = jnp.broadcast_to(jnp.reshape(c_noise, (-1,)), (x.shape[0],))
        return c_skip * x_hat + c_out * network(c_in * x_hat, c_noise, *args)
    return denoise


# ----------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------

def cfg_combine(cond: Array, uncond: Array, scale: float | Array) -> Array:
    """Classifier-free guidance: uncond + scale (cond - uncond). scale = 1 returns cond."""
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(model: Callable[..., Array], cond: Any, uncond: Any,
                             scale: float | Array) -> Denoiser:
    """A denoiser f(x, t) that runs `model(x, t, c)` once on the doubled batch [cond; uncond].

    model: (x (2B, ...), t (2B,), c (2B, ...)) -> prediction (2B, ...). Guidance is linear in the
    prediction, so it is exact for eps, x0, v and flow predictions alike. cond/uncond: (B, ...) pytrees.
    """
    def guided(x: Array, t: Array) -> Array:
        b = x.shape[0]
        tt = jnp.broadcast_to(jnp.asarray(t), (b,))
        c = jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), cond, uncond)
        out = model(jnp.concatenate([x, x], axis=0), jnp.concatenate([tt, tt], axis=0), c)
        return cfg_combine(out[:b], out[b:], scale)
    return guided


# ----------------------------------------------------------------------------------------------------
# Thresholding of x0 predictions (pixel models only)
# ----------------------------------------------------------------------------------------------------

def static_threshold(x0: Array, max_value: float = 1.0) -> Array:
    """Clip x0 to [-max_value, max_value]."""
    return jnp.clip(x0, -max_value, max_value)


def dynamic_threshold(x0: Array, percentile: float = 0.995, max_value: float | None = None,
                      min_scale: float = 1.0) -> Array:
    """Imagen's dynamic thresholding of x0 (B, ...), per example.

    s = quantile(|x0|, percentile), clamped to [min_scale, max_value] (max_value=None: no upper bound,
    as in DPM-Solver; diffusers' `sample_max_value` is the upper bound); x0 -> clip(x0, -s, s) / s.
    The quantile is taken in at least float32.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.promote_types(x0.dtype, jnp.float32))
    s = jnp.quantile(flat, percentile, axis=1)
    s = jnp.maximum(s, min_scale)
    if max_value is not None:
        s = jnp.minimum(s, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s
