"""SeedSelect (Samuel et al., AAAI 2024): optimize the initial noise x_T of a frozen diffusion model by
gradient descent through the whole compiled sampler, so that the sample matches a few reference images of a
rare concept semantically and in appearance.

    from jaxdiff.research.seedselect import SeedSelect, SeedSelectConfig, classifier_features
    ss = SeedSelect(model, SamplerSettings(solver="ddim", grid="uniform_t", steps=20), references,
                    semantic_fn=classifier_features(digits_classifier(16).fn), label=3,
                    done_fn=predicts_class(digits_classifier(16).fn, 3))
    result = ss.run(model.process.prior_sample(key, (8, 16, 16, 1)))    # 8 seeds at once

The objective, as in the official code (``dvirsamuel/SeedSelect``, ``main.py`` / ``SeedOptimizationStableDiffusion.py``,
read for this module):

* semantic: after each of the last ``len(semantic_weights)`` (default 3) solver steps, the current state is
  decoded to an image (latent models: ``model.decode``; pixel models: the state itself), clipped to the data
  range and embedded by ``semantic_fn``; ``l_k = 1 - cos(feature_k, c)`` with ``c`` the mean of the
  references' features, L2-normalised. ``L_sem = sum_k w_k l_k`` with ``w = (0.05, 0.25, 0.7)``.
  (Official: CLIP ViT-H/14 image features. Here ``semantic_fn`` is any differentiable embedding; the
  benchmark uses the shipped digits classifier's penultimate features as a local stand-in.)
* appearance: ``L_app = mean((x_0 - a)^2)`` between the sampler's final output (the latent of a latent model)
  and ``a``, the mean of the references in that space (official: the mean SD-VAE latent of the references;
  a pixel model's references are their own "latents"; a latent model needs ``appearance_encode``).
* ``L = 10 L_sem + L_app``, minimised per seed with AdamW (lr 0.1, divided by 10 from iteration 3 on,
  torch's default weight decay 0.01, betas (0.9, 0.999), eps 1e-8), 30 iterations.

Additions, not in the official code: a batch of seeds is optimized at once (the loss is the sum of the
per-seed losses and every operation is per sample, so this equals independent runs), and an optional
``done_fn(images) -> (B,) bool`` early stop: a seed whose sample already satisfies it (e.g. a classifier
assigns the target class) is frozen, and the loop ends when every seed is done.

Gradients flow through every model call (``jax.grad`` of ``jaxdiff.solvers.sample``). The solver loop is a
``lax.scan``, whose reverse pass keeps every step's residuals: with ``remat=True`` (default) the denoiser is
wrapped in ``jax.checkpoint``, so only each step's input state is kept and the network's activations are
recomputed in the backward pass (the official code's ``enable_gradient_checkpointing``).

The states after the last steps enter the semantic loss (:func:`tail_states`): for one-step solvers
(``ddim``, ``ddpm``, ``euler``, ``heun``) the grid is run once, cut before those steps; a multistep solver
is run once per recorded state on the grid truncated there (its own result, ~3x the cost).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.sampling import (LEARNED_PREFIX, SamplerSettings, SamplingModel, load_learned_grid, make_denoiser,
                              time_grid)
from jaxdiff.solvers import DDIM, DDPM, Euler, Heun, make_solver, sample

Array = jax.Array

__all__ = ["SeedSelectConfig", "SeedSelect", "SeedSelectResult", "tail_states", "ONE_STEP_SOLVERS",
           "classifier_features", "predicts_class"]


@dataclasses.dataclass(frozen=True)
class SeedSelectConfig:
    """The optimisation schedule and loss weights (defaults: the official code's).

    iterations: optimizer steps per seed (official 30). lr: AdamW learning rate (official ``__main__``: 0.1);
    from iteration ``lr_drop_at`` on it is ``lr * lr_drop_factor`` (official: 3 and 0.1). weight_decay,
    b1, b2, eps: AdamW's (torch defaults, as the official code leaves them). semantic_weights: weights of the
    semantic loss after the last ``len`` steps, earliest first (official (0.05, 0.25, 0.7)).
    semantic_scale / appearance_scale: ``L = semantic_scale L_sem + appearance_scale L_app`` (official 10, 1).
    remat: checkpoint every denoiser call (bounded memory; about one extra forward pass of compute).
    """

    iterations: int = 30
    lr: float = 0.1
    lr_drop_at: int = 3
    lr_drop_factor: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    semantic_weights: tuple[float, ...] = (0.05, 0.25, 0.7)
    semantic_scale: float = 10.0
    appearance_scale: float = 1.0
    remat: bool = True

    def __post_init__(self):
        object.__setattr__(self, "semantic_weights", tuple(float(w) for w in self.semantic_weights))
        if isinstance(self.iterations, bool) or int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {self.iterations!r}")
        if not self.lr > 0 or not self.lr_drop_factor > 0:
            raise ValueError(f"lr and lr_drop_factor must be positive, got {self.lr}, {self.lr_drop_factor}")
        if not self.semantic_weights or any(not np.isfinite(w) or w < 0 for w in self.semantic_weights):
            raise ValueError(f"semantic_weights must be non-empty, finite and >= 0, got {self.semantic_weights}")
        if self.semantic_scale < 0 or self.appearance_scale < 0:
            raise ValueError("semantic_scale and appearance_scale must be >= 0")

    def schedule(self) -> optax.Schedule:
        """Iteration -> learning rate: ``lr`` before ``lr_drop_at``, ``lr * lr_drop_factor`` from it on."""
        lr, low, at = self.lr, self.lr * self.lr_drop_factor, self.lr_drop_at
        return lambda count: jnp.where(count < at, lr, low)

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW with :meth:`schedule` (decoupled weight decay on the seed, as torch.optim.AdamW)."""
        return optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)


class SeedSelectResult(NamedTuple):
    """What :meth:`SeedSelect.run` returns (numpy).

    seeds: (B, *model.shape) the optimised x_T. images: (B, *image_shape) their samples (clipped to [-1, 1]).
    done: (B,) bool: with early stop, the seeds frozen because ``done_fn`` held; without, whether it holds for
      the final seeds (all False without a ``done_fn``).
    iterations: (B,) int, updates before ``done_fn`` first held (0: the start seed already passed;
      ``config.iterations`` if never).
    losses: (iterations + 1, B) total loss at each evaluated iterate (NaN after a seed was frozen).
    seconds_per_iteration: mean wall time of one compiled iteration (batch of B), compilation excluded.
    compile_seconds: the first iteration's wall time (tracing + compilation + one run).
    """

    seeds: np.ndarray
    images: np.ndarray
    done: np.ndarray
    iterations: np.ndarray
    losses: np.ndarray
    seconds_per_iteration: float
    compile_seconds: float


def classifier_features(fn: Callable[[Array], tuple[Array, Array]]) -> Callable[[Array], Array]:
    """``images -> features`` from an extractor function ``images -> (features, logits)`` (e.g.
    ``jaxdiff.extractors.digits_classifier(16).fn``)."""
    return lambda images: fn(images)[0]


def predicts_class(fn: Callable[[Array], tuple[Array, Array]], label: int) -> Callable[[Array], Array]:
    """``done_fn``: ``images (B, ...) -> (B,) bool``, whether the classifier ``fn`` (``images -> (features,
    logits)``) assigns ``label``."""
    return lambda images: jnp.argmax(fn(images)[1], axis=-1) == label


ONE_STEP_SOLVERS = (DDIM, DDPM, Euler, Heun)    # a step depends on the current state only


def tail_states(denoiser: Callable[..., Array], process, x_T: Array, grid: Array, num_last: int, *,
                solver: Any = "ddim", prediction: str = "eps", key: Array | None = None, cond: Any = None,
                uncond: Any = None, guidance_scale: float | None = None) -> list[Array]:
    """The states after each of the last ``num_last`` steps of ``sample(..., x_T, grid)``, earliest first; the
    last is the sampler's output.

    Args:
      denoiser, process, solver, prediction, cond, uncond, guidance_scale: as ``jaxdiff.solvers.sample``.
      x_T: (B, ...) start state. grid: (N+1,) decreasing times, N >= num_last.
      key: randomness of a stochastic solver (each segment folds in its index).
    Returns:
      ``num_last`` arrays shaped like x_T. One-step solvers (``ONE_STEP_SOLVERS``) run the grid once, cut
      into ``N - num_last + 1`` steps and then single steps (the same states as the one-piece run). Other
      (multistep) solvers run the grid truncated after each recorded step (``grid[:j + 1]``): the solver's own
      result on each truncated grid, at about ``num_last`` times the cost.
    """
    solver = make_solver(solver) if isinstance(solver, str) else solver
    grid = jnp.asarray(grid)
    steps = grid.shape[0] - 1
    if not 1 <= num_last <= steps:
        raise ValueError(f"num_last must lie in [1, {steps}] (the grid's steps), got {num_last}")
    cuts = list(range(steps - num_last + 1, steps + 1))          # grid indices of the recorded states
    kw = dict(solver=solver, prediction=prediction, cond=cond, uncond=uncond, guidance_scale=guidance_scale)
    key_of = lambda i: None if key is None else jax.random.fold_in(key, i)
    if not isinstance(solver, ONE_STEP_SOLVERS):
        return [sample(denoiser, process, x_T, grid[:cut + 1], key=key_of(i), **kw) for i, cut in enumerate(cuts)]
    states, x, start = [], x_T, 0
    for i, cut in enumerate(cuts):
        x = sample(denoiser, process, x, grid[start:cut + 1], key=key_of(i), **kw)
        states.append(x)
        start = cut
    return states


def _grid_of(model: SamplingModel, settings: SamplerSettings, solver) -> np.ndarray:
    if settings.grid.startswith(LEARNED_PREFIX):
        return load_learned_grid(settings.grid, model.process, solver, settings)
    return time_grid(model.process, settings.grid, settings.steps, settings.solver, getattr(solver, "order", None))


def _normalize(v: Array) -> Array:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class SeedSelect:
    """Seed optimisation for one target concept of one model (see the module docstring).

    Args:
      model: the frozen :class:`~jaxdiff.sampling.SamplingModel` (with its ``params``).
      settings: solver, grid, steps (official: DDIM, 20 steps) and guidance scale (official 7.5).
      references: (k, *model.image_shape) reference images of the concept, in the data range [-1, 1].
      semantic_fn: differentiable ``images (B, *image_shape) -> features (B, F)`` (the CLIP stand-in).
      label: the class to condition on (required for a class-conditional model; None otherwise).
      appearance_encode: ``images -> (k, *model.shape)``, the first stage's encoder for a latent model (its
        mean reference latent is the appearance target); None for a pixel model (target: the mean image).
      done_fn: optional jax ``images (B, ...) -> (B,) bool`` early-stop test (e.g. :func:`predicts_class`).
      config: :class:`SeedSelectConfig`. key: the randomness of a stochastic solver (fixed over iterations).
    """

    def __init__(self, model: SamplingModel, settings: SamplerSettings, references: Any, *,
                 semantic_fn: Callable[[Array], Array], label: int | None = None,
                 appearance_encode: Callable[[Array], Array] | None = None,
                 done_fn: Callable[[Array], Array] | None = None, config: SeedSelectConfig | None = None,
                 key: Array | None = None):
        config = config or SeedSelectConfig()
        if model.params is None:
            raise ValueError("SeedSelect: the model has no parameters (model.params is None)")
        if model.context_shape is not None:
            raise ValueError("SeedSelect: context-conditioned (text) models are not supported here; "
                             "use a class-conditional or unconditional model")
        if getattr(model, "low_res_shape", None) is not None:
            raise ValueError("SeedSelect: super-resolution stages (conditioned on a low-resolution image) are not "
                             "supported; optimise the seed of the base stage")
        if model.num_classes:
            if label is None or isinstance(label, bool) or not 0 <= int(label) < model.num_classes:
                raise ValueError(f"SeedSelect: a class-conditional model needs label in [0, {model.num_classes}), "
                                 f"got {label!r}")
        elif label is not None:
            raise ValueError("SeedSelect: label given but the model is unconditional")
        if settings.guidance_scale is not None and not (model.num_classes and model.class_null):
            raise ValueError("SeedSelect: guidance_scale needs a class-conditional model with a null class")
        if model.decode is not None and appearance_encode is None:
            raise ValueError("SeedSelect: a latent model needs appearance_encode (images -> latents) for the "
                             "appearance target (the official code's mean VAE latent)")
        self.model, self.settings, self.config, self.label = model, settings, config, label
        self.solver = settings.make_solver()
        if self.solver.stochastic and key is None:
            raise ValueError(f"SeedSelect: solver {settings.solver!r} is stochastic: pass a PRNG key")
        self.grid = jnp.asarray(_grid_of(model, settings, self.solver))
        num_last = len(config.semantic_weights)
        if num_last > self.grid.shape[0] - 1:
            raise ValueError(f"SeedSelect: {num_last} semantic weights need at least {num_last} sampler steps, "
                             f"got {self.grid.shape[0] - 1}")
        shortest = self.grid.shape[0] - num_last
        if not isinstance(self.solver, ONE_STEP_SOLVERS) and shortest < getattr(self.solver, "order", 1):
            raise ValueError(f"SeedSelect: the semantic loss runs {settings.solver!r} on the grid truncated to "
                             f"{shortest} steps, fewer than its order {self.solver.order}: add steps")
        self.key, self.appearance_encode = key, appearance_encode
        self.semantic_fn, self.done_fn = semantic_fn, done_fn
        self.semantic_target, self.appearance_target = self._targets(references)
        self.optimizer = config.optimizer()
        self._step = jax.jit(self._iteration)

    def _targets(self, references: Any) -> tuple[Array, Array]:
        """``(semantic centroid (F,), appearance target (*model.shape))`` of reference images, checked."""
        image_shape = tuple(self.model.image_shape)
        refs = np.asarray(references, np.float32)
        if refs.ndim != 1 + len(image_shape) or tuple(refs.shape[1:]) != image_shape or refs.shape[0] < 1:
            raise ValueError(f"SeedSelect: reference images must have shape (k, {', '.join(map(str, image_shape))}) "
                             f"with k >= 1 (the model's images), got {refs.shape}")
        if not np.all(np.isfinite(refs)):
            raise ValueError("SeedSelect: reference images contain non-finite values")
        feats = jnp.asarray(self.semantic_fn(jnp.asarray(refs)))
        if feats.ndim != 2 or feats.shape[0] != refs.shape[0]:
            raise ValueError(f"SeedSelect: semantic_fn must map (k, ...) images to (k, F) features, got {feats.shape}")
        # official: the mean of the raw reference embeddings, then L2-normalised
        semantic = _normalize(jnp.mean(feats.astype(jnp.float32), axis=0))
        enc = self.appearance_encode
        app = refs if enc is None else np.asarray(enc(jnp.asarray(refs)), np.float32)
        if tuple(app.shape[1:]) != tuple(self.model.shape):
            raise ValueError(f"SeedSelect: appearance references must be (k, {self.model.shape}) in the sampler's "
                             f"output space, got {app.shape}")
        return semantic, jnp.asarray(app.mean(axis=0))

    def with_references(self, references: Any) -> "SeedSelect":
        """The same search toward other reference images ``(k, *model.image_shape)``, reusing the compiled
        iteration (the targets are arguments of it, not constants)."""
        other = copy.copy(self)
        other.semantic_target, other.appearance_target = self._targets(references)
        return other

    # --- the objective -------------------------------------------------------------------------------
    def _denoiser(self):
        den = make_denoiser(self.model.apply, self.model.params, self.model.process)
        return jax.checkpoint(den) if self.config.remat else den

    def _images(self, x: Array) -> Array:
        m = self.model
        if m.decode is None:
            return x
        return (m.decode(x, m.params) if m.decode_params else m.decode(x)).astype(jnp.float32)

    def sample_tail(self, x_T: Array) -> list[Array]:
        """The states after the last ``len(semantic_weights)`` steps from seeds ``x_T`` (B, *model.shape)."""
        m, s = self.model, self.settings
        b = x_T.shape[0]
        cond = {}
        if m.num_classes:
            labels = jnp.full((b,), self.label, jnp.int32)
            cond = dict(cond=labels)
            if s.guidance_scale is not None:
                cond.update(uncond=jnp.full((b,), m.num_classes, jnp.int32), guidance_scale=s.guidance_scale)
        return tail_states(self._denoiser(), m.process, x_T, self.grid, len(self.config.semantic_weights),
                           solver=self.solver, prediction=m.prediction, key=self.key, **cond)

    def losses(self, x_T: Array, targets: tuple[Array, Array] | None = None) -> tuple[Array, dict]:
        """Per-seed loss ``(B,)`` and ``{"semantic": (B,), "appearance": (B,), "images": final images}``;
        ``targets``: ``(semantic centroid, appearance target)``, default this object's references'."""
        c, a = (self.semantic_target, self.appearance_target) if targets is None else targets
        states = self.sample_tail(x_T)
        semantic = 0.0
        images = None
        for w, x in zip(self.config.semantic_weights, states):
            images = jnp.clip(self._images(x), -1.0, 1.0)      # official: (img / 2 + 0.5).clamp(0, 1)
            f = _normalize(self.semantic_fn(images).astype(jnp.float32))
            semantic = semantic + w * (1.0 - f @ c)
        final = states[-1]
        axes = tuple(range(1, final.ndim))
        appearance = jnp.mean((final - a) ** 2, axis=axes)
        total = self.config.semantic_scale * semantic + self.config.appearance_scale * appearance
        return total, {"semantic": semantic, "appearance": appearance, "images": images}

    def _iteration(self, x, opt_state, frozen, targets, early_stop):
        """One iteration on the batch: loss, gradient, the ``done_fn`` test of the current samples, update.
        With ``early_stop`` a seed that passes the test (now or before) keeps its value."""
        def total(x):
            per_seed, aux = self.losses(x, targets)
            return jnp.sum(per_seed), (per_seed, aux["images"])
        (_, (per_seed, images)), grad = jax.value_and_grad(total, has_aux=True)(x)
        hit = jnp.zeros(x.shape[:1], bool) if self.done_fn is None else self.done_fn(images).astype(bool)
        frozen = frozen | (hit & early_stop)
        updates, new_opt = self.optimizer.update(grad, opt_state, x)
        new_x = optax.apply_updates(x, updates)
        keep = frozen.reshape((-1,) + (1,) * (x.ndim - 1))
        new_x = jnp.where(keep, x, new_x)
        new_opt = jax.tree.map(lambda n, o: jnp.where(keep, o, n) if n.shape == x.shape else n, new_opt, opt_state)
        return new_x, new_opt, frozen, hit, per_seed, images

    # --- the loop ------------------------------------------------------------------------------------
    def run(self, x_T: Any, *, early_stop: bool = True) -> SeedSelectResult:
        """Optimise a batch of seeds ``x_T`` ``(B, *model.shape)`` (e.g. ``process.prior_sample``).

        Each iteration evaluates the loss of the current seeds, tests ``done_fn`` on their samples, and updates
        the seeds; after ``config.iterations`` updates the final seeds are evaluated once more. With a
        ``done_fn`` and ``early_stop``, a seed is frozen at the first iterate that passes and the loop ends when
        all have; without ``early_stop`` every seed takes every update (``iterations`` still records the first
        pass). Both settings share one compiled iteration.
        """
        x = jnp.asarray(x_T, jnp.float32)
        if tuple(x.shape[1:]) != tuple(self.model.shape) or x.ndim != 1 + len(self.model.shape) or x.shape[0] < 1:
            raise ValueError(f"SeedSelect: seeds must have shape (B, {', '.join(map(str, self.model.shape))}), "
                             f"got {tuple(x.shape)}")
        b, n = x.shape[0], self.config.iterations
        targets = (self.semantic_target, self.appearance_target)
        stop = jnp.asarray(bool(early_stop) and self.done_fn is not None)
        opt_state = self.optimizer.init(x)
        frozen = jnp.zeros((b,), bool)
        first = np.full((b,), n, np.int64)
        ever = np.zeros((b,), bool)
        losses = np.full((n + 1, b), np.nan)
        times, compile_s, images, hit = [], 0.0, None, np.zeros((b,), bool)
        for i in range(n + 1):
            t0 = time.perf_counter()
            was_frozen = np.asarray(frozen)
            new_x, new_opt, frozen, hit, per_seed, images = self._step(x, opt_state, frozen, targets, stop)
            per_seed, hit = np.asarray(per_seed), np.asarray(hit)      # waits for the step
            dt = time.perf_counter() - t0
            if i == 0:
                compile_s = dt
            else:
                times.append(dt)
            losses[i] = np.where(was_frozen, np.nan, per_seed)
            first[hit & ~ever] = i
            ever |= hit
            if i == n or np.asarray(frozen).all():
                break
            x, opt_state = new_x, new_opt
        done = np.asarray(frozen) if bool(stop) else hit
        return SeedSelectResult(seeds=np.asarray(x), images=np.asarray(images), done=done,
                                iterations=first, losses=losses,
                                seconds_per_iteration=float(np.mean(times)) if times else float("nan"),
                                compile_seconds=compile_s)
