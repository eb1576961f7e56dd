"""A diffusers pipeline folder (``unet/`` + ``scheduler/``) or UNet folder (+ ``scheduler_config.json``)
as a :class:`jaxdiff.sampling.SamplingModel`: the UNet converted to NNX, the noise process and
prediction kind from the scheduler config."""
from __future__ import annotations

import os

from flax import nnx

from jaxdiff.convert.diffusers_io import load_unet, read_config
from jaxdiff.convert.scheduler import process_from_scheduler_config, read_scheduler_config
from jaxdiff.nn.functional import make_apply, split_model
from jaxdiff.sampling import SamplingModel


def load_diffusers_model(folder: str) -> SamplingModel:
    """The UNet of ``folder`` (a pipeline with ``unet/`` or a UNet folder) ready to sample: parameters as a
    pure dict, ``shape`` ``(sample_size, sample_size, in_channels)``. Raises ValueError naming a missing or
    unusable part (no integer ``sample_size``, an unsupported scheduler)."""
    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    process, prediction = process_from_scheduler_config(read_scheduler_config(folder))
    size = read_config(unet_dir).get("sample_size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"the UNet config in {unet_dir} has no integer sample_size; cannot size the samples")
    unet = load_unet(unet_dir)
    graphdef, params, rest = split_model(unet)
    c = unet.config
    return SamplingModel(apply=make_apply(graphdef, rest), params=nnx.to_pure_dict(params), process=process,
                         prediction=prediction, shape=(size, size, c.in_channels), num_classes=c.num_classes,
                         class_null=c.class_null, source=folder)
