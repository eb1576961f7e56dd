"""Multi-host start-up and device meshes.

``initialize_distributed`` starts ``jax.distributed`` when the environment describes a multi-process
job (explicit ``JAXDIFF_COORDINATOR``/``JAXDIFF_NUM_PROCESSES``/``JAXDIFF_PROCESS_ID`` variables, or a
cluster JAX detects by itself: Cloud TPU, SLURM, ...). ``make_mesh`` builds the ``(data, fsdp)`` mesh
that training and sampling shard over; parameters follow ``jaxdiff.nn.sharding`` rules on it.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp")


def initialize_distributed(cpu_collectives: str | None = None) -> bool:
    """Initialize ``jax.distributed`` if the environment asks for several processes; returns whether it did.

    Explicit form (what the localhost multi-host tests use)::

        JAXDIFF_COORDINATOR=127.0.0.1:12345 JAXDIFF_NUM_PROCESSES=2 JAXDIFF_PROCESS_ID=0 python train.py ...

    ``cpu_collectives`` ("gloo" or "mpi") selects the CPU collectives implementation, needed for
    cross-process computations on CPU. On TPU pods and SLURM ``JAXDIFF_AUTO_DISTRIBUTED=1`` lets JAX
    discover the cluster itself. Must run before anything touches a JAX backend.
    """
    coord = os.environ.get("JAXDIFF_COORDINATOR")
    auto = os.environ.get("JAXDIFF_AUTO_DISTRIBUTED", "0") == "1"
    if not coord and not auto:
        return False
    if cpu_collectives or os.environ.get("JAXDIFF_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation",
                          cpu_collectives or os.environ["JAXDIFF_CPU_COLLECTIVES"])
    if auto:
        jax.distributed.initialize()
        return True
    try:
        n = int(os.environ["JAXDIFF_NUM_PROCESSES"])
        pid = int(os.environ["JAXDIFF_PROCESS_ID"])
    except KeyError as e:
        raise ValueError(f"JAXDIFF_COORDINATOR is set but {e.args[0]} is not: multi-process start needs "
                         "JAXDIFF_COORDINATOR, JAXDIFF_NUM_PROCESSES and JAXDIFF_PROCESS_ID") from None
    local = os.environ.get("JAXDIFF_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid,
                               local_device_ids=[int(i) for i in local.split(",")] if local else None)
    return True


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all, every process's).

    ``-1`` on one axis takes the remaining devices. The fsdp axis is innermost, so it stays within a
    host when its size divides the local device count. Raises ValueError when the sizes do not
    multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(data), int(fsdp)]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got data={data}, fsdp={fsdp}")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if n % known:
            raise ValueError(f"{n} devices cannot be split into a mesh with data={data}, fsdp={fsdp}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} = {int(np.prod(sizes))} devices, "
                         f"but {n} are available")
    # jax.make_mesh orders the devices by the physical topology (TPU/GPU interconnect); fsdp, the inner
    # axis, gets the closest devices. Auto axes: shardings come from jit in/out shardings, as everywhere here.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types, devices=devices)
