"""What an autoencoder config (``task="autoencoder"``) determines: the KL or VQ autoencoder, the patch
discriminator, the optional LPIPS term, both optimizers, and the state's shapes and shardings. It meets
the :class:`~jaxdiff.train_lib.experiment.Experiment` interface, so the training loop runs either."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from jaxdiff.nn.discriminator import NLayerDiscriminator
from jaxdiff.nn.sharding import batch_sharding, state_shardings
from jaxdiff.nn.vq import VQModel
from jaxdiff.train_lib.autoencoder import (AutoencoderTrainState, create_autoencoder_state,
                                           latent_scale_factor, make_autoencoder_step)
from jaxdiff.train_lib.images import save_grid
from jaxdiff.train_lib.optim import learning_rate_schedule
from jaxdiff.train_lib.state import optimizer_shardings, with_shardings

SCALE_FILE = "latent_scale.json"


def autoencoder_config(config) -> AutoencoderConfig:
    """``AutoencoderConfig`` from ``config.autoencoder`` and the data's channel count."""
    a = config.autoencoder
    ch = config.data.channels
    return AutoencoderConfig(in_channels=ch, out_channels=ch, block_out_channels=tuple(a.block_out_channels),
                             layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
                             norm_num_groups=a.norm_num_groups, mid_block_add_attention=a.mid_attention,
                             num_vq_embeddings=a.num_vq_embeddings, scaling_factor=1.0)


def build_autoencoder(config, seed: int = 0):
    """The ``AutoencoderKL`` or ``VQModel`` of ``config`` (float32), parameters from ``seed``."""
    a = config.autoencoder
    if a.kind not in ("kl", "vq"):
        raise ValueError(f"autoencoder.kind must be 'kl' or 'vq', got {a.kind!r}")
    c = autoencoder_config(config)
    size = config.data.image_size
    if size % c.downsample_factor:
        raise ValueError(f"image_size {size} is not divisible by the autoencoder's downsampling factor "
                         f"{c.downsample_factor}")
    cls = AutoencoderKL if a.kind == "kl" else VQModel
    return cls(c, rngs=nnx.Rngs(seed))


def _merge_apply(graphdef, rest):
    rest_values = nnx.to_pure_dict(rest)

    def merged(params):
        return nnx.merge(graphdef, nnx.State(params), nnx.State(rest_values))
    return merged


@dataclasses.dataclass
class AutoencoderExperiment:
    """Autoencoder training (:class:`~jaxdiff.train_lib.experiment.Experiment` interface)."""

    config: Any
    mesh: Mesh
    ae_apply: Callable          # (params, x, key) -> (x_rec, posterior | codebook loss)
    disc_apply: Callable        # (disc_params, x) -> logits
    encode: Callable            # (params, x) -> latents (posterior mode / pre-quantization), unscaled
    merged: Callable            # params -> the autoencoder module (for decode)
    lpips_fn: Callable | None
    gen_opt: optax.GradientTransformation
    disc_opt: optax.GradientTransformation
    schedule: optax.Schedule
    init: tuple                 # (params, disc_params)
    abstract_state: AutoencoderTrainState
    state_shardings: AutoencoderTrainState
    num_params: int

    conditional = False

    def init_state(self) -> AutoencoderTrainState:
        """A fresh state, created directly in its shardings."""
        seed = self.config.seed
        return jax.jit(lambda p, d: create_autoencoder_state(p, d, self.gen_opt, self.disc_opt, seed),
                       out_shardings=self.state_shardings)(*self.init)

    def abstract_sharded_state(self) -> AutoencoderTrainState:
        """Restore target with this mesh's shardings."""
        return with_shardings(self.abstract_state, self.state_shardings)

    def batch_shardings(self) -> dict:
        """``{"image": (B,H,W,C), "label": (B,)}`` shardings (labels are read but unused)."""
        return {"image": batch_sharding(self.mesh, 4), "label": batch_sharding(self.mesh, 1)}

    def make_train_step(self):
        """``step(state, batch) -> (state, metrics)`` (see ``train_lib.autoencoder``)."""
        a = self.config.autoencoder
        step = make_autoencoder_step(self.ae_apply, self.disc_apply, self.lpips_fn, self.gen_opt, self.disc_opt,
                                     kind=a.kind, rec_loss=a.rec_loss, kl_weight=a.kl_weight,
                                     codebook_weight=a.codebook_weight, perceptual_weight=a.perceptual_weight,
                                     disc_start=a.disc_start, disc_weight=a.disc_weight,
                                     disc_factor=a.disc_factor, ema_decay=self.config.train.ema_decay)

        def step_with_lr(state, batch):
            new_state, metrics = step(state, batch)
            return new_state, {**metrics, "lr": jnp.asarray(self.schedule(state.step), jnp.float32)}
        return step_with_lr

    def write_samples(self, state, batch_images: np.ndarray, workdir: str, step: int) -> None:
        """PNG of real images (odd rows) over their EMA reconstructions (even rows)."""
        x = np.asarray(batch_images)[:16]
        rec, _ = jax.jit(self.ae_apply)(state.ema_params, jnp.asarray(x), None)
        rows = []
        for i in range(0, len(x), 8):
            rows += [x[i:i + 8], np.asarray(rec)[i:i + 8]]
        if jax.process_index() == 0:
            save_grid(np.concatenate(rows), os.path.join(workdir, "samples", f"step_{step:07d}.png"), nrow=8,
                      scale=2)


    def finish(self, state, data_iter, workdir: str, step: int) -> dict:
        """Measure the latent scale factor (1 / std of the posterior-mode latents of
        ``autoencoder.scale_images`` training images, EMA parameters) and store it in
        ``<workdir>/latent_scale.json``; returns ``{"latent_scale": value}``."""
        n = int(self.config.autoencoder.scale_images)
        chunks, count = [], 0
        while count < n:
            images = next(data_iter)["image"]
            chunks.append(images)
            count += len(images)
        images = np.concatenate(chunks)[:n]
        encode = jax.jit(self.encode)
        scale = latent_scale_factor(lambda x: encode(state.ema_params, x), images,
                                    batch_size=self.config.train.batch_size)
        write_latent_scale(workdir, step, scale, len(images))
        return {"latent_scale": scale}


def _lpips(config) -> Callable | None:
    """The frozen LPIPS distance, or None. Weights come from ``autoencoder.lpips_weights`` (a folder) or
    ``$JAXDIFF_LPIPS_WEIGHTS``; jaxdiff never downloads them. Missing weights are an error when the
    folder was named in the config, else a warning and no perceptual term."""
    a = config.autoencoder
    if a.perceptual_weight <= 0:
        return None
    from jaxdiff.convert.lpips import load_lpips
    try:
        model = load_lpips(a.lpips_weights, a.lpips_weights) if a.lpips_weights else load_lpips()
    except FileNotFoundError as e:
        if a.lpips_weights:
            raise ValueError(f"autoencoder.lpips_weights={a.lpips_weights!r}: {e}") from None
        warnings.warn(f"LPIPS weights not found, so the autoencoder trains WITHOUT its perceptual term "
                      f"(autoencoder.perceptual_weight={a.perceptual_weight} is ignored): {e}", stacklevel=2)
        return None
    graphdef, state = nnx.split(model)
    if config.data.channels == 1:
        def fn(x, y):
            return nnx.merge(graphdef, state)(jnp.repeat(x, 3, -1), jnp.repeat(y, 3, -1))
        return fn
    return lambda x, y: nnx.merge(graphdef, state)(x, y)


def build_autoencoder_experiment(config, mesh: Mesh) -> AutoencoderExperiment:
    """The experiment of a validated ``task="autoencoder"`` config on ``mesh``."""
    a = config.autoencoder
    model = build_autoencoder(config, config.seed)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    merged = _merge_apply(graphdef, rest)
    disc = NLayerDiscriminator(config.data.channels, ndf=a.disc_channels, n_layers=a.disc_layers,
                               num_groups=min(32, a.disc_channels), rngs=nnx.Rngs(config.seed + 1))
    d_graphdef, d_params_state = nnx.split(disc, nnx.Param)

    if a.kind == "kl":
        def ae_apply(params, x, key):
            return merged(params)(x, key)

        def encode(params, x):
            return merged(params).encode(x).mode()
    else:
        def ae_apply(params, x, key):
            return merged(params)(x)

        def encode(params, x):
            return merged(params).encode(x)

    def disc_apply(disc_params, x):
        return nnx.merge(d_graphdef, nnx.State(disc_params))(x)

    o = config.optim
    schedule = learning_rate_schedule(o, int(config.train.steps))
    disc_schedule = schedule
    if a.disc_lr:
        disc_optim = ml_collections.ConfigDict(o.to_dict())
        disc_optim.lr = float(a.disc_lr)
        disc_schedule = learning_rate_schedule(disc_optim, int(config.train.steps))
    clip = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    gen_opt = optax.chain(*clip, optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps))
    disc_opt = optax.chain(*clip, optax.adam(disc_schedule, b1=o.b1, b2=o.b2, eps=o.eps))

    params = nnx.to_pure_dict(params_state)
    disc_params = nnx.to_pure_dict(d_params_state)
    abstract = jax.eval_shape(lambda p, d: create_autoencoder_state(p, d, gen_opt, disc_opt, config.seed),
                              params, disc_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = nnx.to_pure_dict(state_shardings(params_state, mesh))
    d_sh = nnx.to_pure_dict(state_shardings(d_params_state, mesh))

    shardings = AutoencoderTrainState(step=replicated, params=p_sh, disc_params=d_sh,
                                      opt_state=optimizer_shardings(gen_opt, abstract.opt_state, p_sh, mesh),
                                      disc_opt_state=optimizer_shardings(disc_opt, abstract.disc_opt_state, d_sh,
                                                                         mesh),
                                      ema_params=p_sh, rng=replicated, bad_step=replicated)
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    return AutoencoderExperiment(config=config, mesh=mesh, ae_apply=ae_apply, disc_apply=disc_apply, encode=encode, merged=merged,
                                 lpips_fn=_lpips(config), gen_opt=gen_opt, disc_opt=disc_opt, schedule=schedule,
                                 init=(params, disc_params), abstract_state=abstract, state_shardings=shardings,
                                 num_params=n)


def write_latent_scale(workdir: str, step: int, scale: float, num_images: int) -> str:
    """Store the measured latent scale factor (1 / std of the latents) next to the checkpoints."""
    path = os.path.join(workdir, SCALE_FILE)
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump({"scale_factor": scale, "checkpoint_step": step, "num_images": num_images}, f)
        os.replace(path + ".tmp", path)
    return path
