"""The train state (everything a checkpoint holds besides the data position and the config), and the
helpers every experiment's state shares: the non-finite guard and the shardings of optimizer states."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    """Pure pytree carried through the jitted train step.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: nested dict of float32 arrays (``nnx.to_pure_dict`` of the network's parameters).
      ema_params: exponential moving average of ``params`` (same tree).
      opt_state: the optax state.
      rng: ``(2,)`` uint32 base key; step ``s`` uses ``fold_in(rng, s)``, so resuming needs no RNG state.
      bad_step: int32 scalar, -1 while every loss was finite, else the first step whose loss or gradient
        was not: that update is skipped and training stops at the next host check.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    bad_step: jax.Array


def create_state(params: Any, optimizer, seed: int) -> TrainState:
    """A fresh state at step 0 (jit it with ``out_shardings`` to build it sharded)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      bad_step=jnp.full((), -1, jnp.int32))


def skip_if_nonfinite(old: Any, new: Any, finite: jax.Array) -> Any:
    """``new`` where ``finite`` (a bool scalar), else ``old`` with only its step advanced; either way
    ``bad_step`` records the first step whose loss or gradient was not finite. Works for any state
    dataclass with ``step`` and ``bad_step`` fields (both experiments' states)."""
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad_step = jnp.where((old.bad_step < 0) & ~finite, old.step, old.bad_step)
    return kept.replace(step=new.step, bad_step=bad_step)


def optimizer_shardings(optimizer, abstract_opt_state: Any, param_shardings: Any, mesh) -> Any:
    """Shardings of an optax state: moments shaped like the parameters follow ``param_shardings``,
    everything else (counts, scalars) is replicated on ``mesh``."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``abstract`` carrying ``shardings``: a restore target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
