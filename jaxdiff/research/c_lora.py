"""C-LoRA (Smith et al., "Continual Diffusion", arXiv 2304.06027): continual customization of a
token-conditioned diffusion model with low-rank adapters on the cross-attention K/V projections and a
self-regularization that penalizes the new adapter where past adapters already changed the weights.

Task ``t`` learns a new concept: a fresh random token embedding and a fresh rank-``r`` LoRA on every
``attn2.to_k`` / ``attn2.to_v`` (the projections of the token features), trained with the denoising loss plus

    lambda * sum_layers || |W_{t-1} - W_init|  (.)  (scale * A_t B_t) ||_F^2

where ``W_{t-1} - W_init`` is the sum of the past tasks' (folded) deltas. After the task the adapter is folded
into the weights (:func:`jaxdiff.nn.lora.merge_lora` + ``strip_lora``). ``lam = 0`` is plain sequential LoRA.

The model here is a :class:`jaxdiff.nn.UNet` with cross-attention whose context is ``[prefix, token]``
(``(B, 2, D)``): a shared learned prefix (``"a photo of"``) and one concept token (no class noun), see
:func:`make_context`.
"""
from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdiff import losses
from jaxdiff.nn import UNet
from jaxdiff.nn.lora import LORA_PARAMS, LoRASpec, add_lora, adaptable_layers, lora_layers, merge_lora, strip_lora

KV_PATTERN = r".*\.attn2\.to_(k|v)"
TOKEN_INITS = ("random", "class_mean")


def initial_token(kind: str, key: jax.Array, shape: tuple, *, std: float = 1.0,
                  class_tokens: jax.Array | None = None) -> jax.Array:
    """A new concept's start token ``shape`` (``(D,)``): ``"random"``: ``std * N(0, 1)`` (C-LoRA's choice);
    ``"class_mean"``: the mean of the pretrained class tokens ``class_tokens`` ``(K, D)`` (without the null
    token), the stand-in for a class noun ("digit") here."""
    if kind not in TOKEN_INITS:
        raise ValueError(f"token_init must be one of {TOKEN_INITS}, got {kind!r}")
    if kind == "random":
        return std * jax.random.normal(key, shape, jnp.float32)
    if class_tokens is None or class_tokens.ndim != 2 or class_tokens.shape[1:] != tuple(shape):
        raise ValueError(f"token_init 'class_mean' needs class_tokens (K, {shape[0]}), got "
                         f"{None if class_tokens is None else class_tokens.shape}")
    return jnp.mean(jnp.asarray(class_tokens, jnp.float32), axis=0)


def make_context(prefix: jax.Array, tokens: jax.Array) -> jax.Array:
    """Context ``(B, 2, D)`` = ``[prefix, token_b]``. ``prefix``: ``(D,)``; ``tokens``: ``(B, D)``."""
    return jnp.stack([jnp.broadcast_to(prefix, tokens.shape), tokens], axis=1)


def kv_kernels(model: UNet) -> dict[str, jax.Array]:
    """``{dotted path: kernel (in, out)}`` of the cross-attention K/V projections (copies as float32)."""
    return {k: jnp.array(m.kernel[...], jnp.float32) for k, m in adaptable_layers(model).items()
            if re.fullmatch(KV_PATTERN, k)}


def forget_penalty(model: UNet, past_delta: dict[str, jax.Array]) -> jax.Array:
    """C-LoRA's self-regularization ``sum_l || |P_l| * delta_l ||_F^2`` (scalar) of ``model``'s current adapters
    (``delta_l = scale * A B``, ``(in, out)``) against the past deltas ``P_l`` (same paths and shapes)."""
    layers = lora_layers(model)
    missing = sorted(set(past_delta) - set(layers))
    if missing:
        raise ValueError(f"forget_penalty: no adapter on {missing[:3]}")
    return sum(jnp.sum(jnp.square(jnp.abs(p) * layers[k].delta())) for k, p in past_delta.items())


@dataclasses.dataclass
class FitSettings:
    """How one concept is learned: ``steps`` Adam steps at ``lr`` on batches of ``batch`` of the concept's
    images; ``lam`` weighs :func:`forget_penalty`; ``token_init`` (:data:`TOKEN_INITS`) picks the new token's
    start value, ``token_std`` scales the random one."""

    steps: int = 150
    lr: float = 3e-3
    batch: int = 20
    lam: float = 0.0
    rank: int = 2
    token_std: float = 1.0
    token_init: str = "random"


def _trainable_kv(path, value) -> bool:
    return isinstance(value, nnx.Param) and re.fullmatch(KV_PATTERN + r"\.kernel", ".".join(map(str, path))) is not None


def fit_concept(model: UNet, prefix: jax.Array, images: np.ndarray, loss_fn: Callable, settings: FitSettings,
                key: jax.Array, *, mode: str = "lora", w_init: dict | None = None,
                class_tokens: jax.Array | None = None) -> jax.Array:
    """Learn one concept in place; returns its token ``(D,)``.

    ``images``: ``(N, H, W, C)`` in [-1, 1]. ``mode``: ``"lora"`` (a fresh adapter on K/V, trained, then folded
    into the weights; with ``settings.lam > 0`` and ``w_init`` (the K/V kernels before the first task) the
    C-LoRA penalty applies) or ``"full_kv"`` (the K/V kernels themselves are trained). The token is trained
    in both modes; everything else stays frozen. ``class_tokens`` ``(K, D)``: the pretrained class tokens, for
    ``settings.token_init == "class_mean"``.
    """
    if mode not in ("lora", "full_kv"):
        raise ValueError(f"mode must be 'lora' or 'full_kv', got {mode!r}")
    if settings.lam > 0 and (mode != "lora" or w_init is None):
        raise ValueError("the C-LoRA penalty needs mode='lora' and w_init (the K/V kernels before task 1)")
    k_init, k_tok, k_fit = jax.random.split(key, 3)
    token = initial_token(settings.token_init, k_tok, prefix.shape, std=settings.token_std, class_tokens=class_tokens)
    if mode == "lora":
        add_lora(model, LoRASpec(targets=(KV_PATTERN,), rank=settings.rank), rngs=nnx.Rngs(int(jax.random.randint(k_init, (), 0, 2 ** 30))))
        # the past deltas are an argument of the compiled step even at lam = 0 (zeros without w_init), so
        # sequential LoRA, C-LoRA and per-task LoRA share one compiled program
        past = {k: kernel - (w_init[k] if w_init is not None else kernel) for k, kernel in kv_kernels(model).items()}
        graphdef, train, frozen = nnx.split(model, LORA_PARAMS, ...)
    else:
        graphdef, train, frozen = nnx.split(model, _trainable_kv, ...)
        past = None
    params = (nnx.to_pure_dict(train), token)
    frozen_values = nnx.to_pure_dict(frozen)
    opt_state = _ADAM.init(params)
    images = jnp.asarray(images)
    for i in range(settings.steps):
        params, opt_state = _fit_step(params, opt_state, frozen_values, past, prefix, images, k_fit, i,
                                      settings.lam, settings.lr, graphdef=graphdef, loss_fn=loss_fn,
                                      batch=settings.batch)
    nnx.replace_by_pure_dict(train, params[0])
    nnx.update(model, train)
    if mode == "lora":
        merge_lora(model)
        strip_lora(model)
    return params[1]


_ADAM = optax.scale_by_adam()


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "batch"))
def _fit_step(params, opt_state, frozen, past, prefix, images, key, i, lam, lr, *, graphdef, loss_fn, batch):
    """One Adam step of :func:`fit_concept` on ``(trainable pure dict, token)``; compiled once per model
    structure and reused by every task (the task's values are arguments, not constants)."""
    k = jax.random.fold_in(key, i)
    n = images.shape[0]
    idx = jax.random.choice(jax.random.fold_in(k, 1), n, (batch,), replace=n < batch)
    x0 = images[idx]

    def objective(p):
        net = nnx.merge(graphdef, nnx.State(p[0]), nnx.State(frozen))
        ctx = make_context(prefix, jnp.broadcast_to(p[1], (x0.shape[0],) + p[1].shape))
        loss = jnp.mean(loss_fn(lambda x, t: net(x, t, ctx), x0, k))
        if past is not None:
            loss = loss + lam * forget_penalty(net, past)
        return loss

    g = jax.grad(objective)(params)
    updates, opt_state = _ADAM.update(g, opt_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), opt_state


def make_loss(process, target: str = "v") -> Callable:
    """The denoising loss ``loss(apply_fn, x0, key) -> (B,)`` of :mod:`jaxdiff.losses` used for every task."""
    return losses.make_denoising_loss(process, target=target)


def accuracy_matrix_summary(acc: np.ndarray) -> dict:
    """Continual-learning summary of ``acc[t, j]`` (accuracy on concept ``j`` after task ``t``; NaN for
    ``j > t``), ``(T, T)``: ``average_accuracy`` (mean over concepts after the last task), ``forgetting``
    (mean over ``j < T-1`` of ``max_{t<T-1} acc[t, j] - acc[T-1, j]``) and ``plasticity`` (mean of the
    diagonal: each concept right after it was learned)."""
    acc = np.asarray(acc, np.float64)
    t_last = acc.shape[0] - 1
    forgetting = [np.nanmax(acc[j:t_last, j]) - acc[t_last, j] for j in range(t_last)]
    return {"average_accuracy": float(np.nanmean(acc[t_last])),
            "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
            "plasticity": float(np.mean(np.diag(acc)))}


def pretrain(model: UNet, tokens: jax.Array, prefix: jax.Array, images: np.ndarray, labels: np.ndarray,
             loss_fn: Callable, *, steps: int, batch: int, lr: float, key: jax.Array,
             label_dropout: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """Train every parameter of ``model`` (in place), the class tokens ``(K + 1, D)`` (row ``K``: the null
    token, swapped in with probability ``label_dropout``) and the prefix ``(D,)`` on ``images (N, H, W, C)``
    with ``labels (N,)`` in ``[0, K)``; returns ``(tokens, prefix)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p = (nnx.to_pure_dict(params), tokens, prefix)
    rest_values = nnx.to_pure_dict(rest)
    null = tokens.shape[0] - 1
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    s = opt.init(p)
    data_x, data_y = jnp.asarray(images), jnp.asarray(labels, jnp.int32)

    def objective(p, x0, y, k):
        net = nnx.merge(graphdef, nnx.State(p[0]), nnx.State(rest_values))
        y = jnp.where(jax.random.uniform(jax.random.fold_in(k, 7), y.shape) < label_dropout, null, y)
        ctx = make_context(p[2], p[1][y])
        return jnp.mean(loss_fn(lambda x, t: net(x, t, ctx), x0, k))

    @jax.jit
    def step(p, s, i):
        k = jax.random.fold_in(key, i)
        idx = jax.random.choice(jax.random.fold_in(k, 1), data_x.shape[0], (batch,))
        loss, g = jax.value_and_grad(objective)(p, data_x[idx], data_y[idx], k)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    for i in range(steps):
        p, s, loss = step(p, s, i)
    nnx.replace_by_pure_dict(params, p[0])
    nnx.update(model, params)
    return p[1], p[2]
