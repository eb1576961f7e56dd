"""The diffusion experiment: what a ``task="diffusion"`` config determines before any data is read (the
noise process, the loss, the network's pure ``apply``, the optimizer, the state's shapes and shardings,
the sampler of its training grids), behind the :class:`~jaxdiff.train_lib.experiment.Experiment` interface."""
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
from jaxdiff.cascade import training_condition
from jaxdiff.nn import UNetConfig
from jaxdiff.nn.functional import make_apply, split_model
from jaxdiff.nn.sharding import batch_sharding, state_shardings
from jaxdiff.noise import NoiseProcess, make_process
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel
from jaxdiff.train_lib.images import save_grid
from jaxdiff.train_lib.model import build_model, unet_config
from jaxdiff.train_lib.optim import make_optimizer
from jaxdiff.train_lib.state import TrainState, create_state, optimizer_shardings, with_shardings
from jaxdiff.train_lib.step import make_train_step


@dataclasses.dataclass
class DiffusionExperiment:
    """A denoising-diffusion training run (pixel or latent); see :func:`build_diffusion_experiment`."""

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
    sample_settings: SamplerSettings   # config.sample, checked when the experiment is built
    autoencoder: Any = None     # latent.FrozenAutoencoder for latent diffusion, else None
    _sampler: Sampler | None = None

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
        return with_shardings(self.abstract_state, self.state_shardings)

    def batch_shardings(self) -> dict:
        """``{"image": (B,H,W,C), "label": (B,)}`` shardings: the batch split over data and fsdp."""
        return {"image": batch_sharding(self.mesh, 4), "label": batch_sharding(self.mesh, 1)}

    @property
    def super_res(self) -> bool:
        """Whether this is a super-resolution stage of a cascade (``config.cascade.low_res_size``)."""
        return self.config.cascade.low_res_size is not None

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
                               ema_decay=c.train.ema_decay, conditional=self.conditional,
                               low_res_condition=training_condition(self.process, c.cascade.low_res_size,
                                                                    c.cascade.aug_min, c.cascade.aug_max)
                               if self.super_res else None)
        if self.autoencoder is None:
            return step
        encode = self.autoencoder.encode

        def latent_step(state, batch):
            return step(state, {**batch, "image": jax.lax.stop_gradient(encode(batch["image"]))})
        return latent_step

    def sampling_model(self, params: Any = None, step: int | None = None, source: str = "") -> SamplingModel:
        """This network as a :class:`~jaxdiff.sampling.SamplingModel` (latent models decode), with
        ``params`` (e.g. a restored state's EMA) and the config's sampling settings as defaults."""
        c = self.config
        return SamplingModel(apply=self.apply, params=params, process=self.process, prediction=c.loss.target,
                             shape=self.model_shape, num_classes=c.model.num_classes if self.conditional else None,
                             class_null=self.unet.class_null,
                             decode=self.autoencoder.decode if self.autoencoder is not None else None,
                             defaults=self.sample_settings.as_dict(), step=step, source=source,
                             low_res_shape=((c.cascade.low_res_size,) * 2 + (c.data.channels,)) if self.super_res
                             else None, aug_range=(c.cascade.aug_min, c.cascade.aug_max))

    def write_samples(self, state: TrainState, batch_images, workdir: str, step: int) -> None:
        """``<workdir>/samples/step_*.png``: ``sample.num`` samples (classes cycled, one per column) with
        ``config.sample``'s settings; the sampler is compiled on first use and reused."""
        c = self.config
        if self._sampler is None:
            self._sampler = Sampler(self.sampling_model(), self.sample_settings, self.mesh)
        k, n = c.model.num_classes, c.sample.num
        labels = np.arange(n) % k if self._sampler.num_classes else None
        params = state.ema_params if c.sample.use_ema else state.params
        images = self._sampler(params, labels, jax.random.key(c.sample.seed), num=n)
        if jax.process_index() == 0:
            nrow = k if self._sampler.num_classes and n % k == 0 else None
            save_grid(images, os.path.join(workdir, "samples", f"step_{step:07d}.png"), nrow=nrow, scale=2)

    def finish(self, state: TrainState, data_iter, workdir: str, step: int) -> dict:
        """End-of-training hook (nothing to add for diffusion)."""
        return {}


def build_diffusion_experiment(config, mesh: Mesh, *, parts: tuple | None = None, unet: UNetConfig | None = None,
                               condition: str = "labels", experiment_cls: type | None = None,
                               **fields) -> DiffusionExperiment:
    """The :class:`DiffusionExperiment` of a validated ``task="diffusion"`` config on ``mesh``.

    Other conditionings (``train_lib.text_diffusion``) pass their network as ``parts`` (``graphdef, params,
    rest`` of ``nn.functional.split_model`` or a filter of their own), its ``unet`` config, the ``condition``
    of ``make_apply``, their ``experiment_cls`` (a subclass) and its extra ``fields``."""
    process = make_process(config.process.name, **dict(config.process.kwargs))
    loss_fn = losses.make_denoising_loss(process, target=config.loss.target,
                                         time_sampling=config.loss.time_sampling,
                                         weighting=config.loss.weighting,
                                         time_params=dict(config.loss.time_params),
                                         weight_params=dict(config.loss.weight_params))
    graphdef, params_state, rest = parts if parts is not None else split_model(build_model(config, seed=config.seed))
    params = nnx.to_pure_dict(params_state)
    optimizer, schedule = make_optimizer(config.optim, int(config.train.steps))
    abstract = jax.eval_shape(lambda p: create_state(p, optimizer, config.seed), params)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = nnx.to_pure_dict(state_shardings(params_state, mesh))
    shardings = TrainState(step=replicated, params=param_sh, ema_params=param_sh,
                           opt_state=optimizer_shardings(optimizer, abstract.opt_state, param_sh, mesh),
                           rng=replicated, bad_step=replicated)
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    autoencoder = None
    if config.latent.autoencoder:
        from jaxdiff.train_lib.latent import check_latent_config, load_frozen_autoencoder
        autoencoder = load_frozen_autoencoder(config.latent.autoencoder, config.data.image_size)
        check_latent_config(config, autoencoder)
    # the sampling settings are checked now (a bad solver, option, grid or step count fails before the first
    # training step); the sampler itself is built at the first sample grid
    settings = SamplerSettings.resolve(config.sample)
    unet = unet if unet is not None else unet_config(config)
    if settings.guidance_scale is not None and not unet.class_null and condition == "labels":
        raise ValueError("config key 'sample.guidance_scale' needs a model trained with label dropout (a null "
                         "class): set train.label_dropout > 0 or sample.guidance_scale=None")
    if unet.low_res_channels:        # a super-resolution stage of a cascade: conditioned on a dict
        condition = "low_res"
    return (experiment_cls or DiffusionExperiment)(
        config=config, mesh=mesh, process=process, loss_fn=loss_fn, unet=unet,
        apply=make_apply(graphdef, rest, condition=condition), optimizer=optimizer, schedule=schedule,
        init_params=params, abstract_state=abstract, state_shardings=shardings, num_params=n,
        sample_settings=settings, autoencoder=autoencoder, **fields)
