"""Distribution-guided debiasing in h-space (Parihar et al., "Balancing Act", CVPR 2024).

A trained diffusion model reproduces the attribute imbalance of its training data. Instead of steering
each sample to a class, *distribution guidance* steers a whole batch so that the batch's predicted attribute
distribution matches a reference ``p_ref``. It acts on h-space, the UNet bottleneck (``UNet(...,
mid_hook=..., return_features=True)``): at every sampling step, before the decoder runs,

    p_i   = softmax(ADP_k(h_i) / temperature)             per-step linear head k (the attribute distribution
    p_hat = mean_i p_i                                     predictor, trained on h of generated samples with
    L     = sum_a (p_hat_a - p_ref_a)^2 / p_ref_a          pseudo-labels from an attribute classifier)
    h    <- h - scale * w_k * dL/dh,   w_k = beta(t_k)^beta_power

(the official code: temperature 8, chi-square, ``h.detach() - 1.5 * beta_t**0.05 * 300 * scale * grad``, i.e.
its 1.5 * 300 * scale is ``scale`` here). *Sample guidance*, the paper's comparison, uses the per-sample
loss ``-sum_i p_i[target_i]`` with each sample's target attribute assigned in proportion to ``p_ref``.

Pieces (each works with any jaxdiff solver and grid: the guidance lives in the network's ``apply``, the
solvers are untouched):

* :func:`record_features` runs an unguided :class:`~jaxdiff.sampling.Sampler` and returns the images
  with the h-space features of every step; :func:`digit_class_labels` / :func:`stroke_thickness_labels`
  give pseudo-labels; :func:`train_adp` fits the per-step heads (:class:`ADP`).
* :func:`reference_distribution` checks a target (sums to one, names only the ADP's attributes).
* :class:`HGuidance` (static settings) with :func:`guided_sampling_model` gives a
  :class:`~jaxdiff.sampling.SamplingModel` whose ``params`` carry the ADP, target and scale
  (:func:`guidance_params`), so one compiled ``Sampler`` serves every target and scale.
* :func:`guided_denoiser` does the same for any ``f(x, t, mid_hook)`` denoiser (e.g. an analytic one).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback

from jaxdiff.data.captions import measure_attributes
from jaxdiff.extractors import digits_classifier
from jaxdiff.metrics.features import extract
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel

Array = jax.Array
KINDS = ("distribution", "sample")


# ----------------------------------------------------------------------------------------------------
# the attribute distribution predictor
# ----------------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ADP:
    """Attribute distribution predictor: one linear head per sampling step on flattened h-space features.

    Attributes:
      kernels: ``(K, D, A)``; ``biases``: ``(K, A)``; head ``k`` belongs to step ``k`` of the grid it was
        trained on (noisiest first).
      times: ``(K,)`` the process times of those steps (a head is looked up by the nearest time).
      attributes: the ``A`` attribute names (static).
    """

    kernels: Array
    biases: Array
    times: Array
    attributes: tuple = dataclasses.field(metadata=dict(static=True), default=())

    @property
    def num_heads(self) -> int:
        """K."""
        return self.kernels.shape[0]

    @property
    def feature_dim(self) -> int:
        """D, the flattened h-space size the heads read."""
        return self.kernels.shape[1]

    def logits(self, h: Array, k) -> Array:
        """``h`` ``(B, ...)`` with ``D`` elements per sample, head index ``k`` -> ``(B, A)`` logits."""
        flat = h.reshape(h.shape[0], -1)
        if flat.shape[1] != self.feature_dim:
            raise ValueError(f"the ADP reads h-space features of {self.feature_dim} elements, got {flat.shape[1]} "
                             f"(shape {h.shape[1:]}): it was trained for another model or resolution")
        return flat @ self.kernels[k].astype(flat.dtype) + self.biases[k].astype(flat.dtype)

    def head_index(self, key_times: Array, t) -> Array:
        """Index of the head whose key time (``key_times`` ``(K,)``) is nearest to the scalar ``t``."""
        return jnp.argmin(jnp.abs(key_times - t))


def train_adp(features: Array, labels: np.ndarray, times: Array, attributes: Sequence[str], *,
              steps: int = 500, learning_rate: float = 1e-2, weight_decay: float = 1e-3,
              seed: int = 0) -> ADP:
    """Fit the per-step heads by softmax regression (full batch, AdamW; all heads at once with vmap).

    Args:
      features: ``(K, N, ...)`` h-space features of ``N`` samples at each of ``K`` steps
        (:func:`record_features`).
      labels: ``(N,)`` int pseudo-labels in ``[0, A)``; ``times``: ``(K,)`` process times of the steps.
      attributes: the ``A`` attribute names, in label order.
    Features are standardized per head and the scaling folded back into the kernels, so the heads read
    raw h.
    """
    attributes = tuple(str(a) for a in attributes)
    f = np.asarray(features, np.float32)
    f = f.reshape(f.shape[0], f.shape[1], -1)
    labels = np.asarray(labels)
    times = np.asarray(times, np.float64)
    k, n, d = f.shape
    a = len(attributes)
    if a < 2 or len(set(attributes)) != a:
        raise ValueError(f"need at least two distinct attribute names, got {attributes}")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be ints of shape ({n},), got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= a:
        raise ValueError(f"labels must lie in [0, {a}) for attributes {attributes}")
    if times.shape != (k,):
        raise ValueError(f"times must have shape ({k},) (one per step of features), got {times.shape}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mean, std = f.mean(1, keepdims=True), f.std(1, keepdims=True) + 1e-6
    z = jnp.asarray((f - mean) / std)
    onehot = jax.nn.one_hot(labels, a)
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(p, zk):
        return optax.softmax_cross_entropy(zk @ p["w"] + p["b"], onehot).mean()

    def fit(zk):
        p = {"w": jnp.zeros((d, a)), "b": jnp.zeros((a,))}

        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p, zk)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
        return p

    p = jax.jit(jax.vmap(fit))(z)
    w = p["w"] / std.reshape(k, d, 1)                        # logits = ((h - mean) / std) @ w + b
    b = p["b"] - jnp.einsum("kd,kda->ka", jnp.asarray(mean[:, 0]), w)
    return ADP(kernels=w.astype(jnp.float32), biases=b.astype(jnp.float32),
               times=jnp.asarray(times, jnp.float32), attributes=attributes)


def adp_accuracy(adp: ADP, features: Array, labels: np.ndarray) -> np.ndarray:
    """Per-head accuracy ``(K,)`` of ``adp`` on ``features`` ``(K, N, ...)`` with labels ``(N,)``."""
    f = jnp.asarray(features, jnp.float32)
    pred = jax.vmap(lambda fk, k: adp.logits(fk, k).argmax(-1))(f, jnp.arange(f.shape[0]))
    return np.asarray((pred == jnp.asarray(labels)[None]).mean(1))


# ----------------------------------------------------------------------------------------------------
# pseudo-labels
# ----------------------------------------------------------------------------------------------------

def digit_class_labels(images: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels of digit samples from the shipped classifier (``jaxdiff.extractors``), restricted to
    ``classes``: images ``(N, r, r, 1)`` in [-1, 1] -> ``(labels (N,) index into classes, confidence (N,)``
    the classifier's softmax mass on the chosen class)."""
    classes = [int(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) > 9:
        raise ValueError(f"classes must be at least two distinct digits in [0, 9], got {classes}")
    images = np.asarray(images, np.float32)
    _, logits = extract(digits_classifier(images.shape[1]), images, 250)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
    sub = probs[:, classes]
    return sub.argmax(-1).astype(np.int32), sub.max(-1)


def stroke_thickness_labels(images: np.ndarray, threshold: float) -> np.ndarray:
    """Pseudo-labels thin (0) / thick (1) of images ``(N, H, W, 1)`` in [-1, 1] from the measured stroke
    thickness (``jaxdiff.data.captions.measure_attributes``) against ``threshold`` -> ``(N,)`` int32."""
    x = (np.clip(np.asarray(images, np.float64), -1, 1) + 1) / 2
    return (measure_attributes(x)["thickness"] > threshold).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# the guidance
# ----------------------------------------------------------------------------------------------------

def reference_distribution(attributes: Sequence[str], reference: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    """``(A,)`` float64 target over ``attributes`` from ``{name: probability}`` (every attribute named once)
    or a sequence in attribute order. ValueError for unknown or missing names, a wrong length, entries
    that are not positive (chi-square divides by them) or that do not sum to one."""
    attributes = tuple(attributes)
    if isinstance(reference, Mapping):
        unknown = sorted(set(map(str, reference)) - set(attributes))
        if unknown:
            raise ValueError(f"reference distribution names unknown attributes {unknown}; the ADP knows {attributes}")
        missing = [a for a in attributes if a not in reference]
        if missing:
            raise ValueError(f"reference distribution gives no probability for attributes {missing}")
        p = np.asarray([float(reference[a]) for a in attributes], np.float64)
    else:
        p = np.asarray(reference, np.float64)
        if p.shape != (len(attributes),):
            raise ValueError(f"reference distribution must have {len(attributes)} entries (attributes "
                             f"{attributes}), got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"reference probabilities must be finite and > 0, got {p.tolist()}")
    if abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f"reference distribution must sum to one, sums to {p.sum():.6g} ({p.tolist()})")
    return p


def quota_targets(p_ref: Array, batch: int) -> Array:
    """Per-sample target attributes ``(batch,)`` in proportion to ``p_ref`` ``(A,)`` (sample guidance):
    sample ``i`` gets the attribute whose cumulative share covers ``(i + 0.5) / batch``."""
    u = (jnp.arange(batch) + 0.5) / batch
    return jnp.minimum(jnp.searchsorted(jnp.cumsum(p_ref), u), p_ref.shape[0] - 1)


def guidance_loss(adp: ADP, k, h: Array, p_ref: Array, kind: str = "distribution",
                  temperature: float = 8.0) -> Array:
    """Scalar loss of h-space batch ``h`` ``(B, ...)`` under head ``k``: the chi-square between the batch
    mean of ``softmax(logits / temperature)`` and ``p_ref`` (``"distribution"``), or minus the summed
    probability of each sample's quota target (``"sample"``)."""
    probs = jax.nn.softmax(adp.logits(h, k) / temperature, -1)
    p_ref = p_ref.astype(probs.dtype)
    if kind == "distribution":
        p_hat = probs.mean(0)
        return jnp.sum((p_hat - p_ref) ** 2 / p_ref)
    if kind == "sample":
        targets = quota_targets(p_ref, h.shape[0])
        return -jnp.sum(jnp.take_along_axis(probs, targets[:, None], 1))
    raise ValueError(f"unknown guidance kind {kind!r}; choose one of {KINDS}")


@dataclasses.dataclass(frozen=True)
class HGuidance:
    """Static settings of h-space guidance: ``kind`` (``KINDS``), softmax ``temperature`` (official 8),
    ``beta_power`` (step weight ``beta(t)^beta_power``, official 0.05; 0: constant), ``skip_first``
    (heads, noisiest first, left unguided; the official runs skip the first step)."""

    kind: str = "distribution"
    temperature: float = 8.0
    beta_power: float = 0.05
    skip_first: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown guidance kind {self.kind!r}; choose one of {KINDS}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.beta_power < 0 or self.skip_first < 0:
            raise ValueError(f"beta_power and skip_first must be >= 0, got {self.beta_power}, {self.skip_first}")

    def edit(self, h: Array, t, gp: Mapping[str, Any]) -> Array:
        """One guidance step on h-space ``h`` ``(B, ...)`` at the scalar key time ``t`` with the dynamic
        parameters ``gp`` (:func:`guidance_params`) -> ``h`` of the same shape."""
        adp = gp["adp"]
        k = adp.head_index(gp["key_times"], t)
        grad = jax.grad(lambda hh: guidance_loss(adp, k, hh, gp["p_ref"], self.kind, self.temperature))(h)
        step = jnp.where(k >= self.skip_first, gp["scale"] * gp["weights"][k], 0.0)
        return h - step.astype(h.dtype) * grad


def step_weights(process, times: Array, beta_power: float, train_steps: int = 1000) -> np.ndarray:
    """``(K,)`` weights ``beta(t)^beta_power`` at process ``times``, with ``beta(t) = 1 - alpha(t)^2 /
    alpha(t - dt)^2`` the one-step noise increment of a ``train_steps``-step chain over the process's time
    range. ``beta_power = 0``: ones. ValueError for a process whose alpha is constant (VE, EDM)."""
    times = np.asarray(times, np.float64)
    if beta_power == 0:
        return np.ones_like(times)
    dt = (float(process.t_max) - float(process.t_min)) / train_steps
    la = np.asarray(process.log_alpha(jnp.asarray(times)), np.float64)
    la_prev = np.asarray(process.log_alpha(jnp.asarray(np.maximum(times - dt, process.t_min))), np.float64)
    beta = -np.expm1(2 * (la - la_prev))
    if not np.all(beta > 0):
        raise ValueError(f"beta_power > 0 needs a process whose alpha decreases ({type(process).__name__} has "
                         "constant alpha): use HGuidance(beta_power=0)")
    return np.clip(beta, 1e-12, 1.0) ** beta_power


def guidance_params(adp: ADP, reference, scale: float, *, process=None, key_times=None,
                    beta_power: float = 0.05) -> dict:
    """The dynamic guidance parameters (a pytree; change them without recompiling): ``adp``, ``p_ref``
    (checked by :func:`reference_distribution`), ``scale``, the per-head ``weights`` and ``key_times``,
    the times the hook sees (default: the model times of ``adp.times`` under ``process``, or ``adp.times``
    without a process)."""
    p_ref = reference_distribution(adp.attributes, reference)
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be finite and >= 0, got {scale}")
    if key_times is None:
        key_times = adp.times if process is None else process.model_time(jnp.asarray(adp.times))
    weights = (np.ones(adp.num_heads) if process is None
               else step_weights(process, np.asarray(adp.times), beta_power))
    return {"adp": adp, "p_ref": jnp.asarray(p_ref, jnp.float32), "scale": jnp.asarray(scale, jnp.float32),
            "weights": jnp.asarray(weights, jnp.float32), "key_times": jnp.asarray(key_times, jnp.float32)}


def guided_denoiser(features_denoiser: Callable[..., Array], guidance: HGuidance, gp: Mapping[str, Any]):
    """``f(x, t)`` from ``features_denoiser(x, t, mid_hook)`` (which calls ``mid_hook(h) -> h`` on its
    h-space) with ``guidance`` applied at the key time ``t[0]`` (the solvers' ``t`` is one time per batch)."""
    def f(x, t):
        key = jnp.reshape(jnp.asarray(t), (-1,))[0]
        return features_denoiser(x, t, lambda h: guidance.edit(h, key, gp))
    return f


def _check_hookable(model: SamplingModel) -> None:
    try:
        params = inspect.signature(model.apply).parameters
    except (TypeError, ValueError):
        return
    if "mid_hook" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError("this model's apply takes no mid_hook= (h-space access): build it with "
                         "jaxdiff.nn.functional.make_apply on a jaxdiff UNet")


def feature_shape(model: SamplingModel) -> tuple:
    """``(h, w, c)`` of ``model``'s h-space (traced shapes only; nothing runs)."""
    _check_hookable(model)
    x = jax.ShapeDtypeStruct((1,) + tuple(model.shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    labels = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    _, h = jax.eval_shape(lambda p, x, t, l: model.apply(p, x, t, l, return_features=True), model.params, x, t, labels)
    return tuple(h.shape[1:])


def guided_sampling_model(model: SamplingModel, guidance: HGuidance, adp: ADP, reference, scale: float) -> SamplingModel:
    """``model`` with ``guidance`` in its ``apply``; its ``params`` are ``{"net": model.params, "guide":
    guidance_params(...)}``, so ``Sampler(guided)(params_with_another_target_or_scale, ...)`` reuses the
    program. ValueError when the ADP's feature size is not this model's h-space or the reference is bad."""
    shape = feature_shape(model)
    if int(np.prod(shape)) != adp.feature_dim:
        raise ValueError(f"the ADP reads {adp.feature_dim} h-space features but this model's h-space is {shape} "
                         f"({int(np.prod(shape))}): it was trained for another model or resolution")
    if model.context_shape is not None or model.decode is not None:
        raise ValueError("h-space guidance supports pixel models with labels or none (no context, no latent decode)")
    gp = guidance_params(adp, reference, scale, process=model.process, beta_power=guidance.beta_power)
    net_apply = model.apply

    def apply(params, x, model_time, labels=None):
        key = jnp.reshape(jnp.asarray(model_time), (-1,))[0]
        return net_apply(params["net"], x, model_time, labels,
                         mid_hook=lambda h: guidance.edit(h, key, params["guide"]))

    return dataclasses.replace(model, apply=apply, params={"net": model.params, "guide": gp})


def with_guidance(guided: SamplingModel, reference, scale: float) -> dict:
    """``guided.params`` with another ``reference`` / ``scale`` (same ADP): pass it to the same Sampler."""
    gp = guided.params["guide"]
    new = guidance_params(gp["adp"], reference, scale, key_times=gp["key_times"])
    new["weights"] = gp["weights"]
    return {"net": guided.params["net"], "guide": new}


# ----------------------------------------------------------------------------------------------------
# features along the sampling trajectory
# ----------------------------------------------------------------------------------------------------

def record_features(model: SamplingModel, settings: SamplerSettings, num: int, seed: int, batch: int,
                    labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``num`` images unguided and record h at every model evaluation (a host callback in the hook).

    Returns ``(images (num, H, W, C), features (K, num, h, w, c), times (K,))`` with the ``K`` evaluation
    times as process times, noisiest first. The solver must evaluate the model at grid points (DDIM,
    multistep DPM-Solver, UniPC, ...); ValueError otherwise.
    """
    shape = feature_shape(model)
    store: dict[float, list] = {}

    def record(mt, h):
        store.setdefault(round(float(np.asarray(mt).reshape(-1)[0]), 4), []).append(np.asarray(h))

    net_apply = model.apply

    def apply(params, x, model_time, labels=None):
        def hook(h):
            io_callback(record, None, model_time, h, ordered=True)
            return h
        return net_apply(params, x, model_time, labels, mid_hook=hook)

    sampler = Sampler(dataclasses.replace(model, apply=apply), settings)
    images = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        chunk = None if labels is None else labels[start:start + n]
        images.append(sampler(model.params, chunk, jax.random.key(seed), num=n, offset=start))
    jax.effects_barrier()
    grid = np.asarray(sampler.grid, np.float64)
    grid_keys = np.round(np.asarray(model.process.model_time(jnp.asarray(grid)), np.float64), 4)
    keys = sorted(store, key=lambda k: -k)
    times = []
    for k in keys:
        j = np.flatnonzero(np.abs(grid_keys - k) < 1e-3)
        if len(j) == 0:
            raise ValueError(f"{settings.solver} evaluates the model off the grid (model time {k}): record features "
                             "with a solver that evaluates at grid points (ddim, dpm_solver++, unipc)")
        times.append(grid[j[0]])
    feats = np.stack([np.concatenate(store[k])[:num] for k in keys]).reshape((len(keys), num) + shape)
    return np.concatenate(images), feats, np.asarray(times)
