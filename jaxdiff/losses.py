"""The denoising loss for any noise process, prediction target, time sampling and weighting.

    loss(x0) = w(t) * || apply_fn(x_t, model_time(t)) - target(x0, eps, t) ||^2,
    t ~ time sampler, eps ~ N(0, I), x_t = alpha(t) x0 + sigma(t) eps.

The pieces compose: `sample_time` / `time_sampler` draw t, `loss_weight` gives w(t) for a target,
`denoising_loss` puts them together per example, and `make_denoising_loss` builds the same thing from
names and parameter dicts (validated at once, before any tracing) for configs.

Weightings. Given x_t, the errors of the prediction kinds are proportional (x0 = (x - sigma eps) /
alpha, v = alpha eps - sigma x0, score = -eps / sigma, flow = alpha' x0 + sigma' eps), so every weighted
MSE can be written as a weight on the *x0* MSE, as Hang et al. (2023) do:

    |e_eps|^2   = SNR |e_x0|^2                 SNR = alpha^2 / sigma^2 = exp(logsnr)
    |e_v|^2     = SNR (alpha^2 + sigma^2)^2 / alpha^2 |e_x0|^2      (= (SNR + 1) |e_x0|^2 for VP)
    |e_score|^2 = SNR / sigma^2 |e_x0|^2
    |e_flow|^2  = SNR sigma^2 (logsnr'(t) / 2)^2 |e_x0|^2

A weighting other than "simple" is defined by its weight W(t) on the x0 MSE; on a target it becomes
W / (the factor above), so the loss value does not depend on which target the network predicts:

* "simple": w = 1 on the chosen target (DDPM's L_simple for eps; plain MSE for x0, v, flow, ...).
* "snr": W = SNR (Kingma et al. 2021; Hang et al. 2023 eq. 5): the weighting under which the x0 loss
  equals the simple eps loss; on eps w = 1, on x0 w = SNR.
* "min_snr": W = min(SNR, gamma), gamma = 5 (Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy", eq. 9-10): w = min(SNR, gamma) / SNR on eps, min(SNR, gamma) / (SNR + 1)
  on v (VP), min(SNR, gamma) on x0.
* "edm": W = (sigma_e^2 + sigma_data^2) / (sigma_e sigma_data)^2 with the EDM noise level
  sigma_e = sigma / alpha = exp(-logsnr / 2) (Karras et al. 2022, Table 1, "loss weighting lambda(sigma)"),
  sigma_data = 0.5 (or the process's `sigma_data`).
* "vdm": the likelihood weighting of Kingma et al. 2021 (VDM), eq. 17: on eps, w = -d logsnr/dt
  (= gamma'(t) with gamma = -logsnr), i.e. W = -d SNR/dt on x0. With reduce="sum" and t ~ U(t_min,
  t_max) ("uniform" or the low-discrepancy "stratified"), (t_max - t_min) / 2 * E[loss] is an unbiased
  estimate of VDM's continuous-time diffusion loss L_inf(x0) between those times (the 1/2 factor and the
  interval length are left out of the weight, as is usual for training); the integral is in logsnr,
  so it does not depend on the schedule.

Weights are finite wherever alpha > 0 and sigma > 0; "simple", "snr", "min_snr" and "edm" are also
finite at alpha = 0 (pure noise, e.g. Flow at t = 1).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxdiff import predictions
from jaxdiff.noise import NoiseProcess, VPDiscrete, broadcast_to_batch

Array = jax.Array

__all__ = [
    "TIME_SAMPLERS", "WEIGHTINGS", "REDUCTIONS",
    "time_sampler", "sample_time", "loss_weight", "logsnr_derivative",
    "denoising_loss", "make_denoising_loss",
    "uniform_time", "uniform_discrete_time", "stratified_time", "lognormal_time", "logit_normal_time",
    "uniform_logsnr_time",
]

REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------------------------------
# time sampling: each (key, batch, process, **params) -> t (batch,)
# ----------------------------------------------------------------------------------------------------

def _dtype():
    return jnp.result_type(float)


def _u_to_t(u: Array, process: NoiseProcess) -> Array:
    return process.t_min + (process.t_max - process.t_min) * u


def _t_from_logsnr_clipped(logsnr: Array, process: NoiseProcess) -> Array:
    """t with the given logsnr, clipped to [t_min, t_max] (in logsnr first, so the inverse stays finite)."""
    lo, hi = process.logsnr(jnp.asarray(process.t_max, logsnr.dtype)), process.logsnr(
        jnp.asarray(process.t_min, logsnr.dtype))
    t = process.t_from_logsnr(jnp.clip(logsnr, lo, hi))
    return jnp.clip(t, process.t_min, process.t_max).astype(logsnr.dtype)


def uniform_time(key: Array, batch: int, process: NoiseProcess) -> Array:
    """t ~ U[t_min, t_max), (batch,)."""
    return _u_to_t(jax.random.uniform(key, (batch,), _dtype()), process)


def uniform_discrete_time(key: Array, batch: int, process: NoiseProcess) -> Array:
    """A training index n ~ U{0..N-1} of a `VPDiscrete` process, as its time t = (n + 1) / N, (batch,)."""
    if not isinstance(process, VPDiscrete):
        raise ValueError(f"time sampling 'uniform_discrete' needs a VPDiscrete process, got {type(process).__name__}")
    n_steps = process.log_alphas.shape[0]
    n = jax.random.randint(key, (batch,), 0, n_steps)
    return (n + 1).astype(_dtype()) / n_steps


def stratified_time(key: Array, batch: int, process: NoiseProcess) -> Array:
    """Low-discrepancy (antithetic) uniform times of VDM: u_i = (u0 + i / batch) mod 1, u0 ~ U[0, 1),
    t = t_min + (t_max - t_min) u, (batch,). Exactly one u_i lies in each stratum [j/B, (j+1)/B);
    each t_i alone is U[t_min, t_max). The times are in cyclic order along the batch (not shuffled)."""
    u0 = jax.random.uniform(key, (), _dtype())
    u = jnp.mod(u0 + jnp.arange(batch, dtype=_dtype()) / batch, 1.0)
    return _u_to_t(u, process)


def lognormal_time(key: Array, batch: int, process: NoiseProcess, p_mean: float = -1.2,
                   p_std: float = 1.2) -> Array:
    """EDM's training noise levels (Karras et al. 2022, Table 1): ln sigma_e ~ N(p_mean, p_std^2) with the
    EDM noise level sigma_e = sigma / alpha, mapped to t = t_from_logsnr(-2 ln sigma_e) and clipped to
    [t_min, t_max]. For the EDM process t = sigma_e. (batch,)."""
    ln_sigma = p_mean + p_std * jax.random.normal(key, (batch,), _dtype())
    return _t_from_logsnr_clipped(-2.0 * ln_sigma, process)


def logit_normal_time(key: Array, batch: int, process: NoiseProcess, loc: float = 0.0,
                      scale: float = 1.0) -> Array:
    """Logit-normal times of rectified-flow training (Esser et al. 2024, SD3, eq. 19, m = 0, s = 1):
    t_flow = sigmoid(z), z ~ N(loc, scale^2). For another process, the t with the same logSNR as the flow
    time t_flow, i.e. logsnr = 2 log((1 - t_flow) / t_flow) = -2 z, clipped to [t_min, t_max]. (batch,)."""
    z = loc + scale * jax.random.normal(key, (batch,), _dtype())
    return _t_from_logsnr_clipped(-2.0 * z, process)


def _logsnr_bounds(process: NoiseProcess, logsnr_min, logsnr_max, dtype):
    """(logsnr_min, logsnr_max), defaulting to the process's range; ValueError if a bound is infinite."""
    with jax.ensure_compile_time_eval():   # concrete (and checked) even under jit, unless the process is traced
        lo = process.logsnr(jnp.asarray(process.t_max, dtype)) if logsnr_min is None else logsnr_min
        hi = process.logsnr(jnp.asarray(process.t_min, dtype)) if logsnr_max is None else logsnr_max
    for name, v in (("logsnr_min", lo), ("logsnr_max", hi)):
        if not isinstance(v, jax.core.Tracer) and not math.isfinite(float(v)):
            raise ValueError(f"time sampling 'uniform_logsnr': {name} is {float(v)} for this process's range; "
                             f"pass a finite {name}")
    return lo, hi


def uniform_logsnr_time(key: Array, batch: int, process: NoiseProcess, logsnr_min: float | None = None,
                        logsnr_max: float | None = None) -> Array:
    """logsnr ~ U[logsnr_min, logsnr_max] (default: the process's logsnr at t_max and t_min), mapped to t
    and clipped to [t_min, t_max], (batch,). Raises ValueError when a default bound is infinite."""
    dtype = _dtype()
    lo, hi = _logsnr_bounds(process, logsnr_min, logsnr_max, dtype)
    u = jax.random.uniform(key, (batch,), dtype)
    return _t_from_logsnr_clipped(lo + (hi - lo) * u, process)


_TIME_SAMPLERS: dict[str, Callable[..., Array]] = {
    "uniform": uniform_time,
    "uniform_discrete": uniform_discrete_time,
    "stratified": stratified_time,
    "lognormal": lognormal_time,
    "logit_normal": logit_normal_time,
    "uniform_logsnr": uniform_logsnr_time,
}
TIME_SAMPLERS = tuple(_TIME_SAMPLERS)


def _params_of(fn: Callable, skip: int) -> list[str]:
    return list(inspect.signature(fn).parameters)[skip:]


def _check_params(kind: str, name: str, params: Mapping[str, Any], accepted: list[str]) -> None:
    bad = sorted(set(params) - set(accepted))
    if bad:
        raise ValueError(f"unknown parameters {bad} for {kind} {name!r}; accepted: {accepted}")


def _check_time_sampling(name: str, params: Mapping[str, Any]) -> Callable[..., Array]:
    if name not in _TIME_SAMPLERS:
        raise ValueError(f"unknown time sampling {name!r}; choose one of {list(TIME_SAMPLERS)}")
    fn = _TIME_SAMPLERS[name]
    _check_params("time sampling", name, params, _params_of(fn, 3))
    return fn


def time_sampler(name: str, process: NoiseProcess, **params: Any) -> Callable[[Array, int], Array]:
    """A time sampler `(key, batch) -> t (batch,)` for `process` by name (one of TIME_SAMPLERS).

    params are the sampler's keyword arguments (lognormal: p_mean, p_std; logit_normal: loc, scale;
    uniform_logsnr: logsnr_min, logsnr_max). Unknown names or parameters raise ValueError at once.
    """
    fn = _check_time_sampling(name, params)
    if name == "uniform_discrete" and not isinstance(process, VPDiscrete):
        raise ValueError(f"time sampling 'uniform_discrete' needs a VPDiscrete process, got {type(process).__name__}")
    if name == "uniform_logsnr":
        _logsnr_bounds(process, params.get("logsnr_min"), params.get("logsnr_max"), _dtype())

    def sample(key: Array, batch: int) -> Array:
        return fn(key, batch, process, **params)

    return sample


def sample_time(key: Array, batch: int, process: NoiseProcess, name: str = "uniform", **params: Any) -> Array:
    """Draw t (batch,) with the named time sampler; see `time_sampler`."""
    return time_sampler(name, process, **params)(key, batch)


# ----------------------------------------------------------------------------------------------------
# weighting
# ----------------------------------------------------------------------------------------------------

def logsnr_derivative(process: NoiseProcess, t: Array) -> Array:
    """d logsnr / dt at t (any shape), by forward-mode autodiff; negative for every process."""
    t = jnp.asarray(t, _dtype())
    return jax.jvp(process.logsnr, (t,), (jnp.ones_like(t),))[1]


# log of each weighting's weight in two frames: on the x0 MSE (W) and on the eps MSE (W / SNR).
# Arguments: logsnr, dlogsnr = d logsnr/dt, params. Both frames are kept so that each target uses the
# one without inf - inf at alpha = 0 or sigma = 0.
def _log_w_snr(logsnr, dlogsnr, frame):
    return logsnr if frame == "x0" else jnp.zeros_like(logsnr)


def _log_w_min_snr(logsnr, dlogsnr, frame, gamma=5.0):
    log_g = math.log(gamma)
    return jnp.minimum(logsnr, log_g) if frame == "x0" else jnp.minimum(0.0, log_g - logsnr)


def _log_w_edm(logsnr, dlogsnr, frame, sigma_data=0.5):
    # W = 1/sigma_e^2 + 1/sigma_data^2 = SNR + 1/sigma_data^2; W/SNR = 1 + sigma_e^2/sigma_data^2
    ld = 2.0 * math.log(sigma_data)
    return jnp.logaddexp(logsnr, -ld) if frame == "x0" else jnp.logaddexp(-logsnr - ld, 0.0)


def _log_w_vdm(logsnr, dlogsnr, frame):
    log_eps = jnp.log(-dlogsnr)
    return logsnr + log_eps if frame == "x0" else log_eps


_WEIGHTINGS: dict[str, Callable[..., Array] | None] = {
    "simple": None,
    "snr": _log_w_snr,
    "min_snr": _log_w_min_snr,
    "edm": _log_w_edm,
    "vdm": _log_w_vdm,
}
WEIGHTINGS = tuple(_WEIGHTINGS)


def _check_weighting(name: str, params: Mapping[str, Any]) -> None:
    if name not in _WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {list(WEIGHTINGS)}")
    fn = _WEIGHTINGS[name]
    _check_params("weighting", name, params, [] if fn is None else _params_of(fn, 3))


def _log_target_factor(target: str, process: NoiseProcess, t: Array, dlogsnr: Array) -> Array:
    """log(|e_target|^2 / |e_x0|^2) (see the module docstring), same shape as t."""
    la, ls = process.log_alpha(t), process.log_sigma(t)
    if target == "x0":
        return jnp.zeros_like(la)
    if target == "eps":
        return 2 * (la - ls)
    if target == "v":
        return 2 * jnp.logaddexp(2 * la, 2 * ls) - 2 * ls
    if target == "score":
        return 2 * la - 4 * ls
    return 2 * la + 2 * jnp.log(0.5 * jnp.abs(dlogsnr))  # flow


def loss_weight(name: str, process: NoiseProcess, t: Array, target: str = "eps", **params: Any) -> Array:
    """The weight w(t) (same shape as t) multiplying the MSE of a `target` prediction.

    name: one of WEIGHTINGS (see the module docstring for the formulas and papers); params: gamma
    (min_snr, default 5), sigma_data (edm, default the process's or 0.5). target: one of
    predictions.KINDS. Raises ValueError for an unknown name, target or parameter.
    """
    predictions.check_kind(target)
    if name == "edm" and "sigma_data" not in params and hasattr(process, "sigma_data"):
        params = dict(params, sigma_data=process.sigma_data)
    _check_weighting(name, params)
    t = jnp.asarray(t, _dtype())
    if name == "simple":
        return jnp.ones_like(t)
    logsnr = process.logsnr(t)
    dlogsnr = logsnr_derivative(process, t)
    fn = _WEIGHTINGS[name]
    if target == "eps":
        return jnp.exp(fn(logsnr, dlogsnr, "eps", **params))
    return jnp.exp(fn(logsnr, dlogsnr, "x0", **params) - _log_target_factor(target, process, t, dlogsnr))


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------

def _check_names(target: str, time_sampling: str, weighting: str, reduce: str,
                 time_params: Mapping[str, Any], weight_params: Mapping[str, Any]) -> None:
    predictions.check_kind(target)
    _check_time_sampling(time_sampling, time_params)
    _check_weighting(weighting, weight_params)
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {list(REDUCTIONS)}")


def denoising_loss(apply_fn: Callable[..., Array], x0: Array, key: Array, process: NoiseProcess, *args: Any,
                   target: str = "eps", time_sampling: str = "uniform", weighting: str = "simple",
                   reduce: str = "mean", time_params: Mapping[str, Any] | None = None,
                   weight_params: Mapping[str, Any] | None = None, **kwargs: Any) -> Array:
    """Per-example weighted denoising loss, (B,).

    apply_fn(x_t (B, ...), model_time (B,), *args, **kwargs) -> prediction of `target` (B, ...);
    x0 (B, ...) clean data; key a PRNG key (split into the time and the noise draws).
    t ~ `time_sampling` (TIME_SAMPLERS, parameters in time_params), eps ~ N(0, I) in x0's dtype,
    x_t = alpha x0 + sigma eps; loss_i = w(t_i) * reduce_j (pred - target)_ij^2 with w from
    `loss_weight(weighting, ..., target)` and reduce "mean" (default) or "sum" over non-batch axes.
    jit-safe (names and params are Python values, validated before tracing: ValueError lists the
    accepted names).
    """
    time_params, weight_params = dict(time_params or {}), dict(weight_params or {})
    _check_names(target, time_sampling, weighting, reduce, time_params, weight_params)
    x0 = jnp.asarray(x0)
    if x0.ndim < 1:
        raise ValueError(f"x0 must have a batch dimension, got shape {x0.shape}")
    batch = x0.shape[0]
    k_t, k_eps = jax.random.split(key)
    t = time_sampler(time_sampling, process, **time_params)(k_t, batch)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    tb = broadcast_to_batch(t, x0)
    x_t = (process.alpha(tb) * x0 + process.sigma(tb) * eps).astype(x0.dtype)
    pred = apply_fn(x_t, process.model_time(t), *args, **kwargs)
    if pred.shape != x0.shape:
        raise ValueError(f"apply_fn returned shape {pred.shape}, expected the data's shape {x0.shape}")
    goal = predictions.from_x0_eps(x0, eps, target, x_t, t, process)
    err = jnp.square(pred.astype(goal.dtype) - goal).reshape(batch, -1)
    err = jnp.mean(err, axis=1) if reduce == "mean" else jnp.sum(err, axis=1)
    return loss_weight(weighting, process, t, target, **weight_params).astype(err.dtype) * err


def make_denoising_loss(process: NoiseProcess, *, target: str = "eps", time_sampling: str = "uniform",
                        weighting: str = "simple", reduce: str = "mean",
                        time_params: Mapping[str, Any] | None = None,
                        weight_params: Mapping[str, Any] | None = None) -> Callable[..., Array]:
    """Config-friendly constructor: `loss(apply_fn, x0, key, *args, **kwargs) -> (B,)` for `process`.

    All names and parameters are checked here (ValueError naming the accepted values), so a bad config
    fails before anything is traced. See `denoising_loss` for the arguments.
    """
    time_params, weight_params = dict(time_params or {}), dict(weight_params or {})
    _check_names(target, time_sampling, weighting, reduce, time_params, weight_params)
    time_sampler(time_sampling, process, **time_params)     # process-specific checks

    def loss(apply_fn: Callable[..., Array], x0: Array, key: Array, *args: Any, **kwargs: Any) -> Array:
        return denoising_loss(apply_fn, x0, key, process, *args, target=target, time_sampling=time_sampling,
                              weighting=weighting, reduce=reduce, time_params=time_params,
                              weight_params=weight_params, **kwargs)

    return loss
