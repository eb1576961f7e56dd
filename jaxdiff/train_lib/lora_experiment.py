"""LoRA fine-tuning (``task="lora"``): a frozen base UNet (a jaxdiff training run or a diffusers folder) plus
low-rank adapters (:mod:`jaxdiff.nn.lora`) trained by the usual diffusion step.

The train state holds only the adapter weights: ``params``, their EMA and the optimizer moments are adapter
trees, so checkpoints and optimizer memory scale with the adapters, and the base parameters (kept on the
mesh beside the state, never in it) cannot change. The network architecture, noise process and prediction
target come from the base; the run's ``model`` section is replaced by the base's.

A text-conditioned base (a jaxdiff ``text.encoder`` run, or a diffusers text-to-image folder) is handed to
:mod:`jaxdiff.train_lib.lora_text`: an instance prompt, new tokens and DreamBooth prior preservation
(``lora.instance_prompt``, ``lora.new_tokens``, ``lora.class_prompt``), which a base without text conditioning
refuses.
"""
from __future__ import annotations

import logging
import os
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import losses
from jaxdiff.nn.functional import make_apply
from jaxdiff.nn.lora import LoRASpec, add_lora, merge_param_trees, split_lora
from jaxdiff.nn.sharding import state_shardings
from jaxdiff.sampling import SamplerSettings
from jaxdiff.train_lib.diffusion import DiffusionExperiment
from jaxdiff.train_lib.optim import make_optimizer
from jaxdiff.train_lib.state import TrainState, create_state, optimizer_shardings

log = logging.getLogger("jaxdiff.train")


def lora_spec(config) -> LoRASpec:
    """The :class:`~jaxdiff.nn.lora.LoRASpec` of ``config.lora`` (checked)."""
    c = config.lora
    spec = LoRASpec(targets=tuple(c.targets), rank=int(c.rank), alpha=c.alpha, dropout=float(c.dropout))
    spec.check()
    return spec


def _is_diffusers(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) or os.path.isfile(
        os.path.join(folder, "unet", "config.json"))


TEXT_KEYS = ("instance_prompt", "new_tokens", "class_prompt")


def _check_base_folder(config) -> str:
    base = config.lora.base
    if not base:
        raise ValueError("task='lora' needs a frozen base: set config key 'lora.base' to a jaxdiff training "
                         "workdir or a diffusers folder (UNet or pipeline)")
    if not os.path.isdir(base):
        raise ValueError(f"config key 'lora.base' = {base!r} is not a folder")
    return base


def _refuse_text_options(config) -> None:
    """ValueError for text-only LoRA options on a base without text conditioning."""
    used = [k for k in TEXT_KEYS if config.lora[k]]
    if used:
        raise ValueError(f"config keys {['lora.' + k for k in used]} (instance prompt, new tokens, prior "
                         f"preservation) need a text-conditioned base; {config.lora.base!r} has no text conditioning")


def load_base(config, mesh: Mesh, restored: tuple | None = None):
    """``(model, process, prediction, model_section)``: the base UNet with its weights, its noise process and
    prediction kind, and the ``model`` config values that describe it (``restored``: the jaxdiff base run's
    ``(experiment, state)`` when already read). Raises ValueError without a base."""
    base = _check_base_folder(config)
    if _is_diffusers(base):
        from jaxdiff.convert.diffusers_io import load_unet
        from jaxdiff.convert.scheduler import process_from_scheduler_config, read_scheduler_config
        unet_dir = os.path.join(base, "unet") if os.path.isdir(os.path.join(base, "unet")) else base
        process, prediction = process_from_scheduler_config(read_scheduler_config(base))
        model = load_unet(unet_dir)
        c = model.config
        section = {"num_classes": c.num_classes, "dropout": c.dropout}
        return model, process, prediction, section
    from jaxdiff.train_lib.model import build_model
    exp, state = restored if restored is not None else _restore_base(config, mesh)
    model = build_model(exp.config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, jax.device_get(state.ema_params))
    model = nnx.merge(graphdef, params, rest)
    return model, exp.process, exp.config.loss.target, exp.config.model.to_dict()


def base_run_config(config):
    """The config stored with the jaxdiff base run's newest checkpoint (no arrays read), checked to share this
    run's process and prediction target."""
    from jaxdiff.train_lib import checkpoint as ckpt
    from jaxdiff.train_lib import config as config_lib
    base = config.lora.base
    reader = ckpt.Checkpointer(os.path.join(base, "checkpoints"), async_save=False)
    try:
        steps = reader.all_steps()
        if not steps:
            raise ValueError(f"config key 'lora.base' = {base!r} holds no checkpoint: give a trained jaxdiff run")
        theirs = config_lib.config_from_dict(reader.read_config(steps[-1]))
    finally:
        reader.close()
    if theirs.task != "diffusion":
        raise ValueError(f"config key 'lora.base' = {base!r} is a {theirs.task!r} run, not a diffusion run")
    for key in ("process.name", "loss.target"):
        if _get(config, key) != _get(theirs, key):
            raise ValueError(f"config key {key!r} is {_get(config, key)!r} but the base run {base!r} was trained "
                             f"with {_get(theirs, key)!r}")
    return theirs


def _restore_base(config, mesh: Mesh):
    """``(experiment, state)`` of the jaxdiff base run."""
    from jaxdiff.train_lib.experiment import restore_run
    exp, state, _ = restore_run(config.lora.base, task="diffusion", mesh=mesh)
    return exp, state


def _get(c, dotted):
    for k in dotted.split("."):
        c = c[k]
    return c


def build_lora_experiment(config, mesh: Mesh) -> DiffusionExperiment:
    """A :class:`DiffusionExperiment` whose trainable parameters are the adapters of ``config.lora`` on the
    frozen base ``config.lora.base``; ``memory`` holds the parameter and optimizer-state sizes in bytes."""
    spec = lora_spec(config)
    restored = None
    from jaxdiff.convert.text_to_image import is_text_to_image_folder
    if is_text_to_image_folder(_check_base_folder(config)):
        from jaxdiff.train_lib.lora_text import build_text_lora_experiment, diffusers_text_base
        base_exp, base_params = diffusers_text_base(config)
        return build_text_lora_experiment(config, mesh, spec, base_exp, base_params)
    if not _is_diffusers(config.lora.base):
        base_config = base_run_config(config)
        if base_config.text.encoder is not None:
            from jaxdiff.train_lib.lora_text import build_text_lora_experiment, check_text_lora_config
            check_text_lora_config(config, base_config)
            exp, state = _restore_base(config, mesh)
            return build_text_lora_experiment(config, mesh, spec, exp, state.ema_params)
        _refuse_text_options(config)     # before the base's arrays are read
        restored = _restore_base(config, mesh)
    else:
        _refuse_text_options(config)
    model, process, prediction, model_section = load_base(config, mesh, restored)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for k, v in model_section.items():
            config.model[k] = tuple(v) if isinstance(v, list) else v
    if config.loss.target != prediction:
        raise ValueError(f"config key 'loss.target' is {config.loss.target!r} but the base predicts {prediction!r}")
    c = model.config
    channels = config.data.channels
    if channels != c.in_channels:
        raise ValueError(f"config key 'data.channels' = {channels} but the base UNet takes {c.in_channels} channels")
    if "cross" in tuple(c.down_attention) + tuple(c.up_attention or ()) + (c.mid_attention,):
        raise ValueError("this base UNet needs a text context but has no text encoder: task='lora' fine-tunes "
                         "class- or unconditional bases and jaxdiff text runs")
    if config.train.label_dropout > 0 and not c.class_null:
        raise ValueError("config key 'train.label_dropout' > 0 needs a base with a null class; set it to 0")
    add_lora(model, spec, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    graphdef, adapters, base, rest = split_lora(model)
    replicated = NamedSharding(mesh, PartitionSpec())
    base_values = jax.device_put(nnx.to_pure_dict(base), nnx.to_pure_dict(state_shardings(base, mesh)))
    full_apply = make_apply(graphdef, rest)

    def apply(adapter_params, x, model_time, labels=None, dropout_key=None):
        """The base with these adapters: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return full_apply(merge_param_trees(base_values, adapter_params), x, model_time, labels, dropout_key)

    params = nnx.to_pure_dict(adapters)
    optimizer, schedule = make_optimizer(config.optim, int(config.train.steps))
    abstract = jax.eval_shape(lambda p: create_state(p, optimizer, config.seed), params)
    param_sh = nnx.to_pure_dict(state_shardings(adapters, mesh))
    shardings = TrainState(step=replicated, params=param_sh, ema_params=param_sh,
                           opt_state=optimizer_shardings(optimizer, abstract.opt_state, param_sh, mesh),
                           rng=replicated, bad_step=replicated)
    nbytes = lambda tree: int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
    memory = {"adapter_bytes": nbytes(params), "base_bytes": nbytes(base_values),
              "optimizer_state_bytes": nbytes(abstract.opt_state)}
    log.info("LoRA rank %d on %d layers: adapters %s B, frozen base %s B, optimizer state %s B", spec.rank,
             len(jax.tree.leaves(params)) // 2, f"{memory['adapter_bytes']:,}", f"{memory['base_bytes']:,}",
             f"{memory['optimizer_state_bytes']:,}")
    loss_fn = losses.make_denoising_loss(process, target=config.loss.target, time_sampling=config.loss.time_sampling,
                                         weighting=config.loss.weighting, time_params=dict(config.loss.time_params),
                                         weight_params=dict(config.loss.weight_params))
    exp = DiffusionExperiment(config=config, mesh=mesh, process=process, loss_fn=loss_fn, unet=c, apply=apply,
                              optimizer=optimizer, schedule=schedule, init_params=params, abstract_state=abstract,
                              state_shardings=shardings, num_params=sum(int(x.size) for x in jax.tree.leaves(params)),
                              sample_settings=SamplerSettings.resolve(config.sample))
    exp.memory = memory
    exp.base_params = base_values
    return exp
