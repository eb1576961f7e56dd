"""Sampling a trained network, whatever it came from.

- :class:`SamplingModel`: what sampling needs to know about a network (its pure ``apply``, parameters,
  noise process, prediction kind, shape, classes, an optional latent decoder). A training run's checkpoint
  (``train_lib.experiment.restore_run(...).sampling_model``) and a diffusers folder
  (``convert.load_diffusers_model``) both produce one.
- :class:`SamplerSettings`: solver, its options, time grid, step count and guidance scale, checked at once.
- :class:`Sampler`: one compiled, batch-sharded program that turns start noise into images for a model
  and settings.
- :func:`sample_chunks` / :func:`sample_images`: ``num`` samples drawn ``batch`` at a time; the same
  seed gives the same samples in any chunking and on any device count.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.nn.sharding import batch_sharding
from jaxdiff.solvers import make_solver, sample
from jaxdiff.timesteps import GRIDS, make_grid

OPTIMIZED_SOLVERS = ("dpm_solver++", "unipc")
GRID_NAMES = tuple(sorted(GRIDS)) + ("optimized",)
PREDICTIONS = ("eps", "x0", "v", "score", "flow")
LEARNED_PREFIX = "learned:"      # grid="learned:PATH": a grid file of jaxdiff.solvers.learn_grid


@dataclasses.dataclass(frozen=True)
class SamplingModel:
    """A trained network as sampling sees it.

    Attributes:
      apply: ``apply(params, x (B,H,W,C), model_time (B,), labels (B,) | None) -> (B,H,W,C)`` prediction;
        for a context-conditioned model the fourth argument is the context ``(B, S, D)``.
      params: the parameters ``apply`` takes (None for a model whose parameters are passed per call).
      process: the noise process it was trained with; ``prediction``: what it predicts (``PREDICTIONS``).
      shape: ``(H, W, C)`` the network sees (the latents of latent diffusion).
      num_classes: classes of a class-conditional model (None: unconditional); ``class_null``: whether
        class ``num_classes`` is the null class of classifier-free guidance.
      context_shape: ``(S, D)`` of the context (encoder hidden states, e.g. prompt embeddings) a
        cross-attention network is conditioned on; None: not context-conditioned. Guidance then takes an
        unconditional (negative) context per sample.
      decode: latent diffusion: ``decode(z (B,h,w,c)) -> images (B,H,W,C)``, run in the same program;
        with ``decode_params=True`` it is called as ``decode(z, params)`` (the decoder's weights travel with the
        sampler's ``params`` instead of being compiled in).
      defaults: the source's sampling settings (a :class:`SamplerSettings` field dict), used where the
        caller gives none.
      step, source: provenance (checkpoint step, workdir or folder) for the records written with samples.
      encode_prompts: text-conditioned models: ``encode_prompts(prompts: list[str]) -> context (N, S, D)``
        (tokenizer + text encoder with this model's parameters; the empty prompt is the unconditional context).
      start: optional first step, ``start(params, x_T (B,H,W,C), labels (B,) | context, t0) -> x at t0``: the
        state at the grid's first time ``t0`` from the prior draw, taken inside the compiled program before
        the solver (e.g. SingDiffusion's step from t = 1, ``jaxdiff.research.singdiffusion``); None: x_T.
      low_res_shape: super-resolution models: ``(h, w, C)`` of the low-resolution image they are conditioned
        on (``apply``'s fourth argument is then ``{"labels", "low_res", "aug_level"}``); None: not one.
      aug_range: ``(min, max)`` conditioning-augmentation levels (process times) it was trained on.
    """

    apply: Callable[..., jax.Array]
    params: Any
    process: Any
    prediction: str
    shape: tuple[int, int, int]
    num_classes: int | None = None
    class_null: bool = False
    decode: Callable[[jax.Array], jax.Array] | None = None
    context_shape: tuple[int, int] | None = None
    decode_params: bool = False
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    step: int | None = None
    source: str = ""
    encode_prompts: Callable[[Any], np.ndarray] | None = None
    start: Callable[..., jax.Array] | None = None
    low_res_shape: tuple[int, int, int] | None = None
    aug_range: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if len(self.shape) != 3:
            raise ValueError(f"shape must be (H, W, C), got {self.shape!r}")
        if self.context_shape is not None:
            if len(self.context_shape) != 2:
                raise ValueError(f"context_shape must be (S, D), got {self.context_shape!r}")
            if self.num_classes:
                raise ValueError("a model is conditioned on classes or on a context, not both")
        if self.low_res_shape is not None and (len(self.low_res_shape) != 3 or self.context_shape is not None):
            raise ValueError(f"low_res_shape must be (h, w, C) of a model without a context, got {self.low_res_shape!r}")

    def check_aug_level(self, aug_level: float) -> float:
        """``aug_level`` as a float, ValueError unless this super-resolution model was trained on it."""
        lo, hi = self.aug_range
        if isinstance(aug_level, bool) or not isinstance(aug_level, (int, float, np.floating)) or not (
                lo - 1e-9 <= aug_level <= hi + 1e-9):
            raise ValueError(f"augmentation level {aug_level!r} lies outside [{lo:g}, {hi:g}], the range this "
                             f"super-resolution model ({self.source or 'model'}) was trained on")
        return float(aug_level)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images the sampler returns (decoded, for latent models)."""
        if self.decode is None:
            return tuple(self.shape)
        z = jax.ShapeDtypeStruct((1,) + tuple(self.shape), jnp.float32)
        decode = (lambda z: self.decode(z, self.params)) if self.decode_params else self.decode
        return tuple(jax.eval_shape(decode, z).shape[1:])


def make_denoiser(apply: Callable[..., jax.Array], params: Any, process) -> Callable[..., jax.Array]:
    """Solver-facing ``f(x (B,H,W,C), t (B,)[, labels (B,)]) -> (B,H,W,C)`` float32 in continuous time: the
    network sees ``process.model_time(t)``."""
    def denoiser(x, t, labels=None):
        return apply(params, x, process.model_time(t), labels).astype(jnp.float32)
    return denoiser


def check_grid_request(grid: str, steps: int, solver: str) -> None:
    """ValueError unless ``steps`` is a positive integer and ``grid`` names a grid ``solver`` can use: one of
    ``GRID_NAMES`` (``"optimized"`` for ``OPTIMIZED_SOLVERS`` only) or ``"learned:PATH"`` of a readable file."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"sampling steps must be a positive integer, got {steps!r}")
    if grid.startswith(LEARNED_PREFIX):
        learned_grid_steps(grid)     # the file exists and is a learned grid
    elif grid not in GRID_NAMES:
        raise ValueError(f"unknown time grid {grid!r}; choose one of {list(GRID_NAMES)} or "
                         f"'{LEARNED_PREFIX}PATH' (a grid learned with jaxdiff.solvers.learn_grid)")
    if grid == "optimized" and solver not in OPTIMIZED_SOLVERS:
        raise ValueError(f"grid 'optimized' exists for solvers {OPTIMIZED_SOLVERS}, not {solver!r}")


def time_grid(process, grid: str, steps: int, solver: str = "dpm_solver++", order: int | None = None) -> np.ndarray:
    """``(steps+1,)`` float64 times: a hand-made grid by name, or ``"optimized"`` (Xue et al.; cached
    grids, optimized on a miss) for the multistep solvers in ``OPTIMIZED_SOLVERS``. (A learned grid needs
    the solver object: :func:`load_learned_grid`.)"""
    check_grid_request(grid, steps, solver)
    if grid.startswith(LEARNED_PREFIX):
        raise ValueError("a learned grid is checked against the solver object: use load_learned_grid")
    if grid == "optimized":
        from jaxdiff.timesteps.cache import optimized_grid
        order = order or (2 if solver == "dpm_solver++" else 3)
        return np.asarray(optimized_grid(process, solver, order, steps), np.float64)
    return np.asarray(make_grid(grid, process, steps), np.float64)


def learned_grid_steps(grid: str) -> int:
    """Steps (grid intervals) of the learned-grid file named by ``"learned:PATH"`` (ValueError if unreadable)."""
    from jaxdiff.timesteps.learned import read_grid_file
    return len(read_grid_file(grid[len(LEARNED_PREFIX):])["grid"]) - 1


def load_learned_grid(grid: str, process, solver, settings: "SamplerSettings") -> np.ndarray:
    """The times of ``"learned:PATH"``, checked against this process, solver (class and options) and guidance
    scale (``jaxdiff.timesteps.load_grid``), and against ``settings.steps``."""
    from jaxdiff.timesteps.learned import load_grid, read_grid_file
    path = grid[len(LEARNED_PREFIX):]
    times = load_grid(path, process, solver, int(read_grid_file(path)["nfe"]),
                      guidance_scale=settings.guidance_scale)
    if len(times) - 1 != settings.steps:
        raise ValueError(f"the learned grid {path} has {len(times) - 1} steps, not steps={settings.steps}: "
                         "leave steps unset or give that number")
    return times


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How to sample: ``solver`` (a name of ``jaxdiff.solvers.SOLVERS``) with ``solver_kwargs``, the time
    ``grid`` (``GRID_NAMES``), ``steps`` and the classifier-free ``guidance_scale`` (None: none)."""

    solver: str = "dpm_solver++"
    solver_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: str = "uniform_logsnr"
    steps: int = 20
    guidance_scale: float | None = None

    def __post_init__(self):
        if not isinstance(self.solver_kwargs, Mapping):
            raise ValueError(f"solver_kwargs must be a dict, got {self.solver_kwargs!r}")
        object.__setattr__(self, "solver_kwargs", dict(self.solver_kwargs))
        solver = self.make_solver()           # the solver's name and options
        check_grid_request(self.grid, self.steps, self.solver)
        g = self.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g)):
            raise ValueError(f"guidance_scale must be a finite number or None, got {g!r}")
        solver.validate(int(self.steps))      # the step count the solver can run, checked now

    def make_solver(self):
        """The solver object (``jaxdiff.solvers.make_solver``: ValueError naming an unknown name or option)."""
        return make_solver(self.solver, **self.solver_kwargs)

    @classmethod
    def resolve(cls, defaults: Mapping[str, Any], *, solver: str | None = None,
                solver_kwargs: Mapping | None = None, grid: str | None = None, steps: int | None = None,
                guidance_scale: float | None = None) -> "SamplerSettings":
        """``defaults`` (e.g. a config's ``sample`` section) with the given values in their place. The
        defaults' ``solver_kwargs`` apply only to the defaults' solver (a different solver starts from none)."""
        d = dict(defaults)
        kwargs = solver_kwargs if solver_kwargs is not None else (
            d.get("solver_kwargs", {}) if solver is None or solver == d.get("solver") else {})
        grid = grid or d.get("grid", cls.grid)
        if steps is None and grid.startswith(LEARNED_PREFIX):    # a learned grid's file fixes its step count
            steps = learned_grid_steps(grid)
        return cls(solver=solver or d.get("solver", cls.solver), solver_kwargs=dict(kwargs),
                   grid=grid, steps=steps or d.get("steps", cls.steps),
                   guidance_scale=guidance_scale if guidance_scale is not None else d.get("guidance_scale"))

    def as_dict(self) -> dict:
        """Plain dict (for JSON records)."""
        return dataclasses.asdict(self)


class Sampler:
    """``Sampler(model, settings, mesh)(params, labels, key) -> (N, H, W, C)`` float32 images in about [-1, 1].

    One jitted program (solver loop, guidance, latent decode); the batch is sharded over the mesh's data
    and fsdp axes (None: default placement). ``params`` are passed per call, so a training loop reuses the
    program while its parameters change; :func:`sample_images` uses ``model.params``.

    ``grid``: explicit ``(steps+1,)`` decreasing process times in place of ``settings.grid`` (e.g. a diffusers
    scheduler's timesteps); ``settings.steps`` is then ignored. A context-conditioned model
    (``model.context_shape``) is called with ``context=`` (and ``negative_context=`` under guidance).
    """

    def __init__(self, model: SamplingModel, settings: SamplerSettings | None = None, mesh: Mesh | None = None,
                 *, grid: Any = None):
        settings = settings if settings is not None else SamplerSettings.resolve(model.defaults)
        has_context = model.context_shape is not None
        if settings.guidance_scale is not None and not (model.num_classes and model.class_null) and not has_context:
            raise ValueError("guidance_scale needs a class-conditional model trained with label dropout (a null "
                             "class); this model has none: sample without guidance_scale")
        self.model, self.settings, self.mesh = model, settings, mesh
        self.solver = settings.make_solver()
        if grid is None and settings.grid.startswith(LEARNED_PREFIX):
            grid = load_learned_grid(settings.grid, model.process, self.solver, settings)
        elif grid is None:
            grid = time_grid(model.process, settings.grid, settings.steps, settings.solver,
                             getattr(self.solver, "order", None))
        else:
            grid = np.asarray(grid, np.float64)
            if grid.ndim != 1 or grid.shape[0] < 2 or not np.all(np.diff(grid) < 0):
                raise ValueError(f"grid must be a strictly decreasing 1-D array of at least 2 times, got {grid!r}")
        self.grid = jnp.asarray(grid)
        self.num_classes = model.num_classes
        process, prediction, solver, grid = model.process, model.prediction, self.solver, self.grid
        guidance, decode, decode_params = settings.guidance_scale, model.decode, model.decode_params
        null = model.num_classes if model.class_null else None

        super_res = model.low_res_shape is not None

        def run(params, x_T, labels, uncond, key, low_res=None, aug_level=None):
            apply = model.apply
            if hasattr(apply, "start"):   # a network whose state rides from step to step (research.distrifusion)
                apply = apply.start(x_T.shape[0] * (1 if guidance is None else 2), tuple(x_T.shape[1:]))
            denoiser = make_denoiser(apply, params, process)
            if super_res:       # the conditioning is a dict (labels, low-res image, augmentation level)
                extra = {"low_res": low_res, "aug_level": jnp.full(x_T.shape[:1], process.model_time(aug_level))}
                labels = {"labels": labels if model.num_classes else None, **extra}
                uncond = {**labels, "labels": jnp.full_like(labels["labels"], null)} if guidance is not None else None
            if super_res and guidance is None:
                cond = dict(cond=labels)
            elif super_res:
                cond = dict(cond=labels, uncond=uncond, guidance_scale=guidance)
            elif model.num_classes is None and not has_context:
                cond = {}
            elif guidance is None:
                cond = dict(cond=labels)
            elif has_context:
                cond = dict(cond=labels, uncond=uncond, guidance_scale=guidance)
            else:
                cond = dict(cond=labels, uncond=jnp.full_like(labels, null), guidance_scale=guidance)
            if model.start is not None:
                x_T = model.start(params, x_T, labels, grid[0])
            x = sample(denoiser, process, x_T, grid, solver=solver, prediction=prediction, key=key, **cond)
            if decode is None:
                return x
            return (decode(x, params) if decode_params else decode(x)).astype(jnp.float32)

        self._run = jax.jit(run)

    def _contexts(self, context, negative_context):
        """``(context (N, S, D), negative (N, S, D) | None)`` float32, checked against the model."""
        s, d = self.model.context_shape
        if context is None:
            raise ValueError(f"this model is conditioned on a context: pass context (N, {s}, {d})")
        context = np.asarray(context, np.float32)
        if context.ndim != 3 or context.shape[1:] != (s, d):
            raise ValueError(f"context must have shape (N, {s}, {d}), got {context.shape}")
        if self.settings.guidance_scale is None:
            if negative_context is not None:
                raise ValueError("negative_context is the unconditional branch of guidance: set guidance_scale")
            return context, None
        if negative_context is None:
            raise ValueError("guidance_scale needs negative_context (N, S, D) (e.g. the empty prompt's embedding)")
        neg = np.asarray(negative_context, np.float32)
        if neg.ndim == 2:
            neg = neg[None]
        if neg.ndim != 3 or neg.shape[1:] != (s, d) or neg.shape[0] not in (1, len(context)):
            raise ValueError(f"negative_context must have shape ({len(context)} or 1, {s}, {d}), got {neg.shape}")
        return context, np.broadcast_to(neg, context.shape)

    def __call__(self, params: Any, labels: np.ndarray | None, key: jax.Array, num: int | None = None,
                 offset: int = 0, *, context: Any = None, negative_context: Any = None,
                 x_T: Any = None, low_res: Any = None, aug_level: float | None = None) -> np.ndarray:
        """Draw ``len(labels)`` (``len(context)``, or ``num``, unconditional) samples; deterministic in ``key``:
        the start noise of sample ``offset + i`` is drawn from ``fold_in(split(key)[0], offset + i)``, so
        drawing in chunks (pass the running ``offset``) gives the same samples as drawing at once (stochastic
        solvers' step noise still depends on the batch). ``x_T`` ``(N, *model.shape)``: given start noise
        instead (already scaled by the prior's std). Super-resolution models (``model.low_res_shape``):
        ``low_res`` ``(N, h, w, C)`` the (already augmented) low-resolution images and ``aug_level`` their
        augmentation level (a process time in ``model.aug_range``; ``jaxdiff.cascade`` does both).
        Returns numpy ``(N, H, W, C)`` float32."""
        low_res, aug_level = self._low_res(low_res, aug_level, num if labels is None else len(labels))
        uncond = None
        if self.model.context_shape is not None:
            if labels is not None:
                raise ValueError("this model is conditioned on a context, not on labels: pass context=")
            labels, uncond = self._contexts(context, negative_context)
            n = len(labels)
        elif context is not None or negative_context is not None:
            raise ValueError("context given but the model is not context-conditioned (context_shape is None)")
        elif self.num_classes is not None:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels (N,)")
            labels = np.asarray(labels, np.int32)
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
            n = len(labels)
        else:
            n = int(num if num is not None else len(labels))
            labels = np.zeros((n,), np.int32)
        # pad to a multiple of the batch shards; x_T of example i comes from fold_in(key, i), so it does
        # not depend on the padding, the device count or how many samples are drawn at once
        shards = 1
        if self.mesh is not None:
            shards = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape]))
        padded = -(-n // shards) * shards
        k_start, k_solver = jax.random.split(key)
        shape = tuple(self.model.shape)
        if x_T is None:
            keys = jax.vmap(lambda i: jax.random.fold_in(k_start, i))(jnp.arange(padded) + offset)
            x_T = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys) * self.model.process.prior_std
        else:
            x_T = np.asarray(x_T, np.float32)
            if x_T.shape != (n,) + shape:
                raise ValueError(f"x_T must have shape {(n,) + shape}, got {x_T.shape}")
            x_T = jnp.asarray(_pad(x_T, padded))
        labels = jnp.asarray(_pad(labels, padded))
        uncond = None if uncond is None else jnp.asarray(_pad(uncond, padded))
        if self.mesh is not None:
            x_T = jax.device_put(x_T, batch_sharding(self.mesh, 4))
            labels = jax.device_put(labels, batch_sharding(self.mesh, labels.ndim))
            if uncond is not None:
                uncond = jax.device_put(uncond, batch_sharding(self.mesh, uncond.ndim))
            if not _is_on_mesh(params, self.mesh):
                params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        extra = ()
        if low_res is not None:
            low_res = jnp.asarray(_pad(low_res, padded))
            if self.mesh is not None:
                low_res = jax.device_put(low_res, batch_sharding(self.mesh, 4))
            extra = (low_res, jnp.asarray(aug_level, jnp.float32))
        out = self._run(params, x_T, labels, uncond, k_solver, *extra)
        return np.asarray(jax.device_get(out))[:n]

    def _low_res(self, low_res, aug_level, n):
        """``(low_res (N, h, w, C) float32, aug_level float)`` checked against a super-resolution model, or
        ``(None, None)`` for any other model (ValueError if either was given then)."""
        shape = self.model.low_res_shape
        if shape is None:
            if low_res is not None or aug_level is not None:
                raise ValueError("low_res / aug_level given but the model is not a super-resolution model")
            return None, None
        if low_res is None or aug_level is None:
            raise ValueError(f"this is a super-resolution model: pass low_res (N, {', '.join(map(str, shape))}) "
                             "and aug_level")
        low_res = np.asarray(low_res, np.float32)
        if low_res.shape[1:] != tuple(shape) or (n is not None and len(low_res) != n):
            raise ValueError(f"this super-resolution model takes low-resolution images of shape "
                             f"({n if n is not None else 'N'}, {', '.join(map(str, shape))}), got {low_res.shape}: "
                             "the stage below it must make images of that size")
        return low_res, self.model.check_aug_level(aug_level)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``n`` rows."""
    a = np.asarray(a)
    return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)]) if n > len(a) else a


def _is_on_mesh(tree, mesh) -> bool:
    leaves = jax.tree.leaves(tree)
    return all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh for x in leaves)


def sample_chunks(sampler: Sampler, labels: np.ndarray | None, num: int, seed: int, batch: int,
                  params: Any = None, *, context: Any = None,
                  negative_context: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, images (n, H, W, C) float32)`` for ``num`` samples in chunks of ``batch``, with
    ``params`` (default: the sampler model's). Any chunking gives the same samples (see :class:`Sampler`).
    Context-conditioned models: ``context (num, S, D)`` and, under guidance, ``negative_context`` (``(num, S, D)``
    or one ``(S, D)`` for all)."""
    if num < 1 or batch < 1:
        raise ValueError(f"num and batch must be positive, got {num}, {batch}")
    params = sampler.model.params if params is None else params
    if params is None:
        raise ValueError("the sampler's model has no parameters: pass params")
    key = jax.random.key(seed)
    for start in range(0, num, batch):
        n = min(batch, num - start)
        chunk_labels = None if labels is None else labels[start:start + n]
        kw = {}
        if context is not None:
            neg = negative_context
            if neg is not None and np.ndim(neg) == 3 and np.shape(neg)[0] != 1:
                neg = neg[start:start + n]
            kw = dict(context=context[start:start + n], negative_context=neg)
        yield start, sampler(params, chunk_labels, key, num=n, offset=start, **kw)


def sample_images(sampler: Sampler, labels: np.ndarray | None, num: int, seed: int, batch: int,
                  params: Any = None, **context) -> np.ndarray:
    """``num`` samples ``(num, H, W, C)`` float32 drawn in chunks of ``batch`` (see :func:`sample_chunks`;
    ``context=`` / ``negative_context=`` for context-conditioned models)."""
    return np.concatenate([images for _, images in sample_chunks(sampler, labels, num, seed, batch, params,
                                                                 **context)])


def make_labels(text: str | None, num: int, num_classes: int | None) -> np.ndarray | None:
    """Class labels ``(num,)`` int32: ``"3,3,7"`` -> those, cycled to ``num``; None -> ``i % num_classes``;
    None for an unconditional model (where giving labels is an error)."""
    if num_classes is None:
        if text:
            raise ValueError("labels given but the model is unconditional")
        return None
    if not text:
        return (np.arange(num) % num_classes).astype(np.int32)
    try:
        labels = np.asarray([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError:
        raise ValueError(f"labels must be comma-separated integers, got {text!r}") from None
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {text!r}")
    return np.resize(labels, num)
