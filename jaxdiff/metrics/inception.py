"""Batch sharding for feature extraction: :func:`inception_sharding` splits image batches over all devices.

Pass it to :func:`~jaxdiff.metrics.features.extract` (``sharding=inception_sharding(batch_size)``) with any
feature extractor; the FID Inception extractor itself is built by :func:`jaxdiff.extractors.inception_extractor`
(it needs ``nn`` and ``convert``, which sit above the metrics).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def inception_sharding(batch_size: int, mesh: Mesh | None = None) -> NamedSharding:
    """A sharding that splits a ``(batch_size, H, W, C)`` image batch over all devices along the batch.

    ``mesh``: shard over all of its axes jointly (e.g. a training mesh ``(data, fsdp)``); ``None``: a 1-D
    mesh over ``jax.devices()``. Raises ``ValueError`` when ``batch_size`` is not a multiple of the
    device count (use it as ``extract(..., sharding=inception_sharding(b))``).
    """
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    n = int(np.prod(list(mesh.shape.values())))
    if batch_size % n:
        raise ValueError(f"feature batch size {batch_size} is not a multiple of the {n} devices it is sharded "
                         f"over; use a multiple of {n}")
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
