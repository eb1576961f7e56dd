"""The 2-D version of SADM: a 25-mode grid of Gaussians, an MLP denoiser and an MLP structure
discriminator, trained by the same step as the image task (:func:`.step.make_sadm_step`), sampled with
the library's solvers, and scored by mode coverage, high-quality-sample rate, MMD, Frechet distance and
k-NN precision / recall. Pure JAX plus Flax NNX modules; one training run is one jitted ``lax.scan``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdiff import metrics
from jaxdiff.analytic import GaussianMixture
from jaxdiff.nn.embeddings import timestep_embedding
from jaxdiff.nn.layers import Dense
from jaxdiff.noise import make_process
from jaxdiff.research.sadm.step import SADMTrainState, create_sadm_state, make_sadm_step
from jaxdiff.sampling import make_denoiser, time_grid
from jaxdiff.solvers import sample


def grid_mixture(modes_per_side: int = 5, spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """The ``modes_per_side**2``-mode grid: equal weights, means ``spacing * (i, j)`` centred on 0, isotropic
    standard deviation ``std``. Default: 25 modes on ``{-2, ..., 2}^2``, std 0.05."""
    if modes_per_side < 1 or spacing <= 0 or std <= 0:
        raise ValueError(f"grid_mixture needs modes_per_side >= 1, spacing > 0 and std > 0, got "
                         f"{modes_per_side}, {spacing}, {std}")
    axis = spacing * (np.arange(modes_per_side) - (modes_per_side - 1) / 2)
    means = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    k = len(means)
    return GaussianMixture(jnp.full((k,), 1.0 / k), jnp.asarray(means, jnp.float32),
                           jnp.full((k, 2), std ** 2, jnp.float32))


class MLPDenoiser(nnx.Module):
    """``(x (B, D), model_time (B,)) -> (B, D)``: SiLU MLP on ``[x, sinusoidal(model_time)]``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32, *, rngs: nnx.Rngs):
        self.time_dim = time_dim
        widths = [dim + time_dim] + [hidden] * depth
        self.layers = nnx.List([Dense(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = Dense(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array, model_time: jax.Array, labels=None) -> jax.Array:
        h = jnp.concatenate([x, timestep_embedding(model_time, self.time_dim)], axis=-1)
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        return self.out(h)


class MLPEncoder(nnx.Module):
    """The 2-D structure discriminator's encoder: ``(B, D) -> (B, features)``, LeakyReLU MLP."""

    def __init__(self, dim: int = 2, hidden: int = 64, features: int = 16, *, rngs: nnx.Rngs):
        self.l1, self.l2 = Dense(dim, hidden, rngs=rngs), Dense(hidden, hidden, rngs=rngs)
        self.l3 = Dense(hidden, features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.l1(x), 0.2)
        return self.l3(jax.nn.leaky_relu(self.l2(h), 0.2))


def _pure(module: nnx.Module) -> tuple[Callable, Any]:
    graphdef, params = nnx.split(module, nnx.Param)
    return lambda p, *a: nnx.merge(graphdef, nnx.State(p))(*a), nnx.to_pure_dict(params)


@dataclasses.dataclass(frozen=True)
class MixtureSetup:
    """Everything a 2-D run depends on besides its seed. ``weight = 0`` is plain denoising (DSM only)."""

    steps: int = 4000
    batch_size: int = 256
    weight: float = 0.0
    temperature: float = 0.1
    lr: float = 2e-3
    disc_lr: float = 2e-3
    hidden: int = 128
    depth: int = 3
    process: str = "vp_cosine"
    target: str = "v"
    ema_decay: float = 0.995
    chunk: int = 500           # steps per compiled scan


def mixture_model(setup: MixtureSetup, seed: int):
    """``(apply, encode, params, disc_params)`` of a fresh denoiser and encoder from ``seed``.
    ``apply(params, x, model_time, labels=None, dropout_key=None)``; ``encode(disc_params, x) -> (B, 16)``."""
    net_apply, params = _pure(MLPDenoiser(hidden=setup.hidden, depth=setup.depth, rngs=nnx.Rngs(seed)))
    encode, disc_params = _pure(MLPEncoder(rngs=nnx.Rngs(seed + 1)))

    def apply(p, x, model_time, labels=None, dropout_key=None):
        return net_apply(p, x, model_time)
    return apply, encode, params, disc_params


def train_mixture(setup: MixtureSetup, seed: int, mix: GaussianMixture | None = None):
    """Train one 2-D model. Returns ``(state, apply, info)``; ``info``: ``seconds`` (training wall time after
    the first compiled chunk), ``dsm`` / ``structure`` (last step's values)."""
    if setup.steps % setup.chunk:
        raise ValueError(f"steps ({setup.steps}) must be a multiple of chunk ({setup.chunk})")
    mix = grid_mixture() if mix is None else mix
    process = make_process(setup.process)
    apply, encode, params, disc_params = mixture_model(setup, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, setup.lr, 100, setup.steps, setup.lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    disc_optimizer = optax.adam(setup.disc_lr, b1=0.5, b2=0.9)
    step = make_sadm_step(apply, encode, process, optimizer, disc_optimizer, schedule, target=setup.target,
                          weight=setup.weight, temperature=setup.temperature, ema_decay=setup.ema_decay)
    data_key = jax.random.fold_in(jax.random.key(seed), 1)

    @jax.jit
    def run_chunk(state: SADMTrainState):
        def body(s, _):
            x0 = mix.sample(jax.random.fold_in(data_key, s.step), setup.batch_size).astype(jnp.float32)
            return step(s, {"image": x0})
        return jax.lax.scan(body, state, None, length=setup.chunk)

    state = create_sadm_state(params, disc_params, optimizer, disc_optimizer, seed)
    state, m = run_chunk(state)                        # compiles
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(setup.steps // setup.chunk - 1):
        state, m = run_chunk(state)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0) * setup.steps / max(setup.steps - setup.chunk, 1)
    if int(state.bad_step) >= 0:
        raise FloatingPointError(f"non-finite loss at step {int(state.bad_step)} (seed {seed}, {setup})")
    return state, apply, {"seconds": seconds, "dsm": float(m["dsm"][-1]), "structure": float(m["structure"][-1])}


def sample_mixture(apply: Callable, params: Any, setup: MixtureSetup, num: int, seed: int, *,
                   solver: str = "dpm_solver++", steps: int = 20, grid: str = "uniform_logsnr") -> np.ndarray:
    """``(num, 2)`` samples of a trained 2-D model with a library solver."""
    process = make_process(setup.process)
    x_T = process.prior_sample(jax.random.key(seed), (num, 2))
    times = jnp.asarray(time_grid(process, grid, steps, solver), jnp.float32)
    out = jax.jit(lambda p, x: sample(make_denoiser(apply, p, process), process, x, times, solver=solver,
                                      prediction=setup.target, key=jax.random.key(seed + 1)))(params, x_T)
    return np.asarray(out, np.float64)


def rbf_mmd2(x: np.ndarray, y: np.ndarray, bandwidths=(0.05, 0.2, 1.0)) -> float:
    """Unbiased squared MMD of ``x (N, D)`` and ``y (M, D)`` under a sum of Gaussian kernels
    ``exp(-|a - b|^2 / (2 h^2))`` over ``bandwidths``."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def k(a, b):
        d2 = jnp.sum(jnp.square(a[:, None] - b[None]), -1)
        return sum(jnp.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    xx = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    yy = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2 * jnp.mean(kxy))


def mixture_metrics(samples: np.ndarray, mix: GaussianMixture, real: np.ndarray, *, std: float = 0.05,
                    min_share: float = 0.01, k: int = 3) -> dict:
    """Scores of ``samples (N, 2)`` against the grid ``mix`` and ``real (M, 2)`` samples of it.

    ``hq_rate``: share of samples within ``3 std`` of their nearest mode; ``coverage``: share of modes that
    hold at least ``min_share * N`` high-quality samples; ``mmd2``: :func:`rbf_mmd2`; ``frechet``: Frechet
    distance of the 2-D Gaussians fitted to both sets; ``precision`` / ``recall``: k-NN (``k``), as
    ``jaxdiff.metrics.precision_recall``."""
    s = np.asarray(samples, np.float64)
    if s.ndim != 2 or s.shape[1] != 2 or not np.all(np.isfinite(s)):
        raise ValueError(f"samples must be finite (N, 2), got shape {s.shape}")
    means = np.asarray(mix.means, np.float64)
    d = np.linalg.norm(s[:, None] - means[None], axis=-1)
    nearest, dist = d.argmin(1), d.min(1)
    hq = dist <= 3 * std
    counts = np.bincount(nearest[hq], minlength=len(means))
    r = np.asarray(real, np.float64)
    fd = metrics.frechet_distance(r.mean(0), np.cov(r, rowvar=False), s.mean(0), np.cov(s, rowvar=False))
    precision, recall = metrics.precision_recall(r, s, k=k)
    return {"coverage": float(np.mean(counts >= min_share * len(s))), "hq_rate": float(hq.mean()),
            "mmd2": rbf_mmd2(r, s), "frechet": float(fd), "precision": float(precision), "recall": float(recall)}
