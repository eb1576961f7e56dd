"""One SADM training step: the denoiser's update (denoising loss + weight x structural distance) and the
structure discriminator's update (maximising the same distance), computed from one state and applied
together, as one pure, jittable function.

Per step, on a batch ``x0 (B, ...)``, with ``t ~ time sampler``, ``eps ~ N(0, I)``,
``x_t = alpha x0 + sigma eps`` and ``pred = apply(params, x_t, model_time(t), labels, key)``:

* ``dsm_i = w(t_i) * mean((pred_i - target_i)^2)`` exactly as :func:`jaxdiff.losses.denoising_loss`
  (same key use, so a zero ``weight`` reproduces the diffusion task's step);
* ``x0_hat = to_x0_eps(pred)[0]``, the denoiser's clean estimate; ``d = structural_distance(
  encode(disc_params, x0), encode(disc_params, x0_hat))`` (:mod:`.structure`);
* denoiser: ``min mean(dsm) + weight * on * d``; discriminator: ``min -on * d`` with ``x0_hat`` held
  fixed, where ``on = step >= start`` (a ``jnp.where``: one compiled program for the whole run).

Both gradients come from the state before the step (the discriminator sees the estimates of the
denoiser before its update), as in the autoencoder's GAN step (``train_lib.autoencoder``). Flax enters
only through the ``apply`` and ``encode`` functions passed in.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdiff import losses, predictions
from jaxdiff.noise import NoiseProcess, broadcast_to_batch
from jaxdiff.research.sadm.structure import structural_distance
from jaxdiff.train_lib.state import skip_if_nonfinite
from jaxdiff.train_lib.step import drop_labels, ema_decay_at


@flax.struct.dataclass
class SADMTrainState:
    """Pure pytree carried through the SADM step (what a checkpoint holds).

    Attributes:
      step: int32 scalar, steps taken (each updates the denoiser and the discriminator once).
      params / ema_params / opt_state: the denoiser's parameters, their EMA, its optax state.
      disc_params / disc_opt_state: the structure discriminator's encoder parameters and optax state.
      rng: ``(2,)`` uint32 base key; step ``s`` uses ``fold_in(rng, s)``, so resuming needs no RNG state.
      bad_step: int32 scalar, -1 while every loss and gradient was finite, else the first step where one
        was not (that step's updates were skipped).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    disc_params: Any
    disc_opt_state: Any
    rng: jax.Array
    bad_step: jax.Array


def create_sadm_state(params: Any, disc_params: Any, optimizer: optax.GradientTransformation,
                      disc_optimizer: optax.GradientTransformation, seed: int) -> SADMTrainState:
    """A fresh state at step 0 (jit it with ``out_shardings`` to build it sharded)."""
    return SADMTrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                          disc_params=disc_params, disc_opt_state=disc_optimizer.init(disc_params),
                          rng=jax.random.key_data(jax.random.key(seed)), bad_step=jnp.full((), -1, jnp.int32))


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def make_sadm_step(apply: Callable[..., jax.Array], encode: Callable[[Any, jax.Array], jax.Array],
                   process: NoiseProcess, optimizer: optax.GradientTransformation,
                   disc_optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                   target: str = "v", time_sampling: str = "uniform", weighting: str = "simple",
                   time_params: dict | None = None, weight_params: dict | None = None,
                   weight: float = 0.1, temperature: float = 0.1, start: int = 0, ema_decay: float = 0.999,
                   conditional: bool = False, label_dropout: float = 0.0, null_class: int | None = None,
                   ) -> Callable[[SADMTrainState, dict], tuple[SADMTrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``, pure (jit it, donating the state).

    Args:
      apply: ``apply(params, x_t (B, ...), model_time (B,), labels (B,) | None, dropout_key) -> (B, ...)``
        prediction of ``target`` (``nn.functional.make_apply``, or the 2-D MLP of :mod:`.mixture`).
      encode: ``encode(disc_params, x (B, ...)) -> (B, F)`` discriminator features.
      process: the noise process; target / time_sampling / weighting / *_params: as
        :func:`jaxdiff.losses.make_denoising_loss` (checked here, before tracing).
      optimizer / disc_optimizer: optax transformations of the denoiser and the discriminator;
        schedule: the denoiser's learning rate (reported as ``lr``).
      weight: the structural term's weight (0: plain denoising, the discriminator is neither run nor
        updated); temperature: affinity temperature; start: first step with the structural term.
      conditional / label_dropout / null_class: class labels as in ``train_lib.step``.
    batch: ``{"image": (B, ...) float32, "label": (B,) int (conditional only)}``, ``B >= 3``.
    metrics (float32 scalars): ``loss`` (denoiser total), ``dsm``, ``structure`` (``d``; 0 when
      ``weight == 0``), ``on``, ``grad_norm``, ``disc_grad_norm``, ``lr``.
    """
    time_params, weight_params = dict(time_params or {}), dict(weight_params or {})
    losses.make_denoising_loss(process, target=target, time_sampling=time_sampling, weighting=weighting,
                               time_params=time_params, weight_params=weight_params)   # checks the names
    if weight < 0:
        raise ValueError(f"the structural weight must be >= 0, got {weight}")
    if temperature <= 0:
        raise ValueError(f"the affinity temperature must be > 0, got {temperature}")
    if label_dropout > 0 and null_class is None:
        raise ValueError("label dropout needs a null class (a class-conditional model)")
    draw_t = losses.time_sampler(time_sampling, process, **time_params)
    structured = weight > 0

    def denoiser_loss(params, disc_params, x0, labels, key, on):
        k_drop, k_loss, k_dropout = jax.random.split(key, 3)     # the key use of train_lib.step
        if conditional:
            labels = drop_labels(k_drop, labels, label_dropout, null_class)
        net_labels = labels if conditional else None
        k_t, k_eps = jax.random.split(k_loss)                    # ... and of losses.denoising_loss
        b = x0.shape[0]
        t = draw_t(k_t, b)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        tb = broadcast_to_batch(t, x0)
        x_t = (process.alpha(tb) * x0 + process.sigma(tb) * eps).astype(x0.dtype)
        pred = apply(params, x_t, process.model_time(t), net_labels, k_dropout)
        goal = predictions.from_x0_eps(x0, eps, target, x_t, t, process)
        err = jnp.mean(jnp.square(_flat(pred.astype(goal.dtype) - goal)), axis=1)
        dsm = jnp.mean(losses.loss_weight(weighting, process, t, target, **weight_params).astype(err.dtype) * err)
        if not structured:
            return dsm, (dsm, jnp.zeros((), jnp.float32), x0)
        x0_hat = predictions.to_x0_eps(pred, target, x_t, t, process)[0].astype(x0.dtype)
        d = structural_distance(encode(disc_params, x0), encode(disc_params, x0_hat), temperature)
        return dsm + weight * on * d, (dsm, d, x0_hat)

    grad_fn = jax.value_and_grad(denoiser_loss, has_aux=True)

    def disc_loss(disc_params, x0, x0_hat, on):
        return -on * structural_distance(encode(disc_params, x0), encode(disc_params, x0_hat), temperature)

    def step(state: SADMTrainState, batch: dict) -> tuple[SADMTrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        x0 = batch["image"]
        labels = batch.get("label") if conditional else None
        if labels is None:
            labels = jnp.zeros(x0.shape[:1], jnp.int32)
        on = jnp.where(state.step >= start, jnp.float32(1.0), jnp.float32(0.0))
        (loss, (dsm, d, x0_hat)), grads = grad_fn(state.params, state.disc_params, x0, labels, key, on)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        disc_grad_norm = jnp.zeros((), jnp.float32)
        if structured:
            d_grads = jax.grad(disc_loss)(state.disc_params, x0, jax.lax.stop_gradient(x0_hat), on)
            disc_grad_norm = optax.tree.norm(d_grads)
            d_updates, disc_opt_state = disc_optimizer.update(d_grads, state.disc_opt_state, state.disc_params)
            disc_params = optax.apply_updates(state.disc_params, d_updates)
        decay = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(disc_grad_norm)
        new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                            disc_params=disc_params, disc_opt_state=disc_opt_state)
        metrics = {"loss": loss.astype(jnp.float32), "dsm": dsm.astype(jnp.float32),
                   "structure": d.astype(jnp.float32), "on": on, "grad_norm": grad_norm.astype(jnp.float32),
                   "disc_grad_norm": disc_grad_norm.astype(jnp.float32),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        return skip_if_nonfinite(state, new, finite), metrics

    return step
