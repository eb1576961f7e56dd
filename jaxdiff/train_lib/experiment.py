"""Everything a config determines before any data is read: the noise process, the loss, the network's
pure ``apply``, the optimizer, and the train state's abstract shape and shardings on a mesh.
``train.py`` builds on it, and ``sample.py`` uses it to restore a checkpoint."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff import losses
from jaxdiff.noise import NoiseProcess, make_process
from jaxdiff.nn import UNetConfig
from jaxdiff.nn.sharding import state_shardings
from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib.model import build_model, make_apply, split_model, unet_config
from jaxdiff.train_lib.optim import make_optimizer
from jaxdiff.train_lib.images import save_grid
from jaxdiff.train_lib.sampling import Sampler
from jaxdiff.train_lib.state import TrainState, create_state
from jaxdiff.train_lib.step import make_train_step


@dataclasses.dataclass
class Experiment:
    """What :func:`build_experiment` returns (see the module docstring)."""

    config: Any
    mesh: Mesh
    process: NoiseProcess
    loss_fn: Callable
    unet: UNetConfig
    apply: Callable
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    init_params: Any            # host/device pytree of the freshly initialised parameters
    abstract_state: TrainState  # shapes and dtypes, no shardings
    state_shardings: TrainState
    num_params: int
    autoencoder: Any = None     # latent.FrozenAutoencoder for latent diffusion, else None
    _sampler: Any = None

    @property
    def conditional(self) -> bool:
        """Whether the network takes class labels (a class-conditional dataset and model)."""
        return bool(self.config.model.num_classes) and self.config.data.label_key is not None

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shardings."""
        seed = self.config.seed
        return jax.jit(lambda p: create_state(p, self.optimizer, seed),
                       out_shardings=self.state_shardings)(self.init_params)

    def abstract_sharded_state(self) -> TrainState:
        """Restore target: ``ShapeDtypeStruct`` leaves carrying this mesh's shardings."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` the network sees: the images, or the latents of latent diffusion."""
        if self.autoencoder is not None:
            return self.autoencoder.shape
        c = self.config.data
        return (c.image_size, c.image_size, c.channels)

    def make_train_step(self):
        """``step(state, batch) -> (state, metrics)`` of ``train_lib.step`` for this config; latent
        diffusion first encodes the batch's images with the frozen autoencoder."""
        c = self.config
        step = make_train_step(self.apply, self.loss_fn, self.optimizer, self.schedule,
                               grad_accum=c.train.grad_accum,
                               label_dropout=c.train.label_dropout if self.conditional else 0.0,
                               null_class=c.model.num_classes if self.unet.class_null else None,
                               ema_decay=c.train.ema_decay, conditional=self.conditional)
        if self.autoencoder is None:
            return step
        encode = self.autoencoder.encode

        def latent_step(state, batch):
            return step(state, {**batch, "image": jax.lax.stop_gradient(encode(batch["image"]))})
        return latent_step

    def sampler(self, **overrides) -> Sampler:
        """A sampler with ``config.sample``'s settings, any of solver, solver_kwargs, grid, steps,
        guidance_scale overridden (the config's own sampler is built once); latent models decode."""
        c = self.config
        if not overrides and self._sampler is not None:
            return self._sampler
        settings = dict(solver=c.sample.solver, solver_kwargs=dict(c.sample.solver_kwargs), grid=c.sample.grid,
                        steps=c.sample.steps, guidance_scale=c.sample.guidance_scale)
        settings.update(overrides)
        sampler = Sampler(self.apply, self.process, prediction=c.loss.target, image_shape=self.model_shape,
                          num_classes=c.model.num_classes if self.conditional else None,
                          class_null=self.unet.class_null, mesh=self.mesh,
                          decode=self.autoencoder.decode if self.autoencoder is not None else None, **settings)
        if not overrides:
            self._sampler = sampler
        return sampler

    def write_samples(self, state: TrainState, batch_images, workdir: str, step: int) -> None:
        """``<workdir>/samples/step_*.png``: ``sample.num`` samples (classes cycled, one per column)."""
        c = self.config
        k, n = c.model.num_classes, c.sample.num
        sampler = self.sampler()
        labels = np.arange(n) % k if sampler.num_classes else None
        params = state.ema_params if c.sample.use_ema else state.params
        images = sampler(params, labels, jax.random.key(c.sample.seed), num=n)
        if jax.process_index() == 0:
            nrow = k if sampler.num_classes and n % k == 0 else None
            save_grid(images, os.path.join(workdir, "samples", f"step_{step:07d}.png"), nrow=nrow, scale=2)

    def finish(self, state: TrainState, data_iter, workdir: str, step: int) -> dict:
        """End-of-training hook (nothing to add for diffusion)."""
        return {}


def build_experiment(config, mesh: Mesh):
    """Validate ``config`` and build its experiment on ``mesh``: an :class:`Experiment` for
    ``task="diffusion"``, an ``ae_experiment.AutoencoderExperiment`` for ``task="autoencoder"``."""
    config_lib.validate(config)
    if config.task == "autoencoder":
        from jaxdiff.train_lib.ae_experiment import build_autoencoder_experiment
        return build_autoencoder_experiment(config, mesh)
    process = make_process(config.process.name, **dict(config.process.kwargs))
    loss_fn = losses.make_denoising_loss(process, target=config.loss.target,
                                         time_sampling=config.loss.time_sampling,
                                         weighting=config.loss.weighting,
                                         time_params=dict(config.loss.time_params),
                                         weight_params=dict(config.loss.weight_params))
    total = int(config.train.steps)
    if total < 1:
        raise ValueError(f"train.steps must be >= 1, got {total}")
    model = build_model(config, seed=config.seed)
    graphdef, params_state, rest = split_model(model)
    params = nnx.to_pure_dict(params_state)
    optimizer, schedule = make_optimizer(config.optim, total)
    abstract = jax.eval_shape(lambda p: create_state(p, optimizer, config.seed), params)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = nnx.to_pure_dict(state_shardings(params_state, mesh))
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    shardings = TrainState(step=replicated, params=param_sh, ema_params=param_sh, opt_state=opt_sh,
                           rng=replicated, bad_step=replicated)
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    autoencoder = None
    if config.latent.autoencoder:
        from jaxdiff.train_lib.latent import check_latent_config, load_frozen_autoencoder
        autoencoder = load_frozen_autoencoder(config.latent.autoencoder, config.data.image_size)
        check_latent_config(config, autoencoder)
    return Experiment(config=config, mesh=mesh, process=process, loss_fn=loss_fn, unet=unet_config(config),
                      apply=make_apply(graphdef, rest), optimizer=optimizer, schedule=schedule,
                      init_params=params, abstract_state=abstract, state_shardings=shardings, num_params=n,
                      autoencoder=autoencoder)


_TASK_NAMES = {"diffusion": "a diffusion model", "autoencoder": "an autoencoder"}


def restore_run(workdir: str, *, task: str, step: int | None = None, mesh: Mesh | None = None):
    """``(experiment, state, step)`` of a training run's newest readable (or the given) checkpoint, rebuilt
    from the config stored with it on ``mesh`` (default: all devices). Raises FileNotFoundError when there is no checkpoint, ValueError when the run is not ``task``."""
    from jaxdiff import parallel
    from jaxdiff.train_lib import checkpoint as ckpt
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}: train first (python train.py --workdir {workdir})")
    reader = ckpt.Checkpointer(directory, async_save=False)
    try:
        steps = reader.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no committed checkpoint")
        config = config_lib.config_from_dict(reader.read_config(step if step is not None else steps[-1]))
        if config.task != task:
            raise ValueError(f"{workdir} is a {config.task!r} run, not {_TASK_NAMES[task]}")
        exp = build_experiment(config, mesh if mesh is not None else parallel.make_mesh())
        restored_step, state, _, _ = reader.restore(exp.abstract_sharded_state(), step)
    finally:
        reader.close()
    return exp, state, restored_step
