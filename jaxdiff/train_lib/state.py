"""The train state: everything a checkpoint holds besides the data position and the config."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


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
