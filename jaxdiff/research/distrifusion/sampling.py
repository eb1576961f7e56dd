"""A ``SamplingModel`` that samples through the patch-parallel UNet (what ``jaxdiff-sample --distrifusion`` uses)."""
from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff.research.distrifusion.model import DistriConfig, PatchParallelUNet
from jaxdiff.sampling import SamplingModel


def patch_parallel_sampling_model(model: SamplingModel, config: DistriConfig, devices=None) -> SamplingModel:
    """``model`` with its UNet computed in ``config.patches`` row patches (one per device).

    ``model.apply`` must come from :func:`jaxdiff.nn.functional.make_apply` (a training run's checkpoint or a
    converted diffusers UNet), so the module can be rebuilt from it. Sample it with a ``Sampler`` without a
    mesh (the devices hold patches of one image, not batch shards). Raises ValueError for a UNet with a layer
    the patch forward does not cover and for latent rows the patch count does not divide (here, before
    anything is compiled).
    """
    graphdef = getattr(model.apply, "graphdef", None)
    if graphdef is None:
        raise ValueError("patch parallelism needs the UNet module: model.apply must come from "
                         "jaxdiff.nn.functional.make_apply (a checkpoint or a converted diffusers UNet)")
    if model.params is None:
        raise ValueError("patch parallelism needs the model's parameters (model.params is None)")
    pp = PatchParallelUNet(graphdef, model.apply.rest, model.params, config, condition=model.apply.condition,
                           devices=devices)
    pp.check_shape((1,) + tuple(model.shape))
    params = jax.device_put(model.params, NamedSharding(pp.mesh, PartitionSpec()))   # replicated on the patches
    return dataclasses.replace(model, apply=pp, params=params)
