"""SingDiffusion (Zhang, Yin, Li, Xie, CVPR 2024): the sampling step from the singular time t = 1.

A process with non-zero terminal SNR (Stable Diffusion's scaled-linear schedule: abar_T = 0.0047) trains
its network on x_T that still carries the data's low frequencies (above all the image's mean brightness),
but samplers start from zero-mean noise, so samples drift toward mid-grey. At the true pure-noise point
t = 1 (alpha = 0), x_1 is independent of x_0 and the data prediction E[x_0 | x_1, c] is E[x_0 | c]: finite
when conditioned (the "conditionally removable" singularity). SingDiffusion learns it with a separate,
time-free network f(x_1, c) (the base model stays frozen and untouched) and takes one DDIM step from t = 1
to the solver's first grid time t_0:

    x_{t_0} = alpha(t_0) f(x_1, c) + sigma(t_0) x_1 / prior_std,            x_1 ~ N(0, prior_std^2 I)

after which any jaxdiff solver runs unchanged from t_0 (the official pipeline hands these latents to the
base pipeline, ``SingDiffusionPipeline.__call__``). Under classifier-free guidance the module's two branches
are combined as in the official code, ``(f_u + g (f_c - f_u)) / g`` (normalised by g).

The network is the project's :class:`jaxdiff.nn.UNet` called with a fixed dummy time (the official code
removes the time projections and passes a tensor of ones): a constant time embedding is only a learned
bias, so the function depends on x_1 and c alone. Training minimises ``E ||f(x_1, c) - x_0||^2`` with
x_1 ~ N(0, I) drawn independently of x_0 (the official repository ships inference only; this objective
follows from the output being "y_bar", the data prediction at t = 1); its optimum is E[x_0 | c], the class
mean (checked in tests/test_singdiffusion.py).

    base = restore_run(workdir).sampling_model                          # any class-conditional model
    module = train_module(base, images, labels, steps=600, data="digits/16")
    save_module(module, "sing.npz"); module = load_module("sing.npz")
    images = sample_images(Sampler(with_singdiffusion(base, module), settings), labels, num, seed, batch)

``singdiffusion_start`` is the same first step for callers of ``jaxdiff.sample`` directly.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdiff.nn import UNet, UNetConfig
from jaxdiff.nn.functional import make_apply, split_model
from jaxdiff.noise import NoiseProcess
from jaxdiff.sampling import SamplingModel
from jaxdiff.train_lib.state import create_state
from jaxdiff.train_lib.step import make_train_step

FORMAT = "jaxdiff.singdiffusion/1"
_META = "__singdiffusion_spec__"
DUMMY_TIME = 1.0          # the fixed time input (the official code passes ones)


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """What a SingDiffusion module was built for, and its network.

    Attributes:
      shape: ``(H, W, C)`` of the space the base model samples (pixels, or latents of latent diffusion).
      num_classes: classes of the class-conditional base (None: unconditional).
      class_null: the module has a null class (trained with label dropout), needed under guidance.
      data: a name of the data space (e.g. ``"digits/16"`` or an autoencoder's workdir); checked when given
        on both sides.
      channels, layers_per_block, norm_groups: the time-free UNet (a small DDPM-style UNet without attention).
    """

    shape: tuple[int, int, int]
    num_classes: int | None = None
    class_null: bool = False
    data: str = ""
    channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    norm_groups: int = 8

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (H, W, C) of positive sizes, got {self.shape}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {self.num_classes}")
        if self.class_null and not self.num_classes:
            raise ValueError("class_null needs num_classes (a class-conditional module)")
        f = 2 ** (len(self.channels) - 1)
        if self.shape[0] % f or self.shape[1] % f:
            raise ValueError(f"shape {self.shape[:2]} is not divisible by {f}, the downsampling of "
                             f"{len(self.channels)} UNet levels")

    def unet_config(self) -> UNetConfig:
        """The :class:`UNetConfig` of the module's network (input and output: ``shape``'s channels)."""
        n = len(self.channels)
        return UNetConfig(in_channels=self.shape[2], out_channels=self.shape[2], block_out_channels=self.channels,
                          layers_per_block=self.layers_per_block, down_attention=(None,) * n,
                          mid_attention=None, norm_num_groups=self.norm_groups, num_classes=self.num_classes,
                          class_null=self.class_null)

    def to_json(self) -> str:
        return json.dumps(dict(dataclasses.asdict(self), format=FORMAT))

    @classmethod
    def from_json(cls, text: str) -> "ModuleSpec":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a SingDiffusion module spec (format {FORMAT!r} expected)")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SingDiffusionModule:
    """A time-free network ``apply(params, x_1 (B,H,W,C), labels (B,) | None) -> x_0 prediction (B,H,W,C)``
    float32 with its ``params`` and :class:`ModuleSpec`."""

    spec: ModuleSpec
    apply: Callable[..., jax.Array]
    params: Any


def _network(spec: ModuleSpec, seed: int):
    """``(net, params)``: the UNet as ``net(params, x, time, labels, dropout_key=None)`` and fresh parameters."""
    graphdef, params, rest = split_model(UNet(spec.unet_config(), rngs=nnx.Rngs(seed)))
    return make_apply(graphdef, rest), nnx.to_pure_dict(params)


def build_module(spec: ModuleSpec, seed: int = 0) -> SingDiffusionModule:
    """A freshly initialised module for ``spec`` (parameters from ``seed``)."""
    net, params = _network(spec, seed)

    def apply(params, x1, labels=None):
        t = jnp.full((x1.shape[0],), DUMMY_TIME, jnp.float32)
        return net(params, x1, t, labels).astype(jnp.float32)
    return SingDiffusionModule(spec, apply, params)


def module_loss(apply_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, key: jax.Array) -> jax.Array:
    """The module's objective per example, ``(B,)``: ``mean_pixels (f(x_1) - x_0)^2`` with x_1 ~ N(0, I)
    independent of x_0 (``apply_fn(x (B,H,W,C), time (B,)) -> (B,H,W,C)``; the time is ignored by a
    time-free module). Minimised by E[x_0 | condition]."""
    x1 = jax.random.normal(key, x0.shape, x0.dtype)
    pred = apply_fn(x1, jnp.full((x0.shape[0],), DUMMY_TIME, x0.dtype))
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - x0.astype(jnp.float32)).reshape(x0.shape[0], -1), axis=1)


def fit(apply: Callable[..., jax.Array], params: Any, loss_fn: Callable[..., jax.Array], images: np.ndarray,
        labels: np.ndarray | None, *, steps: int, batch: int, lr: float = 1e-3, seed: int = 0,
        label_dropout: float = 0.0, null_class: int | None = None, ema_decay: float = 0.999,
        warmup: int = 50) -> tuple[Any, list[float]]:
    """Train ``params`` on in-memory data with the library's step (``train_lib.step.make_train_step``:
    AdamW with warm-up and cosine decay, clipping at 1, EMA, label dropout, non-finite guard).

    ``apply(params, x, model_time, labels, dropout_key) -> (B,H,W,C)``; ``loss_fn(apply_fn, x0, key) -> (B,)``;
    ``images (N, H, W, C)`` float in [-1, 1], ``labels (N,)`` int or None. Batch ``k`` is drawn from
    ``default_rng((seed, k))``. Returns ``(EMA parameters, per-step losses)``.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if labels is not None and np.shape(labels) != (len(images),):
        raise ValueError(f"labels must be ({len(images)},), got {np.shape(labels)}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be positive, got {steps}, {batch}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1) if steps > 1 else 0,
                                                  max(steps, 2), end_value=0.1 * lr)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    step = jax.jit(make_train_step(apply, loss_fn, optimizer, schedule, label_dropout=label_dropout,
                                   null_class=null_class, ema_decay=ema_decay, conditional=labels is not None),
                   donate_argnums=0)
    state = create_state(jax.tree.map(jnp.copy, params), optimizer, seed)   # the step donates its state
    losses = []
    for k in range(steps):
        idx = np.random.default_rng((seed, k)).integers(0, len(images), batch)
        b = {"image": images[idx]}
        if labels is not None:
            b["label"] = np.asarray(labels, np.int32)[idx]
        state, metrics = step(state, b)
        losses.append(metrics["loss"])
    if int(state.bad_step) >= 0:
        raise FloatingPointError(f"non-finite loss or gradient at step {int(state.bad_step)}")
    return state.ema_params, [float(v) for v in jax.device_get(losses)]


def train_module(base: SamplingModel, images: np.ndarray, labels: np.ndarray | None = None, *, data: str = "",
                 steps: int = 600, batch: int = 64, lr: float = 1e-3, seed: int = 0, label_dropout: float = 0.0,
                 channels: tuple[int, ...] = (16, 32)) -> SingDiffusionModule:
    """Train a SingDiffusion module for the frozen ``base`` on its own training data.

    ``images``: ``(N, *base.shape)`` in the space the base samples (latents for latent diffusion), in [-1, 1];
    ``labels``: ``(N,)`` for a class-conditional base (None otherwise). ``label_dropout > 0`` trains a null
    class too (for guided sampling). Raises ValueError naming a mismatch before any training.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != tuple(base.shape):
        raise ValueError(f"images must be (N, {', '.join(map(str, base.shape))}) like the base model's samples, "
                         f"got shape {images.shape}")
    if base.context_shape is not None:
        raise ValueError("text/context-conditioned bases are not supported by this SingDiffusion module "
                         "(class-conditional or unconditional only)")
    if (base.num_classes is None) != (labels is None):
        raise ValueError("pass labels exactly when the base model is class-conditional "
                         f"(base num_classes={base.num_classes})")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= base.num_classes:
            raise ValueError(f"labels must be ({len(images)},) ints in [0, {base.num_classes})")
    if label_dropout and base.num_classes is None:
        raise ValueError("label_dropout needs a class-conditional base")
    spec = ModuleSpec(tuple(base.shape), base.num_classes, bool(label_dropout), data, tuple(channels))
    module = build_module(spec, seed)
    net, _ = _network(spec, seed)
    params, _ = fit(net, module.params, module_loss, images, labels, steps=steps, batch=batch, lr=lr, seed=seed,
                    label_dropout=label_dropout, null_class=spec.num_classes if label_dropout else None)
    return dataclasses.replace(module, params=params)


# ----------------------------------------------------------------------------------------------------
# The first step, and the plug-in into SamplingModel / Sampler
# ----------------------------------------------------------------------------------------------------

def module_prediction(module: SingDiffusionModule, params: Any, x1: jax.Array, labels: jax.Array | None = None,
                      guidance_scale: float | None = None) -> jax.Array:
    """``y (B,H,W,C)``: the module's data prediction at t = 1 for ``x1 (B,H,W,C)`` (standard normal) and
    ``labels (B,)``; with ``guidance_scale`` g > 1 the official normalised guidance ``(y_u + g (y_c - y_u)) / g``
    (the null class as the unconditional branch)."""
    y = module.apply(params, x1, labels)
    if guidance_scale is None or guidance_scale <= 1:
        return y
    if not module.spec.class_null:
        raise ValueError("guidance_scale > 1 needs a module trained with label_dropout (a null class)")
    y_u = module.apply(params, x1, jnp.full_like(labels, module.spec.num_classes))
    return (y_u + guidance_scale * (y - y_u)) / guidance_scale


def first_step(process: NoiseProcess, x_T: jax.Array, y: jax.Array, t0) -> jax.Array:
    """The DDIM step from t = 1 (alpha = 0) to ``t0``: ``alpha(t0) y + sigma(t0) x_T / prior_std``.

    ``x_T (B,...)``: the prior draw (std ``process.prior_std``, as samplers draw it); ``y (B,...)``: the data
    prediction at t = 1; ``t0``: scalar, the solver grid's first time. Returns ``(B,...)`` like ``x_T``."""
    t0 = jnp.asarray(t0)
    eps = x_T / process.prior_std
    return (process.alpha(t0) * y + process.sigma(t0) * eps).astype(x_T.dtype)


def singdiffusion_start(module: SingDiffusionModule, process: NoiseProcess, x_T: jax.Array, t0,
                        labels: jax.Array | None = None, guidance_scale: float | None = None,
                        params: Any = None) -> jax.Array:
    """x at the grid's first time ``t0`` from the prior draw ``x_T (B,H,W,C)``: pass the result as ``x_T`` of
    ``jaxdiff.sample(denoiser, process, x, grid)`` with ``grid[0] == t0``. ``params``: default the module's."""
    check_shape(module.spec, tuple(x_T.shape[1:]))
    params = module.params if params is None else params
    y = module_prediction(module, params, x_T / process.prior_std, labels, guidance_scale)
    return first_step(process, x_T, y, t0)


def check_shape(spec: ModuleSpec, shape: tuple[int, ...]) -> None:
    """ValueError unless ``shape`` (H, W, C) is the one the module was trained for."""
    if tuple(shape) != spec.shape:
        raise ValueError(f"this SingDiffusion module was trained for samples of shape {spec.shape} "
                         f"(H, W, C), not {tuple(shape)}: train a module for this model's resolution and space")


def check_compatible(module: SingDiffusionModule, model: SamplingModel, *, data: str | None = None,
                     guidance_scale: float | None = None) -> None:
    """ValueError naming the mismatch unless ``module`` can start ``model``'s sampler: same sample shape,
    same classes (and a null class under guidance), same data space name when both are known."""
    spec = module.spec
    check_shape(spec, tuple(model.shape))
    if model.context_shape is not None:
        raise ValueError("this SingDiffusion module has no context input; the model is context-conditioned")
    if spec.num_classes != model.num_classes:
        raise ValueError(f"this SingDiffusion module was trained for a model with num_classes={spec.num_classes}, "
                         f"not {model.num_classes}")
    if data and spec.data and data != spec.data:
        raise ValueError(f"this SingDiffusion module was trained on data {spec.data!r}, not {data!r}")
    if guidance_scale is not None and guidance_scale > 1 and not spec.class_null:
        raise ValueError("guidance_scale > 1 needs a module trained with label_dropout (a null class)")


def with_singdiffusion(model: SamplingModel, module: SingDiffusionModule, *, data: str | None = None,
                       guidance_scale: float | None = None) -> SamplingModel:
    """``model`` whose samplers take SingDiffusion's first step before their solver: a
    :class:`SamplingModel` with ``params = {"base": ..., "singdiffusion": ...}`` and a ``start`` hook, so any
    solver, grid and step count of :class:`jaxdiff.sampling.Sampler` composes with it unchanged.

    ``guidance_scale``: the module's own guidance (official: the sampler's scale); ``data``: the model's data
    space name, checked against the module's. Raises ValueError for a module of another model or resolution.
    """
    check_compatible(module, model, data=data, guidance_scale=guidance_scale)
    if model.start is not None:
        raise ValueError("the model already has a start step")
    base_apply, base_decode, process = model.apply, model.decode, model.process

    def apply(params, x, model_time, cond=None):
        return base_apply(params["base"], x, model_time, cond)

    def start(params, x_T, labels, t0):
        labels = labels if module.spec.num_classes else None
        y = module_prediction(module, params["singdiffusion"], x_T / process.prior_std, labels, guidance_scale)
        return first_step(process, x_T, y, t0)

    decode = base_decode
    if base_decode is not None and model.decode_params:
        def decode(z, params):
            return base_decode(z, params["base"])
    params = {"base": model.params, "singdiffusion": module.params}
    return dataclasses.replace(model, apply=apply, params=params, start=start, decode=decode,
                               source=f"{model.source} + SingDiffusion")


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def save_module(module: SingDiffusionModule, path: str | os.PathLike) -> None:
    """Write the module's spec and float32 parameters to a compressed ``.npz``."""
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v, np.float32)
            for p, v in jax.tree_util.tree_flatten_with_path(module.params)[0]}
    np.savez_compressed(path, **flat, **{_META: np.asarray(module.spec.to_json())})


def load_module(path: str | os.PathLike) -> SingDiffusionModule:
    """Read a module written by :func:`save_module`. FileNotFoundError if absent; ValueError if the file is not
    a SingDiffusion module or its parameters do not fit the network its spec describes."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no SingDiffusion module file at {path!r}")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    if _META not in data:
        raise ValueError(f"{path!r} is not a SingDiffusion module file (no spec)")
    module = build_module(ModuleSpec.from_json(str(data.pop(_META))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(module.params)
    values = []
    for p, v in leaves:
        name = jax.tree_util.keystr(p, simple=True, separator="/")
        if name not in data or data[name].shape != v.shape:
            raise ValueError(f"{path!r}: parameter {name!r} is missing or has the wrong shape for its spec")
        values.append(jnp.asarray(data[name]))
    return dataclasses.replace(module, params=jax.tree_util.tree_unflatten(treedef, values))
