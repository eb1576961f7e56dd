"""LoRA fine-tuning of a text-conditioned base (``task="lora"`` on a jaxdiff text run, pixel or latent: the latter
trains on its frozen autoencoder's latents and its class images are decoded pixels): adapters on the base's
UNet, optional new tokens (textual-inversion rows of the text encoder's token table), the instance prompt as the
caption of every fine-tuning image, and DreamBooth's prior preservation.

The train state's parameters are ``{"lora": adapters, "new_tokens": (n, D)}`` (the second only with new tokens):
the base UNet, the whole text encoder and the old rows of its token table stay on the mesh beside the state and
cannot change. The network sees the table ``concat(old rows, new_tokens)``.

Prior preservation (``lora.class_prompt``, ``lora.num_class_images``): the frozen base draws the class images once
(:mod:`jaxdiff.train_lib.lora_data`), each step's batch is the ``B`` instance images with the instance prompt plus
``B`` class images with the class prompt, and the loss is ``mean(instance) + prior_loss_weight * mean(class)``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import losses
from jaxdiff.nn.functional import make_apply
from jaxdiff.nn.lora import add_lora, merge_param_trees, split_lora
from jaxdiff.nn.sharding import batch_sharding, state_shardings
from jaxdiff.sampling import Sampler, SamplerSettings
from jaxdiff.train_lib import lora_data
from jaxdiff.train_lib.lora_tokens import add_new_tokens, initial_rows
from jaxdiff.train_lib.optim import make_optimizer
from jaxdiff.train_lib.state import TrainState, create_state, optimizer_shardings
from jaxdiff.train_lib.step import make_train_step
from jaxdiff.train_lib.text_diffusion import TextDiffusionExperiment

log = logging.getLogger("jaxdiff.train")
TABLE = ("text_encoder", "embeddings", "token_embedding", "embedding")   # path of the token table


def prior_weighted(loss_fn, weight: float):
    """``loss_fn`` whose per-example losses ``(m,)`` over a batch of ``m/2`` instance then ``m/2`` class rows
    are scaled so that their mean is ``mean(instance) + weight * mean(class)``."""
    def weighted(apply_fn, x0, key, **kw):
        per_example = loss_fn(apply_fn, x0, key, **kw)
        half = per_example.shape[0] // 2
        scale = jnp.concatenate([jnp.full((half,), 2.0), jnp.full((per_example.shape[0] - half,), 2.0 * weight)])
        return per_example * scale.astype(per_example.dtype)
    return weighted


def _with_table(params: dict, table: jax.Array) -> dict:
    """``params`` with the token table at :data:`TABLE` replaced by ``table`` (dicts along the path copied)."""
    out = dict(params)
    node = out
    for k in TABLE[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[TABLE[-1]] = table
    return out


def _table(params: dict):
    for k in TABLE:
        params = params[k]
    return params


@dataclasses.dataclass
class TextLoRAExperiment(TextDiffusionExperiment):
    """A LoRA (+ new tokens, + prior preservation) run on a frozen text-conditioned base; see the module docstring."""

    base_params: Any = None               # the frozen base's parameters (old token rows only), on the mesh
    memory: dict | None = None            # adapter / new-row / base / optimizer-state bytes
    new_token_ids: tuple = ()
    instance_tokens: np.ndarray | None = None   # (S,)
    class_tokens: np.ndarray | None = None      # (S,) with prior preservation, else None
    class_images: np.ndarray | None = None      # (N, H, W, C) once the data iterator is made
    network: Callable | None = None             # params -> the TextConditionedUNet (adapters, grown table)
    diffusers_base: bool = False                # the base is a diffusers folder: the adapters are exported too

    @property
    def prior(self) -> bool:
        return self.class_tokens is not None

    def batch_shardings(self) -> dict:
        out = {"image": batch_sharding(self.mesh, 4), "label": batch_sharding(self.mesh, 1)}
        return {**out, "class_image": batch_sharding(self.mesh, 4)} if self.prior else out

    def make_train_step(self):
        """The diffusion step on ``[instance images; class images]`` captioned ``[instance; class prompt]``."""
        c = self.config
        step = make_train_step(self.apply, self.loss_fn, self.optimizer, self.schedule, grad_accum=c.train.grad_accum,
                               label_dropout=c.text.caption_dropout, null_class=self.null_tokens,
                               ema_decay=c.train.ema_decay, conditional=True)
        instance, klass = jnp.asarray(self.instance_tokens), self.class_tokens
        encode = self.autoencoder.encode if self.autoencoder is not None else None

        def lora_step(state, batch):
            images = batch["image"]
            tokens = jnp.broadcast_to(instance, (images.shape[0],) + instance.shape)
            if klass is not None:
                # the step's micro-batch i takes rows i, i + A, ...: with B % A == 0 each holds B/A rows of each half
                images = jnp.concatenate([images, batch["class_image"]])
                tokens = jnp.concatenate([tokens, jnp.broadcast_to(jnp.asarray(klass), tokens.shape)])
            if encode is not None:      # a latent base: its frozen autoencoder's latents, as the base trained on
                images = jax.lax.stop_gradient(encode(images))
            return step(state, {"image": images, "label": tokens})
        return lora_step

    def finish(self, state, data_iter, workdir: str, step: int) -> dict:
        """Export each new token's trained (EMA) row as a diffusers textual-inversion file,
        ``<workdir>/textual_inversion/learned_embeds_<i>.safetensors`` (``load_textual_inversion`` reads it), and,
        on a diffusers base, the (EMA) adapters as ``<workdir>/lora/pytorch_lora_weights.safetensors``
        (``load_lora_weights`` reads it)."""
        if self.diffusers_base and jax.process_index() == 0:
            from jaxdiff.convert.lora import save_lora_diffusers
            save_lora_diffusers(self.network(state.ema_params).unet, os.path.join(workdir, "lora"))
        if self.new_token_ids and jax.process_index() == 0:
            from jaxdiff.convert.textual_inversion import save_textual_inversion
            rows = np.asarray(jax.device_get(state.ema_params["new_tokens"]), np.float32)
            for i, token in enumerate(self.config.lora.new_tokens):
                save_textual_inversion(os.path.join(workdir, "textual_inversion", f"learned_embeds_{i}.safetensors"),
                                       token, rows[i])
        return {}

    def draw_class_images(self) -> np.ndarray:
        """``(lora.num_class_images, H, W, C)``: the frozen base's samples of ``lora.class_prompt`` (the adapters
        at their zero start, so exactly the base), ``config.sample``'s solver, deterministic in ``config.seed``."""
        c = self.config
        n, chunk = int(c.lora.num_class_images), 256
        sampler = Sampler(self.sampling_model(), self.sample_settings, self.mesh)
        params = self.init_params
        key = jax.random.fold_in(jax.random.key(c.seed), lora_data.CLASS_SAMPLE_TAG)
        negative = self.encode_prompts(params, [""]) if self.sample_settings.guidance_scale is not None else None
        out = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            context = self.encode_prompts(params, [c.lora.class_prompt] * m)
            out.append(sampler(params, None, key, offset=start, context=context, negative_context=negative))
        return np.concatenate(out)

    def data_iterator(self, seed: int, workdir: str):
        """The run's batches (the training loop's hook): instance images, plus the class images with prior
        preservation (drawn now, or read back from ``workdir`` on resume)."""
        c = self.config
        data = {k: v for k, v in c.data.items() if k not in ("channels", "synthetic")}
        it = lora_data.instance_iterator(data, global_batch_size=c.train.batch_size, seed=seed,
                                         conditions=tuple(c.lora.instance_filter),
                                         count=c.lora.num_instance_images)
        if not self.prior:
            return it
        meta = {"class_prompt": c.lora.class_prompt, "num_class_images": int(c.lora.num_class_images),
                "seed": int(c.seed), "base": c.lora.base, "sample": self.sample_settings.as_dict()}
        meta = jax.tree.map(lambda v: list(v) if isinstance(v, tuple) else v, meta)
        self.class_images = lora_data.class_images(workdir, meta, self.draw_class_images)
        return lora_data.PriorBatches(it, self.class_images, seed)


def check_prompts(config) -> None:
    """ValueError for a missing instance prompt, one without the new tokens, or a class prompt with one."""
    lo = config.lora
    new_tokens = tuple(lo.new_tokens)
    if not lo.instance_prompt:
        raise ValueError("a text-conditioned base needs config key 'lora.instance_prompt' (the caption of every "
                         "fine-tuning image, e.g. 'a photo of <v1>')")
    missing = [t for t in new_tokens if t not in lo.instance_prompt]
    if missing:
        raise ValueError(f"config key 'lora.instance_prompt' = {lo.instance_prompt!r} does not contain the new "
                         f"token(s) {missing}: the concept is learned through its token")
    if lo.class_prompt and any(t in lo.class_prompt for t in new_tokens):
        raise ValueError(f"config key 'lora.class_prompt' = {lo.class_prompt!r} contains a new token; the class "
                         "prompt describes the class the frozen base already knows")


def check_text_lora_config(config, base_config) -> None:
    """ValueError, before anything is read or built, for a run that does not fit its text base (``base_config``:
    the base run's stored config): other image sizes or channels, or prompts :func:`check_prompts` refuses."""
    for key in ("image_size", "channels"):
        if config.data[key] != base_config.data[key]:
            raise ValueError(f"config key 'data.{key}' is {config.data[key]!r} but the base {config.lora.base!r} "
                             f"has {base_config.data[key]!r}")
    check_prompts(config)


def diffusers_text_base(config):
    """``(base, params)`` of a diffusers text-to-image folder ``config.lora.base`` (``StableDiffusionPipeline``
    layout: tokenizer, CLIP text encoder, UNet, VAE, scheduler) in the form :func:`build_text_lora_experiment` takes
    a jaxdiff text run: ``base`` has the run's ``config`` with the folder's sizes, parts and prediction filled in, the
    network's ``apply.graphdef`` / ``apply.rest``, ``tokenizer``, ``process``, ``unet``, ``context_shape`` and the
    VAE as the frozen ``autoencoder``; ``params`` the network's parameters (UNet and text encoder)."""
    from types import SimpleNamespace

    from jaxdiff.convert.text_to_image import load_text_to_image
    from jaxdiff.nn.text_unet import TextConditionedUNet
    from jaxdiff.train_lib.latent import load_diffusers_autoencoder
    folder = config.lora.base
    check_prompts(config)
    pipe = load_text_to_image(folder)
    bc = config.copy_and_resolve_references()
    with bc.unlocked():
        bc.data.image_size = pipe.sample_size * pipe.vae.config.downsample_factor
        bc.data.channels = pipe.vae.config.in_channels
        bc.latent.autoencoder, bc.latent.size = os.path.join(folder, "vae"), pipe.sample_size
        bc.latent.channels = pipe.unet.config.in_channels
        bc.text.encoder, bc.text.tokenizer = os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer")
        bc.text.max_length, bc.text.clip_skip = pipe.tokenizer.model_max_length, 0
    check_text_lora_config(config, bc)
    if config.loss.target != pipe.prediction:
        raise ValueError(f"config key 'loss.target' is {config.loss.target!r} but the scheduler of {folder!r} "
                         f"predicts {pipe.prediction!r}")
    graphdef, params, rest = nnx.split(TextConditionedUNet(pipe.unet, pipe.text_encoder), nnx.Param, ...)
    base = SimpleNamespace(config=bc, apply=SimpleNamespace(graphdef=graphdef, rest=rest), tokenizer=pipe.tokenizer,
                           diffusers=True,
                           process=pipe.process, unet=pipe.unet.config, autoencoder=load_diffusers_autoencoder(
                               bc.latent.autoencoder, bc.data.image_size),
                           context_shape=(pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size))
    return base, nnx.to_pure_dict(params)


def build_text_lora_experiment(config, mesh: Mesh, spec, base_exp: TextDiffusionExperiment,
                               base_params: dict) -> TextLoRAExperiment:
    """The :class:`TextLoRAExperiment` of ``config`` on the text run ``base_exp`` with its (EMA) ``base_params``
    (the train state's tree: ``unet`` and, for a jointly trained encoder, ``text_encoder``)."""
    bc = base_exp.config
    check_text_lora_config(config, bc)
    new_tokens = tuple(config.lora.new_tokens)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = bc.model
        keep = {"caption_dropout": config.text.caption_dropout,
                "sample_prompts": tuple(config.text.sample_prompts) or tuple(
                    p for p in (config.lora.instance_prompt, config.lora.class_prompt) if p)}
        config.text = bc.text
        config.text.update(keep)
        config.latent = bc.latent

    # the base network with its weights, grown by the new rows, with adapters on its UNet
    model = nnx.merge(base_exp.apply.graphdef, nnx.State(base_params), base_exp.apply.rest)
    tokenizer, ids = add_new_tokens(base_exp.tokenizer, new_tokens) if new_tokens else (base_exp.tokenizer, [])
    old_table = model.text_encoder.embeddings.token_embedding.embedding.get_value()
    if ids and ids[0] != old_table.shape[0]:
        raise ValueError(f"the base's tokenizer has {ids[0]} tokens but its text encoder {old_table.shape[0]} rows: "
                         "new tokens need the two to agree")
    rows = initial_rows(old_table, tokenizer, config.lora.token_init, len(new_tokens),
                        config.seed) if new_tokens else None
    if new_tokens:
        model.text_encoder.add_token_embeddings(rows)
    add_lora(model.unet, spec, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    graphdef, adapters, base, rest = split_lora(model)
    replicated = NamedSharding(mesh, PartitionSpec())
    base_values = nnx.to_pure_dict(base)
    base_sh = nnx.to_pure_dict(state_shardings(base, mesh))
    if new_tokens:
        base_values, base_sh = _with_table(base_values, old_table), _with_table(base_sh, replicated)
    base_values = jax.device_put(base_values, base_sh)
    full_apply = make_apply(graphdef, rest, condition="context")
    rest_values = nnx.to_pure_dict(rest)

    def full_params(p: dict) -> dict:
        full = merge_param_trees(base_values, p["lora"])
        if "new_tokens" in p:
            full = _with_table(full, jnp.concatenate([_table(base_values), p["new_tokens"].astype(old_table.dtype)]))
        return full

    def apply(p, x, model_time, condition=None, dropout_key=None):
        """The base with these adapters and token rows: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return full_apply(full_params(p), x, model_time, condition, dropout_key)

    def network(p):
        """The network (a TextConditionedUNet with these adapters and token rows) as a module."""
        return nnx.merge(graphdef, nnx.State(full_params(p)), nnx.State(rest_values))

    def encode_text(p, tokens):
        return network(p).encode_text(tokens).astype(jnp.float32)

    params = {"lora": nnx.to_pure_dict(adapters)}
    param_sh = {"lora": nnx.to_pure_dict(state_shardings(adapters, mesh))}
    if new_tokens:
        params["new_tokens"], param_sh["new_tokens"] = jnp.asarray(rows), replicated
    optimizer, schedule = make_optimizer(config.optim, int(config.train.steps))
    abstract = jax.eval_shape(lambda p: create_state(p, optimizer, config.seed), params)
    shardings = TrainState(step=replicated, params=param_sh, ema_params=param_sh,
                           opt_state=optimizer_shardings(optimizer, abstract.opt_state, param_sh, mesh),
                           rng=replicated, bad_step=replicated)
    nbytes = lambda tree: int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
    memory = {"adapter_bytes": nbytes(params["lora"]), "new_token_bytes": nbytes(params.get("new_tokens", [])),
              "base_bytes": nbytes(base_values), "optimizer_state_bytes": nbytes(abstract.opt_state)}
    log.info("LoRA rank %d on a text base, %d new token(s) %s: adapters %s B, new rows %s B, frozen base %s B, "
             "optimizer state %s B", spec.rank, len(new_tokens), list(new_tokens), f"{memory['adapter_bytes']:,}",
             f"{memory['new_token_bytes']:,}", f"{memory['base_bytes']:,}", f"{memory['optimizer_state_bytes']:,}")
    loss_fn = losses.make_denoising_loss(base_exp.process, target=config.loss.target,
                                         time_sampling=config.loss.time_sampling, weighting=config.loss.weighting,
                                         time_params=dict(config.loss.time_params),
                                         weight_params=dict(config.loss.weight_params))
    prior = bool(config.lora.class_prompt)
    if prior:
        loss_fn = prior_weighted(loss_fn, float(config.lora.prior_loss_weight))
    tokenize = lambda texts: np.asarray(tokenizer(list(texts)), np.int32)  # noqa: E731
    return TextLoRAExperiment(
        config=config, mesh=mesh, process=base_exp.process, loss_fn=loss_fn, unet=base_exp.unet, apply=apply,
        optimizer=optimizer, schedule=schedule, init_params=params, abstract_state=abstract,
        state_shardings=shardings, num_params=sum(int(x.size) for x in jax.tree.leaves(params)),
        sample_settings=SamplerSettings.resolve(config.sample), tokenizer=tokenizer,
        null_tokens=tokenize([""])[0], encode_text=jax.jit(encode_text), context_shape=base_exp.context_shape,
        autoencoder=base_exp.autoencoder, base_params=base_values, memory=memory, new_token_ids=tuple(ids),
        network=network, diffusers_base=bool(getattr(base_exp, "diffusers", False)),
        instance_tokens=tokenize([config.lora.instance_prompt])[0],
        class_tokens=tokenize([config.lora.class_prompt])[0] if prior else None)


__all__ = ["TABLE", "TextLoRAExperiment", "build_text_lora_experiment", "check_prompts", "check_text_lora_config",
           "diffusers_text_base", "prior_weighted"]
