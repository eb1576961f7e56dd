"""Training the first-stage autoencoder of latent diffusion: the CompVis recipe (taming-transformers'
``VQLPIPSWithDiscriminator``, latent-diffusion's ``LPIPSWithDiscriminator``) as one pure, jittable step.

Per step, on a batch ``x (B, H, W, C)`` in ``[-1, 1]``, with ``x_rec, aux = AE(x)``:

* reconstruction map ``r = |x - x_rec|`` (or squared) ``+ perceptual_weight * LPIPS(x, x_rec)``
  (the per-image LPIPS broadcast over pixels, as the reference adds a ``(B, 1, 1, 1)`` tensor);
  ``nll = sum(r) / B`` for ``kind="kl"`` (latent-diffusion; its learned log-variance ``logvar`` stays at
  its init 0 because ``configure_optimizers`` does not hand it to the optimizer), ``nll = mean(r)`` for
  ``kind="vq"`` (taming);
* regulariser: ``kl_weight * sum_b KL(q(z|x_b) || N(0, I)) / B`` (``kl``), or
  ``codebook_weight * codebook_loss`` (``vq``: the quantiser's codebook + commitment loss);
* ``g_loss = -mean D(x_rec)``, adaptive weight
  ``lambda = clip(||d nll / d W_last|| / (||d g_loss / d W_last|| + 1e-4), 0, 1e4) * disc_weight``
  with ``W_last`` the decoder's last conv kernel (a constant: no gradient flows through it), and
  ``f = disc_factor if step >= disc_start else 0``;
* generator loss ``nll + reg + lambda * f * g_loss`` (gradient to the AE parameters only);
* discriminator loss ``f * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(sg(x_rec))))`` (hinge;
  gradient to the discriminator parameters only).

Both updates are computed from the same state and applied together: the discriminator sees the
reconstructions of the generator *before* its update (the PyTorch Lightning loop recomputes them after
the generator step; the difference is one step of staleness and saves a forward pass). ``f`` is a
``jnp.where`` on the step, so one compiled program serves the whole run; before ``disc_start`` the GAN
terms are exactly zero (and Adam leaves the discriminator unchanged on zero gradients).

The gradient is computed with one forward pass of the autoencoder and one full backward pass:
the losses are differentiated w.r.t. ``x_rec`` first; the two last-layer gradients the adaptive weight
needs are pulled back through the autoencoder's VJP, of which XLA keeps only the last conv's part.

Flax enters only through the ``apply`` functions passed in.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.train_lib.state import skip_if_nonfinite
from jaxdiff.train_lib.step import ema_decay_at

KINDS = ("kl", "vq")
REC_LOSSES = ("l1", "l2")
#: the decoder's last conv kernel in jaxdiff's AutoencoderKL / VQModel parameter trees
DEFAULT_LAST_LAYER = ("decoder", "conv_out", "kernel")


@flax.struct.dataclass
class AutoencoderTrainState:
    """Pure pytree carried through the autoencoder train step.

    Attributes:
      step: int32 scalar, steps taken (each is one generator and one discriminator update).
      params: the autoencoder's parameters (nested dict of arrays).
      disc_params: the discriminator's parameters.
      opt_state / disc_opt_state: the two optax states.
      ema_params: exponential moving average of ``params``.
      rng: ``(2,)`` uint32 base key; step ``s`` uses ``fold_in(rng, s)`` (posterior sampling).
      bad_step: int32 scalar, -1 while every loss and gradient was finite, else the first step where
        one was not (that step's updates were skipped).
    """

    step: jax.Array
    params: Any
    disc_params: Any
    opt_state: Any
    disc_opt_state: Any
    ema_params: Any
    rng: jax.Array
    bad_step: jax.Array


def create_autoencoder_state(params: Any, disc_params: Any, gen_opt: optax.GradientTransformation,
                             disc_opt: optax.GradientTransformation, seed: int) -> AutoencoderTrainState:
    """A fresh state at step 0."""
    return AutoencoderTrainState(
        step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
        opt_state=gen_opt.init(params), disc_opt_state=disc_opt.init(disc_params),
        ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key_data(jax.random.key(seed)),
        bad_step=jnp.full((), -1, jnp.int32))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``, a float32 scalar."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def adaptive_weight(nll_grad: Any, g_grad: Any, disc_weight: float) -> jax.Array:
    """``clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) * disc_weight`` (global L2 norms of the two
    gradients w.r.t. the last layer), with no gradient of its own."""
    w = optax.tree.norm(nll_grad) / (optax.tree.norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight).astype(jnp.float32)


def disc_factor_at(step: jax.Array, disc_start: int, disc_factor: float) -> jax.Array:
    """``disc_factor`` once ``step >= disc_start``, else 0 (float32 scalar)."""
    return jnp.where(step >= disc_start, jnp.float32(disc_factor), jnp.float32(0.0))


def select_leaf(tree: Any, path: Sequence | Callable[[Any], Any]) -> Any:
    """``tree[path[0]][path[1]]...`` (dict keys or list indices), or ``path(tree)`` when callable.

    Raises ``KeyError`` naming the first missing key and the keys available at that level.
    """
    if callable(path):
        return path(tree)
    node = tree
    for i, k in enumerate(path):
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            keys = list(node.keys()) if hasattr(node, "keys") else type(node).__name__
            raise KeyError(f"last_layer_path {tuple(path)!r}: no {k!r} under {tuple(path[:i])!r} "
                           f"(available: {keys})") from None
    return node


def _pixel_loss(x: jax.Array, y: jax.Array, kind: str) -> jax.Array:
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.abs(d) if kind == "l1" else jnp.square(d)


def make_autoencoder_step(ae_apply: Callable, disc_apply: Callable, lpips_fn: Callable | None,
                          gen_opt: optax.GradientTransformation, disc_opt: optax.GradientTransformation, *,
                          kind: str = "kl", rec_loss: str = "l1", kl_weight: float = 1e-6,
                          codebook_weight: float = 1.0, perceptual_weight: float = 1.0, disc_start: int,
                          disc_weight: float = 0.5, disc_factor: float = 1.0, ema_decay: float = 0.999,
                          last_layer_path: Sequence | Callable[[Any], Any] = DEFAULT_LAST_LAYER,
                          ) -> Callable[[AutoencoderTrainState, dict], tuple[AutoencoderTrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``, pure (jit it, donating the state).

    Args:
      ae_apply: ``ae_apply(params, x (B,H,W,C), key) -> (x_rec (B,H,W,C), aux)``. ``kind="kl"``: ``aux``
        is the posterior (a pytree with ``.kl() -> (B,)``, e.g. :class:`jaxdiff.nn.autoencoder.DiagonalGaussian`;
        sample it with ``key``); ``kind="vq"``: ``aux`` is the scalar codebook + commitment loss.
      disc_apply: ``disc_apply(disc_params, x (B,H,W,C)) -> logits (B, ...)``.
      lpips_fn: ``lpips_fn(x, y) -> (B,)`` perceptual distance of images in ``[-1, 1]`` (its weights
        closed over, frozen), or ``None`` for no perceptual term.
      gen_opt, disc_opt: optax transformations (CompVis: ``adam(lr, b1=0.5, b2=0.9)`` both).
      kind / rec_loss: ``"kl"|"vq"`` / ``"l1"|"l2"``.
      kl_weight: KL weight (1e-6 in the LDM KL configs); codebook_weight: VQ loss weight (1.0).
      perceptual_weight: LPIPS weight (1.0); ignored when ``lpips_fn`` is None.
      disc_start: first step with the GAN terms on (KL-f8: 50001; VQ-f4: 0).
      disc_weight: multiplies the adaptive weight (0.5 KL-f8, 0.75 VQ-f4); disc_factor: 1.0.
      ema_decay: generator EMA decay (with the ``(1 + s) / (10 + s)`` warm-up of ``step.py``).
      last_layer_path: key path of the decoder's last conv kernel in ``params`` (default
        ``("decoder", "conv_out", "kernel")``), or a function ``params -> that leaf``.
    batch: ``{"image": (B, H, W, C)}`` float in ``[-1, 1]``.
    metrics (float32 scalars): ``loss`` (generator total), ``nll``, ``rec`` (mean pixel loss), ``kl`` or
      ``codebook`` (unweighted), ``p_loss`` (mean LPIPS), ``g_loss`` (``-mean D(x_rec)``), ``gan_term``
      (``d_weight * disc_factor * g_loss``), ``d_loss`` (``disc_factor * hinge``), ``d_weight``,
      ``disc_factor``, ``logits_real``, ``logits_fake``, ``grad_norm``, ``disc_grad_norm``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if rec_loss not in REC_LOSSES:
        raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {rec_loss!r}")
    use_lpips = lpips_fn is not None and perceptual_weight > 0

    def nll_fn(x_rec, x):
        pix = _pixel_loss(x, x_rec, rec_loss)
        p = (lpips_fn(x, x_rec).astype(jnp.float32) if use_lpips
             else jnp.zeros(x.shape[:1], jnp.float32))
        rec_map = pix + perceptual_weight * p.reshape((-1,) + (1,) * (pix.ndim - 1))
        nll = jnp.sum(rec_map) / x.shape[0] if kind == "kl" else jnp.mean(rec_map)
        return nll, (jnp.mean(pix), jnp.mean(p))

    def reg_fn(aux):
        if kind == "kl":
            per_example = aux.kl().astype(jnp.float32)
            kl = jnp.sum(per_example) / per_example.shape[0]
            return kl_weight * kl, kl
        cb = jnp.mean(jnp.asarray(aux, jnp.float32))
        return codebook_weight * cb, cb

    def step(state: AutoencoderTrainState, batch: dict) -> tuple[AutoencoderTrainState, dict]:
        x = batch["image"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        f = disc_factor_at(state.step, disc_start, disc_factor)

        # autoencoder forward, kept for its VJP
        (x_rec, aux), ae_vjp = jax.vjp(lambda p: ae_apply(p, x, key), state.params)
        # losses as functions of x_rec (and of the discriminator parameters for the GAN terms)
        (nll, (rec, p_loss)), d_nll = jax.value_and_grad(nll_fn, has_aux=True)(x_rec, x)
        (reg, reg_raw), d_reg = jax.value_and_grad(reg_fn, has_aux=True)(aux)
        logits_fake, fake_vjp = jax.vjp(disc_apply, state.disc_params, x_rec)
        logits_real, real_vjp = jax.vjp(lambda dp: disc_apply(dp, x), state.disc_params)
        g_loss, d_g = jax.value_and_grad(lambda lf: -jnp.mean(lf.astype(jnp.float32)))(logits_fake)
        d_g_x = fake_vjp(d_g.astype(logits_fake.dtype))[1]

        # adaptive weight from the last decoder layer's gradients of nll and g_loss
        zero_aux = jax.tree.map(jnp.zeros_like, aux)
        last_nll = select_leaf(ae_vjp((d_nll.astype(x_rec.dtype), zero_aux))[0], last_layer_path)
        last_g = select_leaf(ae_vjp((d_g_x.astype(x_rec.dtype), zero_aux))[0], last_layer_path)
        d_weight = adaptive_weight(last_nll, last_g, disc_weight)
        gan_scale = d_weight * f
        ct_x = (d_nll + gan_scale * d_g_x).astype(x_rec.dtype)
        grads = ae_vjp((ct_x, d_reg))[0]
        loss = nll + reg + gan_scale * g_loss

        # discriminator: hinge on D(x) and D(sg(x_rec)) (the same forward as above; only the
        # cotangent w.r.t. the discriminator parameters is used)
        d_raw, (ct_real, ct_fake) = jax.value_and_grad(hinge_d_loss, argnums=(0, 1))(logits_real, logits_fake)
        d_loss = f * d_raw
        d_grads = jax.tree.map(jnp.add, real_vjp((f * ct_real).astype(logits_real.dtype))[0],
                               fake_vjp((f * ct_fake).astype(logits_fake.dtype))[0])

        grad_norm = optax.tree.norm(grads)
        disc_grad_norm = optax.tree.norm(d_grads)
        updates, opt_state = gen_opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d_updates, disc_opt_state = disc_opt.update(d_grads, state.disc_opt_state, state.disc_params)
        disc_params = optax.apply_updates(state.disc_params, d_updates)
        dec = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: dec * e + (1 - dec) * p, state.ema_params, params)

        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(d_loss)
                  & jnp.isfinite(disc_grad_norm))
        new_state = skip_if_nonfinite(state, state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, disc_params=disc_params,
            disc_opt_state=disc_opt_state), finite)
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        metrics = {"loss": f32(loss), "nll": f32(nll), "rec": f32(rec),
                   ("kl" if kind == "kl" else "codebook"): f32(reg_raw),
                   "p_loss": f32(p_loss), "g_loss": f32(g_loss), "gan_term": f32(gan_scale * g_loss),
                   "d_loss": f32(d_loss), "d_weight": f32(d_weight), "disc_factor": f32(f),
                   "logits_real": f32(jnp.mean(logits_real)), "logits_fake": f32(jnp.mean(logits_fake)),
                   "grad_norm": f32(grad_norm), "disc_grad_norm": f32(disc_grad_norm)}
        return new_state, metrics

    return step


def latent_scale_factor(encode_fn: Callable[[jax.Array], jax.Array], images: Any, *,
                        batch_size: int | None = None) -> float:
    """``1 / std`` of the latents ``encode_fn(images)``, the LDM ``scale_by_std`` rule that gave SD's
    0.18215 (``1. / z.flatten().std()`` on the first training batch in ``ldm/models/diffusion/ddpm.py``).

    Args:
      encode_fn: ``(B, H, W, C) -> (B, h, w, c)`` latents as the diffusion model will see them before
        scaling (LDM uses a posterior *sample*; pass ``mode`` for deterministic latents).
      images: ``(N, H, W, C)`` array, encoded in chunks of ``batch_size`` (all at once when None).
    The std is over every latent element, about their mean, with Bessel's correction
    (``torch.std``'s default). Returns a Python float; raises ``ValueError`` on a zero or non-finite std.
    """
    images = np.asarray(images)
    n = images.shape[0] if images.ndim else 0
    if n == 0:
        raise ValueError("latent_scale_factor: no images given")
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"latent_scale_factor: batch_size must be >= 1, got {batch_size}")
    chunks = [np.asarray(encode_fn(jnp.asarray(images[i:i + bs])), np.float64) for i in range(0, n, bs)]
    # two passes over the stored latents (mean, then centred squares) for accuracy
    count = sum(c.size for c in chunks)
    if count < 2:
        raise ValueError(f"latent_scale_factor: need at least 2 latent values, got {count}")
    total = sum(float(c.sum()) for c in chunks)
    mean = total / count
    total_sq = sum(float(np.square(c - mean).sum()) for c in chunks)
    std = float(np.sqrt(total_sq / (count - 1)))
    if not np.isfinite(std) or std == 0.0:
        raise ValueError(f"latent_scale_factor: latent std is {std}; cannot scale by 1/std")
    return 1.0 / std


__all__ = ["AutoencoderTrainState", "DEFAULT_LAST_LAYER", "adaptive_weight", "create_autoencoder_state",
           "disc_factor_at", "hinge_d_loss", "latent_scale_factor", "make_autoencoder_step", "select_leaf"]
