"""Everything a config determines before any data is read: the noise process, the loss, the network's
pure ``apply``, the optimizer, and the train state's abstract shape and shardings on a mesh.
``train.py`` builds on it, and ``sample.py`` uses it to restore a checkpoint."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
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
from jaxdiff.train_lib.state import TrainState, create_state


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


def build_experiment(config, mesh: Mesh) -> Experiment:
    """Validate ``config`` and build its :class:`Experiment` on ``mesh``."""
    config_lib.validate(config)
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
    return Experiment(config=config, mesh=mesh, process=process, loss_fn=loss_fn, unet=unet_config(config),
                      apply=make_apply(graphdef, rest), optimizer=optimizer, schedule=schedule,
                      init_params=params, abstract_state=abstract, state_shardings=shardings, num_params=n)
