"""TiF learner (Yue et al., "Few-shot Learner Parameterization by Diffusion Time-steps", CVPR 2024,
arXiv 2403.02649; official code ``yue-zhongqi/tif``): few-shot classification with a pretrained
token-conditioned diffusion model.

Per new class ``c`` a low-rank adapter on the attention projections (q/k/v/out of self- and cross-attention)
and a new token embedding are trained with the DreamBooth loss with prior preservation

    L = E ||target - f_c(x_t, t, [prefix, token_c])||^2 + lambda_prior E ||target' - f_c(x'_t, t, [prefix, token_prior])||^2

(``x``: the class's k support images; ``x'``: samples of the base model for a generic token). A query ``x0`` is
classified by its timestep-weighted denoising error

    score_c(x0) = mean_i w(t_i) ||eps_i - eps_c(sqrt(abar_i) x0 + sqrt(1 - abar_i) eps_i, t_i)||^2,
    y_hat = argmin_c score_c,

on a grid of times ``t_i`` with one noise draw each, the same draws for every class. The TiF weight
(:func:`tif_weights`) emphasises the times at which the finest between-class differences (the gap ``d`` of
:func:`finegrain_gap`) are being erased by the noise while coarser differences survive:

    s(t) = alpha / (2 sqrt(2) sigma),   L_fine = 1 - erf(s d),   L_coarse = sum_{j<500} 1 - erf(s (d + 1 + j)),
    w(t) = L_fine / (L_fine + L_coarse)          (L_coarse carries a 1e-18 floor, as the official code).

Here ``alpha``, ``sigma`` are those of the model's own noise process (the official code takes SD's times but a
linear-beta abar, see docs/tif.md). The model is the token-conditioned UNet of :mod:`jaxdiff.research.c_lora`
(context ``[prefix, token]``).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy.special import erf

from jaxdiff import predictions
from jaxdiff.nn import UNet
from jaxdiff.nn.lora import LORA_PARAMS, LoRASpec, add_lora
from jaxdiff.noise import NoiseProcess
from jaxdiff.research.c_lora import make_context

WEIGHTINGS = ("tif", "uniform", "small_t", "large_t")
ATTENTION_SPEC = LoRASpec(targets=("attention",), rank=4)
"""TiF's placement: every attention projection (q, k, v, out of self- and cross-attention), scale 1."""


# ----------------------------------------------------------------------------------------------------
# the TiF time weighting
# ----------------------------------------------------------------------------------------------------

def finegrain_gap(images: np.ndarray, labels: np.ndarray, percentile: float = 0.1) -> float:
    """The fine-grained gap ``d`` between classes (official ``find_finegrain_edit``).

    ``images``: ``(N, H, W, C)``; ``labels``: ``(N,)`` with at least two classes. At every position ``(u, v)``
    the squared distances ``||x_i[u, v] - x_j[u, v]||^2`` over all ``N x N`` pairs, same-class pairs (and
    ``i = j``) excluded by setting them to +inf (the official code sets them to 100, above every cross-class
    value in SD latents); their ``percentile``-th percentile (in percent) is summed over positions;
    ``d = sqrt(sum)``. Returns a float >= 0.
    """
    x = np.asarray(images, np.float64)
    y = np.asarray(labels)
    if x.ndim != 4:
        raise ValueError(f"finegrain_gap: images must be (N, H, W, C), got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"finegrain_gap: labels must be ({x.shape[0]},), got shape {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("finegrain_gap: needs images of at least two classes")
    if not 0 <= percentile <= 100:
        raise ValueError(f"finegrain_gap: percentile must be in [0, 100], got {percentile}")
    d2 = np.sum(np.square(x[:, None] - x[None, :]), axis=-1)           # (N, N, H, W)
    d2[y[:, None] == y[None, :]] = np.inf
    per_pos = np.percentile(d2.reshape(-1, d2.shape[2] * d2.shape[3]), percentile, axis=0)
    if not np.all(np.isfinite(per_pos)):
        raise ValueError("finegrain_gap: too few cross-class pairs for this percentile")
    return float(np.sqrt(per_pos.sum()))


def tif_weights(d: float, alpha: np.ndarray, sigma: np.ndarray, *, n_coarse: int = 500, coarse_step: float = 1.0,
                floor: float = 1e-18) -> np.ndarray:
    """TiF weight ``w = L_fine / (L_fine + L_coarse)`` (float64, same shape as ``alpha``), in [0, 1].

    ``alpha``, ``sigma``: the process's signal and noise scales at the evaluation times (any equal shapes);
    ``d``: :func:`finegrain_gap`. ``L_fine = 1 - erf(s d)``, ``L_coarse = floor + sum_{j < n_coarse}
    1 - erf(s (d + coarse_step (1 + j)))``, ``s = alpha / (2 sqrt(2) sigma)``: ``1 - erf(s d)`` is twice the
    Bayes error of telling apart two points at distance ``d`` after scaling by ``alpha`` and adding noise of
    std ``sigma``. Computed as ``1 - erf`` in float64 like the official code, so where ``s d`` exceeds about
    5.9 ``L_fine`` is exactly 0 and so is ``w`` (the smallest times).
    """
    a, s_ = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if a.shape != s_.shape:
        raise ValueError(f"tif_weights: alpha {a.shape} and sigma {s_.shape} must have the same shape")
    if not (np.isfinite(d) and d >= 0):
        raise ValueError(f"tif_weights: d must be finite and >= 0, got {d}")
    if np.any(s_ <= 0) or np.any(a < 0):
        raise ValueError("tif_weights: needs sigma > 0 and alpha >= 0 at every time")
    if n_coarse < 1 or coarse_step <= 0:
        raise ValueError(f"tif_weights: needs n_coarse >= 1 and coarse_step > 0, got {n_coarse}, {coarse_step}")
    s = a / (2.0 * np.sqrt(2.0 * s_ ** 2))
    fine = 1.0 - erf(s * d)
    dist = d + coarse_step * (1.0 + np.arange(n_coarse, dtype=np.float64))
    coarse = floor + np.sum(1.0 - erf(s[..., None] * dist), axis=-1)
    return fine / (fine + coarse)


def time_grid(process: NoiseProcess, n: int) -> np.ndarray:
    """``n`` evenly spaced process times (midpoints of ``n`` equal cells of ``[t_min, t_max]``), ``(n,)``."""
    if n < 1:
        raise ValueError(f"time_grid: n must be >= 1, got {n}")
    return process.t_min + (np.arange(n) + 0.5) / n * (process.t_max - process.t_min)


def time_weights(name: str, process: NoiseProcess, t: np.ndarray, *, d: float | None = None,
                 split: float = 0.5) -> np.ndarray:
    """Weights ``(n,)`` over the times ``t`` ``(n,)``: ``"tif"`` (:func:`tif_weights` with gap ``d``),
    ``"uniform"`` (ones), ``"small_t"`` (1 where ``t < split``, else 0) or ``"large_t"`` (1 where
    ``t >= split``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown time weighting {name!r}; choose one of {WEIGHTINGS}")
    t = np.asarray(t, np.float64)
    if name == "tif":
        if d is None:
            raise ValueError("the 'tif' weighting needs the fine-grained gap d (finegrain_gap)")
        return tif_weights(d, np.asarray(process.alpha(t), np.float64), np.asarray(process.sigma(t), np.float64))
    if name == "uniform":
        return np.ones_like(t)
    w = (t < split) if name == "small_t" else (t >= split)
    if not w.any():
        raise ValueError(f"{name}: no grid time on that side of split {split}")
    return w.astype(np.float64)


def classify(errors: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class index (Q,), scores (Q, C))`` from denoising ``errors`` ``(Q, C, n)`` and time
    ``weights`` ``(n,)``: ``score = mean_i w_i errors[..., i]``, prediction = argmin over classes."""
    e, w = np.asarray(errors, np.float64), np.asarray(weights, np.float64)
    if e.ndim != 3 or w.shape != (e.shape[2],):
        raise ValueError(f"classify: errors must be (Q, C, n) and weights (n,), got {e.shape} and {w.shape}")
    scores = np.mean(e * w, axis=-1)
    return np.argmin(scores, axis=1), scores


# ----------------------------------------------------------------------------------------------------
# fitting the per-class adapters
# ----------------------------------------------------------------------------------------------------

def few_shot_support(labels: np.ndarray, classes, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices ``(len(classes) * k,)`` of ``k`` examples per class (class-major), drawn without replacement."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"few-shot k must be an integer >= 1, got {k!r}")
    out = []
    for c in classes:
        pool = np.flatnonzero(np.asarray(labels) == c)
        if len(pool) < k:
            raise ValueError(f"class {c} has {len(pool)} examples, fewer than k = {k}")
        out.append(rng.choice(pool, k, replace=False))
    return np.concatenate(out)


@dataclasses.dataclass
class TiFSettings:
    """How each class is fitted: ``steps`` Adam steps at ``lr`` (global-norm clip 1.0) on batches of
    ``batch`` support images plus ``batch`` prior images, the prior loss weighted by ``prior_weight``;
    adapters ``spec`` (default :data:`ATTENTION_SPEC`)."""

    steps: int = 200
    lr: float = 3e-3
    batch: int = 8
    prior_weight: float = 1.0
    spec: LoRASpec = ATTENTION_SPEC

    def check(self) -> None:
        """Raise ValueError naming a bad field."""
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or self.prior_weight < 0:
            raise ValueError(f"TiFSettings: needs steps, batch >= 1, lr > 0, prior_weight >= 0; got {self}")
        self.spec.check()


@dataclasses.dataclass
class ClassAdapters:
    """The fitted learner: ``classes`` (labels, in order), ``lora`` (the adapter values, a pure dict whose
    leaves have a leading class axis ``C``), ``tokens`` ``(C, D)`` and the ``spec`` they were built with."""

    classes: tuple
    lora: dict
    tokens: jax.Array
    spec: LoRASpec


def adapted_split(base: UNet, spec: LoRASpec, seed: int = 0):
    """``(graphdef, adapter state, frozen state)`` of a copy of ``base`` with fresh adapters ``spec`` (``base``
    itself is not touched)."""
    model = nnx.merge(*nnx.split(base), copy=True)
    add_lora(model, spec, rngs=nnx.Rngs(seed))
    return nnx.split(model, LORA_PARAMS, ...)


_OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "batch"))
def _fit_step(params, opt_state, frozen, prefix, images, prior_images, prior_token, key, i, lr, prior_weight,
              *, graphdef, loss_fn, batch):
    """One step on ``(adapter pure dict, token)``; the class's values are arguments, so every class reuses
    one compiled program."""
    k = jax.random.fold_in(key, i)
    x0 = images[jax.random.choice(jax.random.fold_in(k, 1), images.shape[0], (batch,),
                                  replace=images.shape[0] < batch)]
    xp = prior_images[jax.random.choice(jax.random.fold_in(k, 2), prior_images.shape[0], (batch,),
                                        replace=prior_images.shape[0] < batch)]

    def objective(p):
        net = nnx.merge(graphdef, nnx.State(p[0]), nnx.State(frozen))
        ctx = make_context(prefix, jnp.broadcast_to(p[1], (batch,) + p[1].shape))
        ctx_prior = make_context(prefix, jnp.broadcast_to(prior_token, (batch,) + prior_token.shape))
        inst = jnp.mean(loss_fn(lambda x, t: net(x, t, ctx), x0, jax.random.fold_in(k, 3)))
        prior = jnp.mean(loss_fn(lambda x, t: net(x, t, ctx_prior), xp, jax.random.fold_in(k, 4)))
        return inst + prior_weight * prior

    g = jax.grad(objective)(params)
    updates, opt_state = _OPT.update(g, opt_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state


def fit_class(base: UNet, prefix: jax.Array, images: np.ndarray, prior_images: np.ndarray, prior_token: jax.Array,
              init_token: jax.Array, loss_fn: Callable, settings: TiFSettings, key: jax.Array) -> tuple[dict, jax.Array]:
    """Fit one class's adapters and token; returns ``(adapter pure dict, token (D,))``. ``base`` is not changed.

    ``images``: ``(k, H, W, C)`` the class's support images; ``prior_images``: ``(P, H, W, C)`` samples of the
    base for the generic ``prior_token`` ``(D,)``; ``init_token`` ``(D,)``: the new token's start value;
    ``loss_fn(apply_fn, x0, key) -> (B,)``: the denoising loss (:func:`jaxdiff.research.c_lora.make_loss`).
    """
    settings.check()
    images, prior_images = jnp.asarray(images), jnp.asarray(prior_images)
    if images.ndim != 4 or images.shape[0] < 1 or prior_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"fit_class: images (k >= 1, H, W, C) and prior images (P, H, W, C) of one shape needed, "
                         f"got {images.shape} and {prior_images.shape}")
    if prior_images.shape[0] < 1:
        raise ValueError("fit_class: needs at least one prior image (prior_weight=0 switches the prior loss off)")
    if init_token.shape != prefix.shape or prior_token.shape != prefix.shape:
        raise ValueError(f"fit_class: tokens must be shaped like the prefix {prefix.shape}, got "
                         f"{init_token.shape} and {prior_token.shape}")
    k_init, k_fit = jax.random.split(key)
    graphdef, lora, frozen = adapted_split(base, settings.spec, int(jax.random.randint(k_init, (), 0, 2 ** 30)))
    params = (nnx.to_pure_dict(lora), jnp.asarray(init_token, jnp.float32))
    frozen_values = nnx.to_pure_dict(frozen)
    opt_state = _OPT.init(params)
    for i in range(settings.steps):
        params, opt_state = _fit_step(params, opt_state, frozen_values, prefix, images, prior_images, prior_token,
                                      k_fit, i, settings.lr, settings.prior_weight, graphdef=graphdef,
                                      loss_fn=loss_fn, batch=settings.batch)
    return params


def fit_classes(base: UNet, prefix: jax.Array, images: np.ndarray, labels: np.ndarray, prior_images: np.ndarray,
                prior_token: jax.Array, init_token: jax.Array, loss_fn: Callable, settings: TiFSettings,
                key: jax.Array) -> ClassAdapters:
    """:func:`fit_class` for every class in ``labels`` ``(N,)`` (sorted), on its images among ``images``
    ``(N, H, W, C)``; the class adapters are stacked along a leading axis."""
    labels = np.asarray(labels)
    if np.asarray(images).shape[:1] != labels.shape or labels.ndim != 1:
        raise ValueError(f"fit_classes: images {np.shape(images)} and labels {labels.shape} must match in N")
    classes = tuple(int(c) for c in np.unique(labels))
    if len(classes) < 2:
        raise ValueError(f"fit_classes: a classifier needs at least two classes, got {classes}")
    fitted = [fit_class(base, prefix, np.asarray(images)[labels == c], prior_images, prior_token, init_token,
                        loss_fn, settings, jax.random.fold_in(key, c)) for c in classes]
    lora = jax.tree.map(lambda *v: jnp.stack(v), *[f[0] for f in fitted])
    return ClassAdapters(classes, lora, jnp.stack([f[1] for f in fitted]), settings.spec)


# ----------------------------------------------------------------------------------------------------
# classification by denoising error
# ----------------------------------------------------------------------------------------------------

def denoising_errors(base: UNet, adapters: ClassAdapters, prefix: jax.Array, process: NoiseProcess,
                     queries: np.ndarray, t: np.ndarray, key: jax.Array, *, prediction: str = "v",
                     chunk: int = 512, lora_scale: float = 1.0) -> np.ndarray:
    """Per-pixel mean squared eps error ``(Q, C, n)`` of every class's adapted model on every query
    ``(Q, H, W, C)`` at every time ``t`` ``(n,)``.

    Query ``q`` at time ``t_i`` is noised with ``eps = normal(fold_in(key, q))[i]`` (the same for every class and
    any chunking). The model's ``prediction`` (e.g. ``"v"``) is turned into eps. ``lora_scale`` multiplies the
    adapters' deltas at test time (the official code loads its UNet LoRAs at 0.6). ``chunk``: model
    evaluations per class per call.
    """
    q_all = np.asarray(queries, np.float32)
    t = np.asarray(t, np.float32)
    if q_all.ndim != 4 or t.ndim != 1 or t.size < 1:
        raise ValueError(f"denoising_errors: queries (Q, H, W, C) and times (n,) needed, got {q_all.shape}, {t.shape}")
    n_classes = len(adapters.classes)
    if adapters.tokens.shape != (n_classes,) + prefix.shape:
        raise ValueError(f"denoising_errors: tokens {adapters.tokens.shape} do not match {n_classes} classes "
                         f"of width {prefix.shape}")
    graphdef, _, frozen = adapted_split(base, adapters.spec)
    frozen_values = nnx.to_pure_dict(frozen)
    lora = _scale_lora_b(adapters.lora, lora_scale) if lora_scale != 1.0 else adapters.lora   # delta is linear in B
    per_call = max(1, chunk // t.size)
    n_q = q_all.shape[0]
    pad = (-n_q) % per_call
    q_pad = np.concatenate([q_all, np.zeros((pad,) + q_all.shape[1:], np.float32)]) if pad else q_all
    out = []
    for s in range(0, q_pad.shape[0], per_call):
        idx = jnp.arange(s, s + per_call)
        out.append(np.asarray(_errors_chunk(lora, adapters.tokens, frozen_values, prefix, jnp.asarray(q_pad[s:s + per_call]),
                                            idx, jnp.asarray(t), key, process, graphdef=graphdef, prediction=prediction)))
    return np.concatenate(out, axis=0)[:n_q]


def _scale_lora_b(tree: dict, factor: float) -> dict:
    return {k: _scale_lora_b(v, factor) if isinstance(v, dict) else (v * factor if k == "lora_b" else v)
            for k, v in tree.items()}


@partial(jax.jit, static_argnames=("graphdef", "prediction"))
def _errors_chunk(lora, tokens, frozen, prefix, x0, q_index, t, key, process, *, graphdef, prediction):
    """``(q, C, n)`` errors of a chunk of ``q`` queries; one model call per class on ``q * n`` inputs."""
    q, n = x0.shape[0], t.shape[0]
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (n,) + x0.shape[1:]))(q_index)
    tt = jnp.broadcast_to(t, (q, n)).reshape(-1)
    x0r = jnp.repeat(x0, n, axis=0)
    eps = eps.reshape((q * n,) + x0.shape[1:])
    xt = process.q_sample(x0r, tt, eps)
    model_t = process.model_time(tt)

    def per_class(lora_c, token_c):
        net = nnx.merge(graphdef, nnx.State(lora_c), nnx.State(frozen))
        ctx = make_context(prefix, jnp.broadcast_to(token_c, (q * n,) + token_c.shape))
        pred = net(xt, model_t, ctx)
        eps_hat = predictions.to_x0_eps(pred, prediction, xt, tt, process)[1]
        return jnp.mean(jnp.square(eps_hat - eps), axis=(1, 2, 3)).reshape(q, n)

    err = jax.lax.map(lambda a: per_class(*a), (lora, tokens))        # (C, q, n)
    return jnp.transpose(err, (1, 0, 2))
