"""Noise processes: the marginals q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I) of every diffusion family.

Each process is a frozen dataclass registered as a JAX pytree: array fields (the knots of a discrete
schedule) are leaves, scalar hyper-parameters are static. All methods are pure and elementwise in `t`,
so they work under `jit`, `vmap`, `pmap` and with sharded inputs.

Conventions shared by every process:

* `logsnr(t) = log(alpha^2 / sigma^2)` is the *full* log signal-to-noise ratio, strictly decreasing in t.
  Solvers use the half-logSNR `lambda = logsnr / 2` of the DPM-Solver papers.
* `t_min .. t_max` is the range the model was trained on; `t_zero` is the time where sigma = 0
  (clean data). A time grid may end at `t_zero` to take a final step to sigma = 0.
* `model_time(t)` is what the network receives as its time input (e.g. 0..999 for discrete DDPMs).
* `prior_std` is the standard deviation of the prior N(0, prior_std^2 I) that sampling starts from.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "NoiseProcess", "VPDiscrete", "VPLinear", "VPCosine", "VE", "EDM", "Flow",
    "PROCESSES", "make_process", "check_time", "broadcast_to_batch",
    "linear_betas", "scaled_linear_betas", "cosine_betas", "rescale_zero_terminal_snr",
]


def _pytree(cls=None, *, data: tuple[str, ...] = ()):
    """Frozen dataclass + pytree: the names in `data` are leaves, every other field is static."""
    def wrap(c):
        c = dataclasses.dataclass(frozen=True)(c)
        names = [f.name for f in dataclasses.fields(c)]
        return jax.tree_util.register_dataclass(
            c, data_fields=[n for n in names if n in data], meta_fields=[n for n in names if n not in data])
    return wrap if cls is None else wrap(cls)


def broadcast_to_batch(t: Array, x: Array) -> Array:
    """Reshape per-example times `t` of shape (B,) (or a scalar) to broadcast against x (B, ...)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    if t.shape[0] != x.shape[0] or t.ndim != 1:
        raise ValueError(f"time of shape {t.shape} does not match a batch of shape {x.shape}: "
                         "expected a scalar or shape (batch,)")
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def _is_concrete(t) -> bool:
    return not isinstance(t, jax.core.Tracer)


def check_time(process: "NoiseProcess", t, *, allow_zero: bool = True) -> None:
    """Raise ValueError if a concrete `t` lies outside [t_zero or t_min, t_max]; tracers pass unchecked."""
    if not _is_concrete(t):
        return
    t = np.asarray(t, dtype=np.float64)
    lo = process.t_zero if allow_zero else process.t_min
    if np.any(np.isnan(t)) or np.any(t < lo) or np.any(t > process.t_max * (1 + 1e-12)):
        raise ValueError(f"time {t.min() if t.size else t} .. {t.max() if t.size else t} is outside the range "
                         f"[{lo}, {process.t_max}] of {type(process).__name__}")


class NoiseProcess:
    """Interface of a noise process. Subclasses define `log_alpha`, `log_sigma`, `logsnr`, `t_from_logsnr`."""

    t_min: float
    t_max: float
    t_zero: float = 0.0
    prior_std: float = 1.0

    # -- defined by subclasses -------------------------------------------------------------------
    def log_alpha(self, t: Array) -> Array:
        """log alpha(t), any shape."""
        raise NotImplementedError

    def log_sigma(self, t: Array) -> Array:
        """log sigma(t), any shape."""
        raise NotImplementedError

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Exact inverse of `logsnr`, any shape."""
        raise NotImplementedError

    def model_time(self, t: Array) -> Array:
        """The network's time input for process time t (default: t itself)."""
        return jnp.asarray(t)

    # -- derived -----------------------------------------------------------------------------------
    def alpha(self, t: Array) -> Array:
        """Signal scale alpha(t), same shape as t."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: Array) -> Array:
        """Noise scale sigma(t), same shape as t."""
        return jnp.exp(self.log_sigma(t))

    def logsnr(self, t: Array) -> Array:
        """Full log-SNR log(alpha^2 / sigma^2), strictly decreasing in t."""
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def prior_sample(self, key: Array, shape: tuple[int, ...], dtype=None) -> Array:
        """x_T ~ N(0, prior_std^2 I) of the given shape."""
        dtype = dtype or jnp.result_type(float)
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
        """x_t = alpha(t) x0 + sigma(t) noise; x0, noise (B, ...), t scalar or (B,)."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 shape {x0.shape} and noise shape {noise.shape} differ")
        check_time(self, t)
        tb = broadcast_to_batch(t, x0)
        return self.alpha(tb) * x0 + self.sigma(tb) * noise


# ----------------------------------------------------------------------------------------------------
# VP discrete: a schedule of N training steps, continuous in time by DPM-Solver's interpolation.
# ----------------------------------------------------------------------------------------------------

def linear_betas(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM (Ho et al.) betas, float64 (n,)."""
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)


def scaled_linear_betas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion "scaled_linear" betas, linear in sqrt(beta), float64 (n,)."""
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2


def cosine_betas(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """iDDPM cosine betas: beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta), float64 (n,)."""
    def abar(u):
        return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    i = np.arange(n, dtype=np.float64)
    return np.minimum(1 - abar((i + 1) / n) / abar(i / n), max_beta)


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. (2023) Alg. 1: shift/scale sqrt(abar) so abar_T = 0 with abar_0 unchanged."""
    a = np.sqrt(np.asarray(alphas_cumprod, np.float64))
    a0, aT = a[0], a[-1]
    return ((a - aT) * a0 / (a0 - aT)) ** 2


class _VariancePreserving(NoiseProcess):
    """alpha^2 + sigma^2 = 1: sigma follows from log alpha."""

    def log_sigma(self, t):
        return 0.5 * jnp.log(-jnp.expm1(2 * self.log_alpha(t)))


@_pytree(data=("log_alphas",))
class VPDiscrete(_VariancePreserving):
    """Variance-preserving process of a model trained on N discrete steps.

    Knot n (n = 0..N-1) sits at t = (n+1)/N with log alpha = 0.5 log(abar_n), as in DPM-Solver's
    `NoiseScheduleVP('discrete')`; log alpha is piecewise linear in t between knots. An extra knot
    (t=0, log alpha=0) makes t=0 the clean-data time (abar = 1, DDIM's `set_alpha_to_one`).
    `model_time(t) = N (t - 1/N)` maps knot n to the training index n.

    Attributes:
      log_alphas: (N,) 0.5 * log(alphas_cumprod), strictly decreasing.
      num_train_steps: the model's N before any logSNR clipping (sets `model_time`'s scale).
    """

    log_alphas: Array
    num_train_steps: int = 1000

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *, logsnr_min: float | None = None,
                            num_train_steps: int | None = None) -> "VPDiscrete":
        """Build from abar_n (N,). `logsnr_min` drops trailing steps below it (DPM-Solver's clip at
        half-logSNR -5.1 is `logsnr_min=-10.2`); the kept knots are re-spaced on (0, 1] as DPM-Solver does."""
        ac = np.asarray(alphas_cumprod, np.float64)
        if ac.ndim != 1 or ac.size < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D array of at least 2 steps, got shape {ac.shape}")
        if not (np.all(ac > 0) and np.all(ac <= 1) and np.all(np.diff(ac) < 0)):
            raise ValueError("alphas_cumprod must lie in (0, 1] and decrease strictly "
                             "(for a zero-terminal-SNR schedule clamp the last entry, e.g. to 2**-24)")
        n_train = num_train_steps or ac.size
        la = 0.5 * np.log(ac)
        if logsnr_min is not None:
            logsnr = 2 * la - np.log(-np.expm1(2 * la))
            la = la[logsnr >= logsnr_min]
        return cls(log_alphas=jnp.asarray(la), num_train_steps=int(n_train))

    @classmethod
    def from_betas(cls, betas, **kwargs) -> "VPDiscrete":
        """Build from betas (N,): abar_n = prod_{i<=n} (1 - beta_i)."""
        betas = np.asarray(betas, np.float64)
        if np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("betas must lie in (0, 1)")
        return cls.from_alphas_cumprod(np.cumprod(1.0 - betas), **kwargs)

    # knots, with the clean-data knot prepended
    def _knots(self):
        n = self.log_alphas.shape[0]
        dtype = self.log_alphas.dtype
        t = jnp.arange(n + 1, dtype=dtype) / n
        la = jnp.concatenate([jnp.zeros((1,), dtype), self.log_alphas])
        return t, la

    @property
    def t_min(self) -> float:
        return 1.0 / self.log_alphas.shape[0]

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def alphas_cumprod(self) -> Array:
        """abar_n (N,) of the (possibly clipped) schedule."""
        return jnp.exp(2 * self.log_alphas)

    def log_alpha(self, t):
        tk, lak = self._knots()
        t = jnp.asarray(t, lak.dtype)
        return jnp.interp(t, tk, lak)

    def t_from_logsnr(self, logsnr):
        tk, lak = self._knots()
        la = -0.5 * jax.nn.softplus(-jnp.asarray(logsnr, lak.dtype))
        return jnp.interp(la, lak[::-1], tk[::-1])

    def model_time(self, t):
        n = self.log_alphas.shape[0]
        return (jnp.asarray(t) - 1.0 / n) * self.num_train_steps


# ----------------------------------------------------------------------------------------------------
# VP continuous
# ----------------------------------------------------------------------------------------------------

@_pytree
class VPLinear(_VariancePreserving):
    """Continuous VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (ScoreSDE, T = 1).

    log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2.
    `model_time(t) = time_scale * t` (999 reproduces a 1000-step model's labels; 1 for ScoreSDE nets).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    time_scale: float = 1.0

    def log_alpha(self, t):
        t = jnp.asarray(t)
        return -0.25 * (self.beta_max - self.beta_min) * t ** 2 - 0.5 * self.beta_min * t

    def t_from_logsnr(self, logsnr):
        db = self.beta_max - self.beta_min
        tau = 2.0 * db * jnp.logaddexp(-jnp.asarray(logsnr), 0.0)   # = -4 db log alpha
        return tau / (jnp.sqrt(self.beta_min ** 2 + tau) + self.beta_min) / db

    def model_time(self, t):
        return self.time_scale * jnp.asarray(t)


@_pytree
class VPCosine(_VariancePreserving):
    """Continuous cosine VP (Nichol & Dhariwal): alpha(t) = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)).

    t_max defaults to 0.9946, where DPM-Solver stops because alpha -> 0 at t = 1.
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    time_scale: float = 1.0

    def _log_cos0(self):
        return math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))

    def log_alpha(self, t):
        t = jnp.asarray(t)
        return jnp.log(jnp.cos(jnp.pi / 2 * (t + self.s) / (1 + self.s))) - self._log_cos0()

    def t_from_logsnr(self, logsnr):
        la = -0.5 * jax.nn.softplus(-jnp.asarray(logsnr))
        return 2 * (1 + self.s) / jnp.pi * jnp.arccos(jnp.exp(la + self._log_cos0())) - self.s

    def model_time(self, t):
        return self.time_scale * jnp.asarray(t)


# ----------------------------------------------------------------------------------------------------
# VE, EDM, flow
# ----------------------------------------------------------------------------------------------------

class _UnitAlpha(NoiseProcess):
    """alpha = 1 (VE and EDM); the prior is N(0, sigma_max^2 I)."""

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, float))


@_pytree
class VE(_UnitAlpha):
    """Variance-exploding (ScoreSDE): alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t, t in [0, 1].

    sigma never reaches 0 at finite t, so `t_zero = -inf` (sigma(-inf) = 0 exactly).
    `model_time(t) = sigma(t)` (NCSN++ conditions on the noise level).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0
    t_zero: float = -math.inf

    def log_sigma(self, t):
        return math.log(self.sigma_min) + jnp.asarray(t) * math.log(self.sigma_max / self.sigma_min)

    def t_from_logsnr(self, logsnr):
        return (-0.5 * jnp.asarray(logsnr) - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    def model_time(self, t):
        return self.sigma(t)


@_pytree
class EDM(_UnitAlpha):
    """EDM (Karras et al. 2022): time is the noise level, sigma(t) = t, alpha = 1.

    `model_time(t) = log(t) / 4` is EDM's c_noise; `sigma_data` feeds its preconditioning.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def log_sigma(self, t):
        return jnp.log(jnp.asarray(t))

    def t_from_logsnr(self, logsnr):
        return jnp.exp(-0.5 * jnp.asarray(logsnr))

    def model_time(self, t):
        return 0.25 * jnp.log(jnp.asarray(t))


@_pytree
class Flow(NoiseProcess):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t, t in [0, 1]; x_1 is pure noise.

    `model_time(t) = time_scale * t` (1000 for SD3-style networks).
    """

    t_min: float = 1e-3
    t_max: float = 1.0
    time_scale: float = 1.0

    def log_alpha(self, t):
        return jnp.log1p(-jnp.asarray(t))

    def log_sigma(self, t):
        return jnp.log(jnp.asarray(t))

    def t_from_logsnr(self, logsnr):
        return jax.nn.sigmoid(-0.5 * jnp.asarray(logsnr))

    def model_time(self, t):
        return self.time_scale * jnp.asarray(t)


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------

def _vp_discrete(betas_fn: Callable[..., np.ndarray]):
    def build(num_train_steps: int = 1000, zero_terminal_snr: bool = False, logsnr_min: float | None = None,
              **beta_kwargs) -> VPDiscrete:
        betas = betas_fn(num_train_steps, **beta_kwargs)
        ac = np.cumprod(1.0 - betas)
        if zero_terminal_snr:
            ac = rescale_zero_terminal_snr(ac)
            ac[-1] = 2.0 ** -24   # keep sigma/alpha finite at t = 1, as diffusers' DPM/UniPC schedulers do
        return VPDiscrete.from_alphas_cumprod(ac, logsnr_min=logsnr_min)
    build.__doc__ = f"Discrete VP process from `{betas_fn.__name__}`: accepts num_train_steps, " \
                    "zero_terminal_snr, logsnr_min and the betas' own keyword arguments."
    return build


PROCESSES: dict[str, Callable[..., NoiseProcess]] = {
    "vp_linear": _vp_discrete(linear_betas),
    "vp_scaled_linear": _vp_discrete(scaled_linear_betas),
    "vp_cosine": _vp_discrete(cosine_betas),
    "vp_continuous_linear": VPLinear,
    "vp_continuous_cosine": VPCosine,
    "ve": VE,
    "edm": EDM,
    "flow": Flow,
}


def make_process(name: str, **kwargs: Any) -> NoiseProcess:
    """Build a noise process by name, e.g. `make_process("vp_linear")` or `make_process("edm", sigma_max=80)`.

    Raises ValueError naming the accepted processes for an unknown name, and the accepted keyword
    arguments for an unknown one.
    """
    if name not in PROCESSES:
        raise ValueError(f"unknown noise process {name!r}; choose one of {sorted(PROCESSES)}")
    try:
        return PROCESSES[name](**kwargs)
    except TypeError as e:
        import inspect
        factory = PROCESSES[name]
        if dataclasses.is_dataclass(factory):
            accepted = [f.name for f in dataclasses.fields(factory)]
        else:
            accepted = [p for p in inspect.signature(factory).parameters if p != "beta_kwargs"]
            betas_fn = {"vp_linear": linear_betas, "vp_scaled_linear": scaled_linear_betas,
                        "vp_cosine": cosine_betas}[name]
            accepted += [p for p in inspect.signature(betas_fn).parameters if p != "n"]
        raise ValueError(f"bad arguments {sorted(kwargs)} for noise process {name!r} ({e}); "
                         f"accepted: {accepted}") from None
