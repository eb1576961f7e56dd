"""Cascaded diffusion with noise-conditioning augmentation (Ho, Saharia, Chan, Fleet, Norouzi, Salimans, "Cascaded
Diffusion Models for High Fidelity Image Generation", JMLR 2022; also Imagen and unCLIP).

A base model samples small images; each super-resolution model (a UNet with ``low_res_channels``: the
low-resolution image is upsampled and concatenated to its input) samples the next size conditioned on them.
Conditioning augmentation: during training the low-resolution input is corrupted,
``z_s = alpha(s) x_lr + sigma(s) eps`` with ``s`` drawn per example from ``[aug_min, aug_max]`` (times of the
model's own noise process), and ``s`` is an extra input (embedded like the time); at sampling time ``s`` is a
fixed, tunable level per stage. "Truncated" augmentation instead stops the stage below at time ``s`` and
passes its noisy ``x_s`` on.

- :func:`downsample`: the low-resolution image a super-resolution model is trained on (in the train step).
- :func:`augment` / :func:`training_condition`: the Gaussian augmentation, at sampling / training time.
- :class:`CascadeStage`, :func:`check_cascade`, :func:`cascade_samplers`, :func:`sample_cascade`: a base model then super-resolution
  models, each with its own :class:`~jaxdiff.sampling.SamplerSettings` and augmentation level.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel

AUG_KEY_TAG = 1     # fold_in tag of the sampling-time augmentation noise of a stage


def downsample(images: jax.Array, size: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, size, size, C)``: antialiased bicubic resize, which reproduces the data
    pipeline's Pillow bicubic resize to about 1/255 RMS on the digits (so a base model trained on data resized
    to ``size`` sees what the super-resolution model is conditioned on). ``H`` must be a multiple of ``size``."""
    b, h, w, c = images.shape
    if size < 1 or h % size or w % size:
        raise ValueError(f"low-resolution size {size} must divide the image size {h}x{w}")
    return jax.image.resize(images, (b, size, size, c), "cubic", antialias=True)


def augment(process, low_res: jax.Array, aug_level, noise: jax.Array) -> jax.Array:
    """Gaussian conditioning augmentation ``alpha(s) x + sigma(s) eps``; ``low_res``, ``noise``: ``(B, h, w, C)``,
    ``aug_level``: scalar or ``(B,)`` process times (0 = no corruption for processes with ``t_zero = 0``)."""
    s = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32).reshape(-1), low_res.shape[:1])[:, None, None, None]
    return process.alpha(s) * low_res + process.sigma(s) * noise


def training_condition(process, low_res_size: int, aug_min: float = 0.0,
                       aug_max: float = 0.0) -> Callable[[jax.Array, jax.Array], dict]:
    """``cond(key, images (B, H, W, C)) -> {"low_res": (B, s, s, C), "aug_level": (B,)}`` for a super-resolution
    train step: the batch downsampled to ``low_res_size``, augmented at a level drawn per example uniformly
    from ``[aug_min, aug_max]``; ``aug_level`` is that level as the network sees it (``process.model_time``)."""
    if not 0.0 <= aug_min <= aug_max <= process.t_max:
        raise ValueError(f"augmentation range [{aug_min}, {aug_max}] must satisfy 0 <= min <= max <= "
                         f"{process.t_max} (times of the noise process)")

    def cond(key, images):
        k_level, k_noise = jax.random.split(key)
        low = downsample(images.astype(jnp.float32), low_res_size)
        s = jax.random.uniform(k_level, low.shape[:1], jnp.float32, aug_min, aug_max)
        z = augment(process, low, s, jax.random.normal(k_noise, low.shape, jnp.float32))
        return {"low_res": z.astype(images.dtype), "aug_level": process.model_time(s)}
    return cond


@dataclasses.dataclass(frozen=True)
class CascadeStage:
    """One stage: a model, how to sample it, and (super-resolution stages) the augmentation level ``aug_level``
    (a process time in the model's trained ``aug_range``; None: the lower end of it) applied to the stage
    below's images. ``truncate=True``: truncated conditioning augmentation instead, the stage below stops its
    reverse process at ``aug_level`` and its noisy sample is passed on as it is."""

    model: SamplingModel
    settings: SamplerSettings | None = None
    aug_level: float | None = None
    truncate: bool = False

    @property
    def resolved_settings(self) -> SamplerSettings:
        """The stage's settings, or its model's defaults."""
        return self.settings if self.settings is not None else SamplerSettings.resolve(self.model.defaults)

    @property
    def level(self) -> float | None:
        """The augmentation level this stage is sampled with (None for the base stage)."""
        if self.model.low_res_shape is None:
            return None
        return self.model.aug_range[0] if self.aug_level is None else self.aug_level


def check_cascade(stages: Sequence[CascadeStage]) -> None:
    """ValueError naming the first problem: the first stage must be a base model and every later one a
    super-resolution model whose low-resolution input is the previous stage's output, whose augmentation
    level lies in its trained range, and which (truncated) shares its process with the stage below."""
    if not stages:
        raise ValueError("a cascade needs at least one stage")
    if stages[0].model.low_res_shape is not None:
        raise ValueError("the first stage of a cascade must be a base model, not a super-resolution model")
    for i, stage in enumerate(stages):
        m = stage.model
        if i == 0:
            if stage.aug_level is not None or stage.truncate:
                raise ValueError("stage 0 (the base model) takes no aug_level / truncate")
            continue
        below = stages[i - 1].model
        if m.low_res_shape is None:
            raise ValueError(f"stage {i} ({m.source or 'model'}) is not a super-resolution model (no low-res input)")
        if tuple(m.low_res_shape) != tuple(below.image_shape):
            raise ValueError(f"stage {i} ({m.source or 'model'}) takes {tuple(m.low_res_shape)} low-resolution "
                             f"images but stage {i - 1} ({below.source or 'model'}) makes {tuple(below.image_shape)}")
        m.check_aug_level(stage.level)
        if stage.truncate:
            if below.decode is not None:
                raise ValueError(f"stage {i}: truncated augmentation needs a pixel-space stage below, not a latent one")
            if type(below.process) is not type(m.process) or not np.allclose(
                    below.process.logsnr(jnp.linspace(0.05, 0.95, 7)), m.process.logsnr(jnp.linspace(0.05, 0.95, 7))):
                raise ValueError(f"stage {i}: truncated augmentation needs the stage below to use the same noise "
                                 "process (its x_s is passed on as z_s)")
            if stage.level <= below.process.t_min:
                raise ValueError(f"stage {i}: a truncated aug_level must exceed t_min={below.process.t_min} of the "
                                 "stage below (use truncate=False for no augmentation)")
            if stages[i - 1].resolved_settings.grid.startswith("learned:") or \
                    stages[i - 1].resolved_settings.grid == "optimized":
                raise ValueError(f"stage {i - 1}: a truncated stage below needs a hand-made grid (not optimized/learned)")


def _truncated_grid(stage: CascadeStage, t_end: float) -> np.ndarray:
    from jaxdiff.timesteps import make_grid
    s = stage.resolved_settings
    return np.asarray(make_grid(s.grid, stage.model.process, s.steps, t_end=t_end, final="t_min"), np.float64)


def cascade_samplers(stages: Sequence[CascadeStage], mesh=None) -> list[Sampler]:
    """One compiled :class:`~jaxdiff.sampling.Sampler` per stage (a truncated stage's lower neighbour gets the
    grid that stops at its level). Reusable across :func:`sample_cascade` calls whose stages differ only in
    the (non-truncated) augmentation levels, which are inputs of the compiled programs."""
    check_cascade(stages)
    samplers = []
    for i, st in enumerate(stages):
        nxt = stages[i + 1] if i + 1 < len(stages) else None
        grid = _truncated_grid(st, nxt.level) if nxt is not None and nxt.truncate else None
        samplers.append(Sampler(st.model, st.resolved_settings, mesh, grid=grid))
    return samplers


def sample_cascade(stages: Sequence[CascadeStage], labels: np.ndarray | None, num: int, seed: int = 0,
                   batch: int = 500, mesh=None, samplers: Sequence[Sampler] | None = None) -> list[np.ndarray]:
    """Run a cascade: ``num`` samples of every stage, ``[(num, H_0, W_0, C), (num, H_1, W_1, C), ...]`` float32
    (the last is the cascade's output). ``labels`` ``(num,)`` go to every class-conditional stage (None: none).
    Deterministic in ``seed`` and independent of ``batch`` (stage ``i`` draws from ``fold_in(key(seed), i)``;
    the augmentation noise of sample ``j`` from ``fold_in`` of that by ``j``). Everything is checked first.
    ``samplers``: those of :func:`cascade_samplers` for the same models and settings (None: built here)."""
    check_cascade(stages)
    if num < 1 or batch < 1:
        raise ValueError(f"num and batch must be positive, got {num}, {batch}")
    for st in stages:
        if st.model.params is None:
            raise ValueError(f"{st.model.source or 'a stage model'} has no parameters")
    if samplers is None:
        samplers = cascade_samplers(stages, mesh)
    elif len(samplers) != len(stages) or any(s.model is not st.model for s, st in zip(samplers, stages)):
        raise ValueError("samplers must be cascade_samplers of these stages' models, one per stage")
    key = jax.random.key(seed)
    outputs = [[] for _ in stages]
    for start in range(0, num, batch):
        n = min(batch, num - start)
        chunk_labels = None if labels is None else np.asarray(labels)[start:start + n]
        below = None
        for i, (st, sampler) in enumerate(zip(stages, samplers)):
            k = jax.random.fold_in(key, i)
            stage_labels = chunk_labels if st.model.num_classes else None
            kw = {}
            if i > 0:
                low = jnp.asarray(below)
                if not st.truncate:
                    k_aug = jax.random.fold_in(k, AUG_KEY_TAG)
                    noise = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(k_aug, j), low.shape[1:]))(
                        jnp.arange(n) + start)
                    low = augment(st.model.process, low, st.level, noise)
                kw = dict(low_res=np.asarray(low), aug_level=st.level)
            below = sampler(st.model.params, stage_labels, k, num=n, offset=start, **kw)
            outputs[i].append(below)
    return [np.concatenate(o) for o in outputs]
