"""Exact ground truth for a Gaussian-mixture data distribution under any noise process.

For data x0 ~ sum_k w_k N(mu_k, diag(v_k)) and the marginal q(x_t | x0) = N(alpha x0, sigma^2 I) of a
process in `jaxdiff.noise`, every quantity a diffusion model learns is available in closed form:

* per component, x_t | k ~ N(alpha mu_k, diag(s_k^2)) with s_k^2 = alpha^2 v_k + sigma^2;
* responsibilities r_k(x_t) = softmax_k(log w_k + log N(x_t; alpha mu_k, s_k^2)) (log-sum-exp);
* posterior mean (Tweedie) E[x0 | x_t] = sum_k r_k (mu_k + alpha v_k (x_t - alpha mu_k) / s_k^2);
* score grad log p_t(x_t) = -sum_k r_k (x_t - alpha mu_k) / s_k^2, and eps = -sigma * score.

None of these divide by alpha or sigma, so they are finite at sigma = 0 (t = `process.t_zero`, where
E[x0 | x] = x / alpha and eps = 0) and at alpha = 0 (pure noise).

`GaussianMixture.reference_ode_solution` integrates the probability-flow ODE in the half-logSNR
lambda = logsnr / 2 and the variable w = x / sqrt(alpha^2 + sigma^2) (the state of the equivalent
variance-preserving process). In those variables

    dw/dlambda = alpha_vp sigma_vp^2 sum_k r_k (alpha_vp (v_k - 1) w + mu_k) / s_k^2,
    alpha_vp^2 = sigmoid(2 lambda), sigma_vp^2 = sigmoid(-2 lambda), s_k^2 = alpha_vp^2 v_k + sigma_vp^2,

whose right-hand side is bounded and decays like exp(-2|lambda|) at both ends, so the ODE is smooth
over the whole real lambda line and an endpoint at sigma = 0 (lambda = +inf) or at alpha = 0
(lambda = -inf) is reached by truncating lambda where the remaining change is below 1e-17.
The integrator is classic RK4 on a grid uniform in u = asinh(lambda): steps in lambda are ~uniform
for |lambda| < 1 and grow geometrically in the tails, where the right-hand side vanishes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import predictions
from jaxdiff.noise import NoiseProcess, check_time

Array = jax.Array

__all__ = ["GaussianMixture", "DENOISER_KINDS"]

DENOISER_KINDS = predictions.KINDS   # ("eps", "x0", "v", "score", "flow")

_LOG_2PI = math.log(2 * math.pi)
_WARP = 1.0   # lambda = _WARP * sinh(u / _WARP): the RK4 grid is uniform in u


def _is_concrete_leaf(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _validate(weights, means, variances) -> None:
    w = np.asarray(weights, np.float64)
    m = np.asarray(means, np.float64)
    v = np.asarray(variances, np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must have shape (K,) with K >= 1, got shape {w.shape}")
    k = w.shape[0]
    if m.ndim != 2 or m.shape[0] != k:
        raise ValueError(f"means must have shape (K, D) = ({k}, D) to match weights of shape {w.shape}, "
                         f"got shape {m.shape}")
    if v.shape != m.shape:
        raise ValueError(f"variances must have the shape of means {m.shape} (diagonal variances, (K, D)), "
                         f"got shape {v.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, they sum to {w.sum()!r}")
    if not np.all(np.isfinite(m)):
        raise ValueError("means must be finite")
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"variances must be finite and strictly positive, got minimum {v.min()!r}")


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Diagonal Gaussian mixture p(x0) = sum_k weights[k] N(x0; means[k], diag(variances[k])).

    A frozen dataclass registered as a pytree (all three fields are leaves), so it can be passed
    through `jit`/`vmap`/`grad`. Concrete inputs are validated when *you* construct one: ValueError for
    mismatched shapes, negative (or zero) variances, or weights that do not sum to 1. Pytree
    unflattening skips the check (unlike `register_dataclass`, which re-runs `__init__`), so gradients
    and `tree.map` results, which are not valid mixtures, can still be held in this type.

    Attributes:
      weights: (K,) mixture weights, non-negative, summing to 1.
      means: (K, D) component means.
      variances: (K, D) per-dimension component variances, > 0.
    """

    weights: Array
    means: Array
    variances: Array

    def __post_init__(self):
        leaves = (self.weights, self.means, self.variances)
        if all(_is_concrete_leaf(a) for a in leaves):
            _validate(*leaves)
            dtype = jnp.result_type(float)
            for name, a in zip(("weights", "means", "variances"), leaves):
                if not isinstance(a, (np.ndarray, jax.Array)):
                    object.__setattr__(self, name, jnp.asarray(a, dtype))

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def random(cls, key: Array, num_components: int, dim: int, *, separation: float = 6.0,
               std_range: tuple[float, float] = (0.1, 0.3), mean_scale: float = 1.0,
               weight_spread: float = 0.5) -> "GaussianMixture":
        """A random, well-separated mixture of `num_components` components in `dim` dimensions.

        Means ~ N(0, mean_scale^2 I), then scaled up (if needed) so that every pair of means is at least
        `separation` times the largest component standard deviation apart. Per-dimension standard
        deviations are log-uniform in `std_range`; weights = softmax(weight_spread * N(0, I_K)).
        Built on the host with numpy's generator seeded by the key's data (not traceable; no compilation);
        float64 when x64 is enabled.
        """
        if num_components < 1 or dim < 1:
            raise ValueError(f"num_components and dim must be >= 1, got {num_components}, {dim}")
        lo, hi = std_range
        if not 0 < lo <= hi:
            raise ValueError(f"std_range must satisfy 0 < low <= high, got {std_range}")
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())  # host-side
        means = mean_scale * rng.standard_normal((num_components, dim))
        u = rng.uniform(size=(num_components, dim))
        std = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
        if num_components > 1:
            d = np.linalg.norm(means[:, None] - means[None], axis=-1)
            d_min = d[~np.eye(num_components, dtype=bool)].min()
            need = separation * std.max()
            if d_min < need:
                means = means * (need / max(d_min, 1e-12))
        logits = weight_spread * rng.standard_normal(num_components)
        w = np.exp(logits - logits.max())
        w = w / w.sum()
        dtype = jnp.result_type(float)
        return cls(jnp.asarray(w, dtype), jnp.asarray(means, dtype), jnp.asarray(std ** 2, dtype))

    @classmethod
    def toy_2d(cls) -> "GaussianMixture":
        """A fixed 2-D mixture for plots: 8 anisotropic components on a ring of radius 2 (unequal
        weights, alternating elongation) plus a broad central component."""
        angles = np.arange(8) * (2 * np.pi / 8)
        means = np.concatenate([2.0 * np.stack([np.cos(angles), np.sin(angles)], -1), np.zeros((1, 2))])
        stds = np.array([[0.08, 0.2], [0.2, 0.08]] * 4 + [[0.3, 0.3]])
        w = np.array([2.0, 1.0] * 4 + [2.0])
        dtype = jnp.result_type(float)
        return cls(jnp.asarray(w / w.sum(), dtype), jnp.asarray(means, dtype), jnp.asarray(stds ** 2, dtype))

    # -- data distribution --------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        """K."""
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[1]

    def mean(self) -> Array:
        """Mean of the mixture, (D,)."""
        return self.weights @ self.means

    def covariance(self) -> Array:
        """Covariance of the mixture, (D, D): sum_k w_k (diag(v_k) + mu_k mu_k^T) - m m^T."""
        m = self.mean()
        second = jnp.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return jnp.diag(self.weights @ self.variances) + second - jnp.outer(m, m)

    def sample(self, key: Array, n: int) -> Array:
        """n exact samples of the data distribution, (n, D)."""
        return _sample(self, key, n)

    def log_prob(self, x0: Array) -> Array:
        """Exact data log-density log p(x0); x0 (n, D) (or (n, ...) with D elements) -> (n,)."""
        self._check_x(x0)
        return _log_prob(self, x0)

    # -- marginals of a noise process ---------------------------------------------------------------
    def marginal_log_prob(self, x: Array, t: Array, process: NoiseProcess) -> Array:
        """log p_t(x) of the noised marginal; x (B, D) or (B, ...), t scalar or (B,) -> (B,)."""
        self._check_x(x)
        self._check_t(t, x, process)
        return _predict_all(self, process, x, t)["log_prob"]

    def score(self, x: Array, t: Array, process: NoiseProcess) -> Array:
        """Exact score grad_x log p_t(x); x (B, D) or (B, ...), t scalar or (B,) -> x's shape."""
        return self.prediction(x, t, process, "score")

    def x0_prediction(self, x: Array, t: Array, process: NoiseProcess) -> Array:
        """Posterior mean E[x0 | x_t = x]; x (B, D) or (B, ...), t scalar or (B,) -> x's shape.

        At sigma = 0 this is x / alpha exactly; at alpha = 0 it is the data mean.
        """
        return self.prediction(x, t, process, "x0")

    def eps_prediction(self, x: Array, t: Array, process: NoiseProcess) -> Array:
        """E[eps | x_t = x] = -sigma * score (0 at sigma = 0); x (B, D) or (B, ...), t scalar or (B,)."""
        return self.prediction(x, t, process, "eps")

    def prediction(self, x: Array, t: Array, process: NoiseProcess, kind: str = "eps") -> Array:
        """The exact optimal prediction of `kind` (one of DENOISER_KINDS) at (x, t) -> x's shape.

        x0 = E[x0 | x]; eps = E[eps | x]; v = alpha eps - sigma x0; score = grad log p_t (finite at
        sigma = 0); flow = alpha'(t) x0 + sigma'(t) eps, the flow-matching velocity, which is also the
        probability-flow ODE velocity dx/dt of any process (derivatives by forward-mode autodiff).
        """
        _check_kind(kind)
        self._check_x(x)
        self._check_t(t, x, process)
        return _predict_all(self, process, x, t)[kind]

    def denoiser(self, process: NoiseProcess, kind: str = "eps") -> Callable[[Array, Array], Array]:
        """A pure `f(x, t) -> prediction` of `kind` for `process`: the interface solvers consume.

        x (B, D) or (B, ...) with D elements per example, t scalar or (B,); returns x's shape and dtype.
        Raises ValueError at once for an unknown kind.
        """
        _check_kind(kind)

        def f(x, t):
            return self.prediction(x, t, process, kind)

        return f

    # -- probability-flow ODE -----------------------------------------------------------------------
    def reference_ode_solution(self, process: NoiseProcess, x_T: Array, t_start, t_end, *,
                               num_steps: int = 4096) -> Array:
        """High-accuracy probability-flow ODE solution from x_T at t_start to t_end (either direction).

        x_T (B, D) or (B, ...); t_start, t_end scalars (may be traced). Ends where sigma = 0
        (t = process.t_zero) or alpha = 0 are supported (lambda is truncated where the remaining change
        of the state is below ~1e-17). Classic RK4 with `num_steps` steps uniform in asinh(lambda) on
        w = x / sqrt(alpha^2 + sigma^2) (see the module docstring), compiled with lax.scan.
        Accuracy (tests/test_analytic.py): doubling num_steps from the default 4096 changes the result
        by < 1e-9 relative (measured ~1e-12) in float64 for a 16-D mixture on VP-linear and EDM, from
        t_max to t_min and to t_zero; the error is 4th order in the step (x16 per halving).
        Returns x at t_end, x_T's shape.
        """
        check_time(process, t_start)
        check_time(process, t_end)
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self._check_x(x_T)
        for name, t in (("t_start", t_start), ("t_end", t_end)):
            if jnp.ndim(t) != 0:
                raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(t)}")
        return _ode(self, process, x_T, t_start, t_end, int(num_steps))

    # -- internals ----------------------------------------------------------------------------------
    def _check_x(self, x: Array) -> None:
        shape = jnp.shape(x)
        if len(shape) < 1:
            raise ValueError(f"x must have a batch dimension, got shape {shape}")
        per_example = int(np.prod(shape[1:], dtype=np.int64))
        if per_example != self.dim:
            raise ValueError(f"x of shape {shape} has {per_example} elements per example; "
                             f"the mixture has dimension {self.dim}")

    def _check_t(self, t, x: Array, process: NoiseProcess) -> None:
        check_time(process, t)
        tshape, xshape = jnp.shape(t), jnp.shape(x)
        if not (tshape == () or tshape == xshape[:1]):
            raise ValueError(f"time of shape {tshape} does not match a batch of shape {xshape}: "
                             "expected a scalar or shape (batch,)")


# ----------------------------------------------------------------------------------------------------
# compiled kernels (the mixture and the process are pytree arguments)
# ----------------------------------------------------------------------------------------------------

def _flatten(mix: GaussianMixture, x: Array) -> Array:
    """(B, ...) -> (B, D) in the compute dtype (the promotion of x's and the mixture's dtypes)."""
    x = jnp.asarray(x)
    return x.reshape(x.shape[0], -1).astype(jnp.result_type(x.dtype, mix.means.dtype))


def _restore(out: Array, x: Array) -> Array:
    """(B, D) -> x's shape, in x's dtype when x is floating."""
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else out.dtype
    return out.reshape(x.shape).astype(dtype)


def _component_stats(mix: GaussianMixture, xf: Array, a: Array, s: Array):
    """Log-joint log w_k + log N(x; a mu_k, a^2 v_k + s^2) (B, K), residuals x - a mu_k (B, K, D) and
    component variances s_k^2 = a^2 v_k + s^2 (B, K, D); a, s broadcast against (B, 1, 1)."""
    s2 = a ** 2 * mix.variances + s ** 2
    diff = xf[:, None, :] - a * mix.means
    ll = -0.5 * jnp.sum(diff ** 2 / s2 + jnp.log(s2) + _LOG_2PI, axis=-1)
    return jnp.log(mix.weights) + ll, diff, s2


@functools.partial(jax.jit, static_argnames=("n",))
def _sample(mix: GaussianMixture, key: Array, n: int) -> Array:
    kc, kz = jax.random.split(key)
    comp = jax.random.categorical(kc, jnp.log(mix.weights), shape=(n,))
    z = jax.random.normal(kz, (n, mix.means.shape[1]), mix.means.dtype)
    return mix.means[comp] + jnp.sqrt(mix.variances[comp]) * z


@jax.jit
def _log_prob(mix: GaussianMixture, x: Array) -> Array:
    logits, _, _ = _component_stats(mix, _flatten(mix, x), 1.0, 0.0)
    return jax.nn.logsumexp(logits, axis=-1)


@jax.jit
def _predict_all(mix: GaussianMixture, process: NoiseProcess, x: Array, t: Array) -> dict[str, Array]:
    """x (B, ...), t () or (B,) -> {kind: prediction (x's shape and dtype)} for every DENOISER_KIND,
    plus "log_prob": log p_t(x) (B,). One compiled kernel serves every kind; under an outer jit the
    unused outputs are dead code."""
    xf = _flatten(mix, x)
    t = jnp.broadcast_to(jnp.asarray(t, xf.dtype), xf.shape[:1])
    a = process.alpha(t).astype(xf.dtype)[:, None, None]
    s = process.sigma(t).astype(xf.dtype)[:, None, None]
    logits, diff, s2 = _component_stats(mix, xf, a, s)
    r = jax.nn.softmax(logits, axis=-1)

    def mix_mean(per_component):            # sum_k r_k * (B, K, D) -> (B, D)
        return jnp.einsum("bk,bkd->bd", r, per_component)

    x0 = mix_mean(mix.means + a * mix.variances * diff / s2)
    eps = mix_mean(s * diff / s2)
    _, da = jax.jvp(process.alpha, (t,), (jnp.ones_like(t),))
    _, ds = jax.jvp(process.sigma, (t,), (jnp.ones_like(t),))
    out = {
        "x0": x0,
        "eps": eps,
        "score": -mix_mean(diff / s2),
        "v": a[:, :, 0] * eps - s[:, :, 0] * x0,
        "flow": da.astype(xf.dtype)[:, None] * x0 + ds.astype(xf.dtype)[:, None] * eps,
    }
    out = {k: _restore(v, x) for k, v in out.items()}
    out["log_prob"] = jax.nn.logsumexp(logits, axis=-1)
    return out


def _gm_flatten_with_keys(g: GaussianMixture):
    names = ("weights", "means", "variances")
    return tuple((jax.tree_util.GetAttrKey(n), getattr(g, n)) for n in names), None


def _gm_unflatten(_aux, leaves) -> GaussianMixture:
    g = object.__new__(GaussianMixture)          # no __post_init__: leaves may be tracers, grads, ...
    for name, leaf in zip(("weights", "means", "variances"), leaves):
        object.__setattr__(g, name, leaf)
    return g


jax.tree_util.register_pytree_with_keys(
    GaussianMixture, _gm_flatten_with_keys, _gm_unflatten,
    flatten_func=lambda g: ((g.weights, g.means, g.variances), None))


def _check_kind(kind: str) -> None:
    predictions.check_kind(kind)


def _lambda_and_norm(process: NoiseProcess, t, dtype):
    """Half-logSNR lambda(t) (+-inf at sigma = 0 / alpha = 0) and sqrt(alpha^2 + sigma^2) at scalar t."""
    t = jnp.asarray(t, dtype)
    la, ls = process.log_alpha(t).astype(dtype), process.log_sigma(t).astype(dtype)
    return la - ls, jnp.exp(0.5 * jnp.logaddexp(2 * la, 2 * ls))


def _lambda_bounds(mix: GaussianMixture):
    """Truncation of lambda: beyond these the remaining PF-ODE change of w is below ~e^-40 relative.

    For lambda -> +inf the right-hand side decays like e^(-2 lambda) / v_min, for lambda -> -inf like
    e^lambda * (|mu| + sqrt(v) + 1)."""
    v_min = jnp.min(mix.variances)
    scale = jnp.max(jnp.abs(mix.means)) + jnp.sqrt(jnp.max(mix.variances)) + 1.0
    hi = 0.5 * jnp.log(jnp.maximum(1.0, 1.0 / v_min)) + 20.0
    lo = -jnp.log(scale) - 40.0
    return lo, hi


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _ode(mix: GaussianMixture, process: NoiseProcess, x: Array, t_start, t_end, num_steps: int) -> Array:
    xf = _flatten(mix, x)
    lam_s, norm_s = _lambda_and_norm(process, t_start, xf.dtype)
    lam_e, norm_e = _lambda_and_norm(process, t_end, xf.dtype)
    lo, hi = _lambda_bounds(mix)
    lam_s, lam_e = jnp.clip(lam_s, lo, hi), jnp.clip(lam_e, lo, hi)
    return _restore(_integrate_pf_ode(mix, xf / norm_s, lam_s, lam_e, num_steps) * norm_e, x)


def _pf_rhs(mix: GaussianMixture, w: Array, lam: Array) -> Array:
    """dw/dlambda of the PF-ODE in the VP-normalised state w (B, D) at half-logSNR lam (scalar)."""
    a = jnp.exp(-0.5 * jax.nn.softplus(-2 * lam))       # alpha_vp
    s2 = jax.nn.sigmoid(-2 * lam)                       # sigma_vp^2
    var = a ** 2 * mix.variances + s2                   # (K, D)
    diff = w[:, None, :] - a * mix.means                # (B, K, D)
    logits = jnp.log(mix.weights) - 0.5 * jnp.sum(diff ** 2 / var + jnp.log(var), axis=-1)
    r = jax.nn.softmax(logits, axis=-1)
    comp = (a * (mix.variances - 1.0) * w[:, None, :] + mix.means) / var
    return a * s2 * jnp.einsum("bk,bkd->bd", r, comp)


def _integrate_pf_ode(mix: GaussianMixture, w: Array, lam_s: Array, lam_e: Array, num_steps: int) -> Array:
    """Classic RK4 for dw/du = lambda'(u) rhs(w, lambda(u)) on a uniform grid in u, lambda = c sinh(u / c).

    The warp keeps the step in lambda ~ uniform over |lambda| < c and lets it grow in proportion to
    |lambda| beyond, where the right-hand side decays like exp(-2 |lambda|). (c = 1 measured best among
    1..12 on 16-D mixtures: ~30x smaller error than a uniform lambda grid at the same step count.)
    """
    c = _WARP
    u_s, u_e = c * jnp.arcsinh(lam_s / c), c * jnp.arcsinh(lam_e / c)
    h = (u_e - u_s) / num_steps

    def f(w, u):
        return jnp.cosh(u / c) * _pf_rhs(mix, w, c * jnp.sinh(u / c))

    def step(w, i):
        u = u_s + i * h
        k1 = f(w, u)
        k2 = f(w + 0.5 * h * k1, u + 0.5 * h)
        k3 = f(w + 0.5 * h * k2, u + 0.5 * h)
        k4 = f(w + h * k3, u + h)
        return w + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4), None

    w, _ = jax.lax.scan(step, w, jnp.arange(num_steps, dtype=w.dtype))
    return w
