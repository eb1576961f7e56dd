"""Logical-axis sharding: map the logical names carried by every parameter (e.g.
``("conv_height", "conv_width", "conv_in", "conv_out")`` or ``("embed", "mlp")``) to the axes
of a ``jax.sharding.Mesh`` such as ``(data, fsdp, tensor)``.

Rules are ``(logical_name, mesh_axis | tuple[mesh_axis] | None)`` pairs. Mesh axes that the mesh
lacks are dropped, a mesh axis is used at most once per array, and a dimension that its mesh
axes do not divide is replicated, so any rule set gives a valid sharding.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", None),
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
)


def logical_to_mesh_axes(names: Sequence[str | None] | None, mesh: Mesh, rules=DEFAULT_RULES,
                         shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical ``names`` (length = ndim).

    ``shape`` (optional) enables the divisibility check: a dimension not divisible by the product
    of its mesh axes' sizes is replicated.
    """
    if not names:
        return PartitionSpec()
    table = dict(rules)
    used: set = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if shape is not None and axes and shape[i] % size:
            axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def _names(v: nnx.Variable):
    md = v.get_metadata()
    return md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A tree like ``state`` (from ``nnx.split``/``nnx.state``) whose leaves are ``NamedSharding``s
    obtained from each variable's logical axis names (replicated when it has none)."""
    def one(v):
        if isinstance(v, nnx.Variable):
            value = v.get_value()
            spec = logical_to_mesh_axes(_names(v), mesh, rules, getattr(value, "shape", None))
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """``jax.device_put`` every variable of ``state`` onto ``mesh`` by the logical rules."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for an input of rank ``ndim`` sharded on its leading (batch) axis."""
    spec = logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), mesh, rules)
    return NamedSharding(mesh, spec)
