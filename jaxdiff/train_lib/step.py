"""One optimizer step of denoising training: classifier-free-guidance label dropout, gradient
accumulation over micro-batches, clipping and AdamW (in the optimizer), EMA, and a guard that skips any
update whose loss or gradient is not finite and records the step."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdiff.train_lib.state import TrainState, skip_if_nonfinite


LOW_RES_KEY_TAG = 7    # fold_in tag of a super-resolution step's augmentation key (other keys are unchanged)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with the usual warm-up, ``min(decay, (1 + step) / (10 + step))``."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, null_class) -> jax.Array:
    """Replace each label by ``null_class`` with probability ``rate`` (classifier-free guidance). (B,) -> (B,).

    Rows of a ``(B, ...)`` condition (e.g. caption tokens ``(B, S)``) are replaced whole by ``null_class``
    (broadcast to a row: the empty caption's tokens ``(S,)``)."""
    if rate <= 0:
        return labels
    drop = jax.random.uniform(key, labels.shape[:1]) < rate
    drop = drop.reshape(drop.shape + (1,) * (labels.ndim - 1))
    return jnp.where(drop, jnp.asarray(null_class, labels.dtype), labels)


def make_train_step(apply: Callable[..., jax.Array], loss_fn: Callable[..., jax.Array], optimizer,
                    schedule, *, grad_accum: int = 1, label_dropout: float = 0.0,
                    null_class: int | None = None, ema_decay: float = 0.999,
                    conditional: bool = True,
                    low_res_condition: Callable[[jax.Array, jax.Array], dict] | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)``, pure (jit it with donated state).

    Args:
      apply: ``apply(params, x (B,H,W,C), model_time (B,), labels (B,) | None, dropout_key) -> (B,H,W,C)``
        (``train_lib.model.make_apply``; the key draws dropout masks).
      loss_fn: ``loss_fn(apply_fn, x0, key, labels=...) -> (B,)`` (``losses.make_denoising_loss``).
      batch: ``{"image": (B,H,W,C) float32 in [-1, 1], "label": (B,) int}``; B divisible by ``grad_accum``.
      low_res_condition: super-resolution: ``(key, images (B,H,W,C)) -> {"low_res": ..., "aug_level": ...}``
        (``jaxdiff.cascade.training_condition``); the network's conditioning becomes that dict with
        ``"labels"`` added (``make_apply(condition="low_res")``). Its key is folded from the step's own.
    metrics: ``loss``, ``grad_norm`` (before clipping), ``lr``: float32 scalars.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if label_dropout > 0 and null_class is None:
        raise ValueError("label dropout needs a null class (a class-conditional model)")

    def micro_loss(params, images, labels, key):
        k_drop, k_loss, k_dropout = jax.random.split(key, 3)
        if conditional:
            labels = drop_labels(k_drop, labels, label_dropout, null_class)
        net_labels = labels if conditional else None
        if low_res_condition is not None:
            net_labels = {"labels": net_labels,
                          **low_res_condition(jax.random.fold_in(key, LOW_RES_KEY_TAG), images)}
        per_example = loss_fn(lambda x, t: apply(params, x, t, net_labels, k_dropout), images, k_loss)
        return jnp.mean(per_example)

    grad_fn = jax.value_and_grad(micro_loss)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        images = batch["image"]
        labels = batch.get("label") if conditional else None
        if labels is None:
            labels = jnp.zeros(images.shape[:1], jnp.int32)
        if grad_accum == 1:
            loss, grads = grad_fn(state.params, images, labels, key)
        else:
            b = images.shape[0]
            if b % grad_accum:
                raise ValueError(f"batch {b} is not divisible by grad_accum={grad_accum}")
            # micro-batch i = examples i, i+A, i+2A, ...: each device keeps its own rows
            split = lambda a: jnp.swapaxes(a.reshape((b // grad_accum, grad_accum) + a.shape[1:]), 0, 1)

            def body(carry, xs):
                loss_sum, grad_sum = carry
                i, im, lab = xs
                loss_i, g_i = grad_fn(state.params, im, lab, jax.random.fold_in(key, i))
                return (loss_sum + loss_i.astype(loss_sum.dtype), jax.tree.map(jnp.add, grad_sum, g_i)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                            (jnp.arange(grad_accum), split(images), split(labels)))
            loss = loss / grad_accum
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = skip_if_nonfinite(state, state.replace(step=state.step + 1, params=params, ema_params=ema,
                                                           opt_state=opt_state), finite)
        metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm.astype(jnp.float32),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        return new_state, metrics

    return train_step
