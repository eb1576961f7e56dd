"""The SADM training task (``config.task = "sadm"``): the diffusion experiment of the same config (UNet,
noise process, loss, optimizer, sampler of the sample grids) plus a structure discriminator and its
optimizer, trained together by :func:`.step.make_sadm_step` in the one training loop
(``train_lib.loop``), checkpointed and resumed with the rest of the state.

The discriminator's encoder is the PatchGAN of ``jaxdiff.nn.discriminator`` (GroupNorm), its patch-logit
map flattened into a feature vector (our choice: the paper's encoder is not specified in what was checked).
Settings live in ``config.sadm``: ``weight`` (of the structural term), ``temperature`` (of the
affinities), ``start`` (first step with the term), ``disc_lr`` (None: ``optim.lr``), ``disc_channels``,
``disc_layers``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff.nn.discriminator import NLayerDiscriminator
from jaxdiff.nn.sharding import state_shardings
from jaxdiff.research.sadm.step import SADMTrainState, create_sadm_state, make_sadm_step
from jaxdiff.sampling import SamplingModel
from jaxdiff.train_lib.diffusion import DiffusionExperiment, build_diffusion_experiment
from jaxdiff.train_lib.optim import make_optimizer
from jaxdiff.train_lib.state import optimizer_shardings, with_shardings

TASK = "sadm"


def check_sadm_config(config) -> None:
    """Raise ValueError naming the key for a setting SADM does not support (gradient accumulation: the
    structure is a whole-batch quantity; latent diffusion; a batch under 3; a discriminator too deep for the
    images). The ranges of the ``config.sadm`` values are checked with every config (``train_lib.config``)."""
    if config.train.grad_accum != 1:
        raise ValueError("config key 'train.grad_accum' must be 1 for task='sadm' (the structural distance "
                         "compares the samples of the whole batch)")
    if config.train.batch_size < 3:
        raise ValueError(f"config key 'train.batch_size' must be >= 3 for task='sadm' (pairwise affinities), "
                         f"got {config.train.batch_size}")
    if config.latent.autoencoder:
        raise ValueError("task='sadm' trains pixel models only: set latent.autoencoder=None")
    size, n = config.data.image_size, config.sadm.disc_layers
    if size < 2 ** n * 3:
        raise ValueError(f"config key 'sadm.disc_layers'={n} is too deep for {size}x{size} images: the "
                         f"discriminator needs at least {2 ** n * 3}x{2 ** n * 3}")


@dataclasses.dataclass
class SADMExperiment:
    """SADM training (:class:`~jaxdiff.train_lib.experiment.Experiment` interface); sampling, sample
    grids and batches are the wrapped :class:`~jaxdiff.train_lib.diffusion.DiffusionExperiment`'s."""

    config: Any
    mesh: Mesh
    diffusion: DiffusionExperiment
    encode: Callable            # (disc_params, x (B,H,W,C)) -> (B, F)
    disc_optimizer: optax.GradientTransformation
    init_disc_params: Any
    abstract_state: SADMTrainState
    state_shardings: SADMTrainState
    num_params: int
    num_disc_params: int

    @property
    def conditional(self) -> bool:
        """Whether the denoiser takes class labels."""
        return self.diffusion.conditional

    def init_state(self) -> SADMTrainState:
        """A fresh state, created directly in its shardings."""
        d = self.diffusion
        return jax.jit(lambda p, q: create_sadm_state(p, q, d.optimizer, self.disc_optimizer, self.config.seed),
                       out_shardings=self.state_shardings)(d.init_params, self.init_disc_params)

    def abstract_sharded_state(self) -> SADMTrainState:
        """Restore target: ``ShapeDtypeStruct`` leaves carrying this mesh's shardings."""
        return with_shardings(self.abstract_state, self.state_shardings)

    def batch_shardings(self) -> dict:
        """``{"image": (B,H,W,C), "label": (B,)}`` shardings (as the diffusion task)."""
        return self.diffusion.batch_shardings()

    def make_train_step(self):
        """``step(state, batch) -> (state, metrics)`` of :func:`.step.make_sadm_step` for this config."""
        c, d, s = self.config, self.diffusion, self.config.sadm
        return make_sadm_step(d.apply, self.encode, d.process, d.optimizer, self.disc_optimizer, d.schedule,
                              target=c.loss.target, time_sampling=c.loss.time_sampling,
                              weighting=c.loss.weighting, time_params=dict(c.loss.time_params),
                              weight_params=dict(c.loss.weight_params), weight=s.weight,
                              temperature=s.temperature, start=s.start, ema_decay=c.train.ema_decay,
                              conditional=self.conditional,
                              label_dropout=c.train.label_dropout if self.conditional else 0.0,
                              null_class=c.model.num_classes if d.unet.class_null else None)

    def sampling_model(self, params: Any = None, step: int | None = None, source: str = "") -> SamplingModel:
        """The denoiser as a :class:`~jaxdiff.sampling.SamplingModel` (the discriminator plays no part)."""
        return self.diffusion.sampling_model(params, step=step, source=source)

    def write_samples(self, state: SADMTrainState, batch_images, workdir: str, step: int) -> None:
        """``<workdir>/samples/step_*.png`` as the diffusion task draws them."""
        self.diffusion.write_samples(state, batch_images, workdir, step)

    def finish(self, state: SADMTrainState, data_iter, workdir: str, step: int) -> dict:
        """Nothing to add at the end of training."""
        return {}


def build_structure_encoder(config) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of the discriminator's encoder for ``config`` (seeded ``config.seed + 1``)."""
    s = config.sadm
    disc = NLayerDiscriminator(config.data.channels, ndf=s.disc_channels, n_layers=s.disc_layers,
                               num_groups=min(32, s.disc_channels), rngs=nnx.Rngs(config.seed + 1))
    return nnx.split(disc, nnx.Param)


def build_sadm_experiment(config, mesh: Mesh) -> SADMExperiment:
    """The :class:`SADMExperiment` of a validated ``task="sadm"`` config on ``mesh``."""
    check_sadm_config(config)
    diffusion = build_diffusion_experiment(config, mesh)
    graphdef, disc_state = build_structure_encoder(config)

    def encode(disc_params, x):
        logits = nnx.merge(graphdef, nnx.State(disc_params))(x)
        return logits.reshape(logits.shape[0], -1)

    s = config.sadm
    disc_optim = ml_collections.ConfigDict(config.optim.to_dict())
    if s.disc_lr is not None:
        disc_optim.lr = float(s.disc_lr)
    disc_optimizer, _ = make_optimizer(disc_optim, int(config.train.steps))
    disc_params = nnx.to_pure_dict(disc_state)
    abstract = jax.eval_shape(lambda p, q: create_sadm_state(p, q, diffusion.optimizer, disc_optimizer, config.seed),
                              diffusion.init_params, disc_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    base = diffusion.state_shardings
    disc_sh = nnx.to_pure_dict(state_shardings(disc_state, mesh))
    shardings = SADMTrainState(step=replicated, params=base.params, ema_params=base.ema_params,
                               opt_state=base.opt_state, disc_params=disc_sh,
                               disc_opt_state=optimizer_shardings(disc_optimizer, abstract.disc_opt_state, disc_sh,
                                                                  mesh),
                               rng=replicated, bad_step=replicated)
    return SADMExperiment(config=config, mesh=mesh, diffusion=diffusion, encode=encode,
                          disc_optimizer=disc_optimizer, init_disc_params=disc_params, abstract_state=abstract,
                          state_shardings=shardings, num_params=diffusion.num_params,
                          num_disc_params=sum(int(x.size) for x in jax.tree.leaves(disc_params)))
