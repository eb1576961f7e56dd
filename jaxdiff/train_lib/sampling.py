"""Drawing samples from trained parameters: the time grid a sampling config names, and a jitted,
batch-sharded sampler with optional classifier-free guidance (used by train.py's sample grids and by
sample.py)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.nn.sharding import batch_sharding
from jaxdiff.solvers import make_solver, sample
from jaxdiff.timesteps import make_grid
from jaxdiff.train_lib.model import make_denoiser

OPTIMIZED_SOLVERS = ("dpm_solver++", "unipc")


def time_grid(process, grid: str, steps: int, solver: str = "dpm_solver++", order: int | None = None) -> np.ndarray:
    """``(steps+1,)`` float64 times: a hand-made grid by name, or ``"optimized"`` (Xue et al.; cached
    grids, optimized on a miss) for the multistep solvers in ``OPTIMIZED_SOLVERS``."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"sampling steps must be a positive integer, got {steps!r}")
    if grid == "optimized":
        if solver not in OPTIMIZED_SOLVERS:
            raise ValueError(f"grid 'optimized' exists for solvers {OPTIMIZED_SOLVERS}, not {solver!r}")
        from jaxdiff.timesteps.cache import optimized_grid
        order = order or (2 if solver == "dpm_solver++" else 3)
        return np.asarray(optimized_grid(process, solver, order, steps), np.float64)
    return np.asarray(make_grid(grid, process, steps), np.float64)


class Sampler:
    """``Sampler(apply, process, ...)(params, labels, key) -> (N, H, W, C)`` float32 images in about [-1, 1].

    Args:
      apply: ``apply(params, x, model_time, labels | None)``.
      process: the training noise process; ``prediction``: what the network predicts.
      image_shape: ``(H, W, C)``.
      solver, solver_kwargs, grid, steps: the solver (a name of ``jaxdiff.solvers.SOLVERS``) and time grid.
      num_classes: classes of a conditional model (None: unconditional); ``class_null``: it has a null class.
      guidance_scale: classifier-free guidance scale (None: plain conditional sampling).
      mesh: shard the batch over it (its data and fsdp axes); None: default device placement.
      decode: latent diffusion: ``decode(z (N, h, w, c)) -> images``, applied in the same program
        (``image_shape`` is then the latent shape).
    """

    def __init__(self, apply: Callable, process, *, prediction: str, image_shape: tuple[int, int, int],
                 solver: str = "dpm_solver++", solver_kwargs: dict | None = None, grid: str = "uniform_logsnr",
                 steps: int = 20, num_classes: int | None = None, class_null: bool = False,
                 guidance_scale: float | None = None, mesh: Mesh | None = None, decode: Callable | None = None):
        if guidance_scale is not None and not class_null:
            raise ValueError("guidance_scale needs a model trained with label dropout (a null class); this "
                             "model has none: set sample.guidance_scale=None")
        self.solver = make_solver(solver, **dict(solver_kwargs or {}))
        self.grid = jnp.asarray(time_grid(process, grid, steps, solver, getattr(self.solver, "order", None)))
        self.process, self.prediction, self.image_shape = process, prediction, tuple(image_shape)
        self.num_classes, self.guidance_scale, self.mesh = num_classes, guidance_scale, mesh
        null = num_classes if class_null else None

        def draw(params, x_T, labels, key):
            x = solve(params, x_T, labels, key)
            return decode(x).astype(jnp.float32) if decode is not None else x

        def solve(params, x_T, labels, key):
            denoiser = make_denoiser(apply, params, process)
            if num_classes is None:
                return sample(denoiser, process, x_T, self.grid, solver=self.solver, prediction=prediction, key=key)
            if guidance_scale is None:
                return sample(denoiser, process, x_T, self.grid, solver=self.solver, prediction=prediction,
                              key=key, cond=labels)
            return sample(denoiser, process, x_T, self.grid, solver=self.solver, prediction=prediction, key=key,
                          cond=labels, uncond=jnp.full_like(labels, null), guidance_scale=guidance_scale)

        self._draw = jax.jit(draw)

    def __call__(self, params: Any, labels: np.ndarray | None, key: jax.Array, num: int | None = None,
                 offset: int = 0) -> np.ndarray:
        """Draw ``len(labels)`` (or ``num``, unconditional) samples; deterministic in ``key``: the start
        noise of sample ``offset + i`` is drawn from ``fold_in(split(key)[0], offset + i)``, so
        drawing in chunks (pass the running ``offset``) gives the same samples as drawing at once
        (stochastic solvers' step noise still depends on the batch). Returns numpy ``(N, H, W, C)`` float32."""
        if self.num_classes is not None:
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
        keys = jax.vmap(lambda i: jax.random.fold_in(k_start, i))(jnp.arange(padded) + offset)
        x_T = jax.vmap(lambda k: jax.random.normal(k, self.image_shape, jnp.float32))(keys) * self.process.prior_std
        labels = np.concatenate([labels, np.zeros((padded - n,), np.int32)])
        labels = jnp.asarray(labels)
        if self.mesh is not None:
            x_T = jax.device_put(x_T, batch_sharding(self.mesh, 4))
            labels = jax.device_put(labels, batch_sharding(self.mesh, 1))
            params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec())) \
                if not _is_on_mesh(params, self.mesh) else params
        out = self._draw(params, x_T, labels, k_solver)
        return np.asarray(jax.device_get(out))[:n]


def _is_on_mesh(tree, mesh) -> bool:
    leaves = jax.tree.leaves(tree)
    return all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh for x in leaves)
