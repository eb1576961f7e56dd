"""pytorch-fid's InceptionV3 as a :class:`~jaxdiff.metrics.features.FeatureExtractor` (FID, KID, IS).

:func:`inception_extractor` wraps :class:`jaxdiff.nn.inception.InceptionV3FID` (pytorch-fid's FID
network, loaded from its weight file by :func:`jaxdiff.convert.inception.load_inception_fid`) as a
``FeatureExtractor`` named ``"inception_v3_fid"``, so :func:`~jaxdiff.metrics.features.compute_metrics`
adds the ``fid`` / ``kid`` / ``inception_score`` aliases. Its ``fn`` maps images
``(B, image_size, image_size, channels)`` in [-1, 1] to ``(pool3 features (B, 2048), logits (B, 1008))``
and runs pytorch-fid's input pipeline (``[0, 1]``, bilinear resize to 299x299 as
``F.interpolate(align_corners=False)``, ``2 x - 1``) inside the network.

Batching and devices: :func:`~jaxdiff.metrics.features.extract` (and ``extract_stats`` /
``compute_metrics``) jit ``fn`` once per batch shape and pad the last batch, so a run compiles once;
pass ``sharding=inception_sharding(batch_size)`` (or any batch-axis ``NamedSharding``) to split each
batch over all devices. The network's parameters are closed over by ``fn`` and replicated.

Quantization: pytorch-fid reads PNG files (uint8). To score float samples as pytorch-fid would score
their PNGs, quantize them first with :func:`jaxdiff.metrics.quantize.quantize_uint8` (``evaluate.py``
does); uint8 batches are mapped to [-1, 1] by ``extract`` and back to ``u / 255`` by the network's
pipeline (within 1 float32 ulp of pytorch-fid's ``ToTensor``).

Grey images: pytorch-fid opens PNGs with ``Image.open(path).convert("RGB")``, which copies the one
grey channel to R, G and B (clean-fid does the same repeat). ``channels=1`` extractors therefore repeat
the channel to 3 inside ``fn``; features equal those of the 3-channel copy exactly. Other channel
counts raise ``ValueError``.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.features import FeatureExtractor

NAME = "inception_v3_fid"
FEATURE_DIM = 2048
NUM_LOGITS = 1008


def inception_fn(model, *, channels: int = 3, logits: bool = True):
    """A pure jax function of ``model`` (an :class:`~jaxdiff.nn.inception.InceptionV3FID`):
    images ``(B, H, W, channels)`` in [-1, 1] -> ``(features (B, 2048), logits (B, 1008) or None)``.

    ``channels`` 1 (grey: repeated to RGB, as pytorch-fid's ``convert("RGB")``) or 3. The module's
    variables are split out once and closed over as arrays, so the function is jit-able and holds no
    Flax object.
    """
    from flax import nnx  # Flax stays behind this function
    if channels not in (1, 3):
        raise ValueError(f"inception: images must have 1 (grey, repeated to RGB) or 3 channels, got {channels}")
    graphdef, state = nnx.split(model)

    def fn(images):
        if images.shape[-1] != channels:
            raise ValueError(f"inception: expected {channels}-channel images, got shape {tuple(images.shape)}")
        if channels == 1:
            images = jnp.repeat(images, 3, axis=-1)
        net = nnx.merge(graphdef, state)
        if logits:
            return net(images, return_logits=True)
        return net(images), None

    return fn


def inception_extractor(weights=None, *, image_size: int = 299, channels: int = 3, logits: bool = True,
                        precision=None) -> FeatureExtractor:
    """The FID Inception network as a :class:`FeatureExtractor` named ``"inception_v3_fid"``.

    ``weights``: an :class:`~jaxdiff.nn.inception.InceptionV3FID` instance (e.g. with random weights, for
    tests), a path to pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or a folder holding it),
    or ``None`` for ``$JAXDIFF_INCEPTION_WEIGHTS``. Nothing is downloaded: a missing file raises
    ``FileNotFoundError`` saying where to get it.

    ``image_size`` / ``channels``: the size of the images that will be passed (square
    ``(B, image_size, image_size, channels)``; they are resized to 299 inside, as pytorch-fid does);
    ``extract`` rejects other shapes with a message. ``channels=1`` repeats grey to RGB.
    ``logits``: also return the 1008 classifier logits (Inception Score). ``precision``: convolution
    precision when loading from a file (``jax.lax.Precision.HIGHEST`` on GPUs/TPUs that otherwise use
    reduced-precision float32 matmuls).

    ``fn``: ``(B, image_size, image_size, channels)`` float in [-1, 1] -> ``((B, 2048), (B, 1008) | None)``.
    """
    from jaxdiff.nn.inception import InceptionV3FID
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
        raise ValueError(f"inception_extractor: image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"inception_extractor: channels must be 1 (grey, repeated to RGB as pytorch-fid's "
                         f"convert('RGB')) or 3, got {channels}")
    if isinstance(weights, InceptionV3FID):
        model = weights
    elif weights is None or isinstance(weights, (str, os.PathLike)):
        from jaxdiff.convert.inception import load_inception_fid
        model = load_inception_fid(weights, precision=precision)
    else:
        raise ValueError(f"inception_extractor: weights must be an InceptionV3FID, a path or None, "
                         f"got {type(weights).__name__}")
    return FeatureExtractor(name=NAME, fn=inception_fn(model, channels=channels, logits=logits),
                            input_size=int(image_size), channels=int(channels))


def inception_sharding(batch_size: int, mesh: jax.sharding.Mesh | None = None) -> jax.sharding.NamedSharding:
    """A sharding that splits a ``(batch_size, H, W, C)`` image batch over all devices along the batch.

    ``mesh``: shard over all of its axes jointly (e.g. a training mesh ``(data, fsdp)``); ``None``: a 1-D
    mesh over ``jax.devices()``. Raises ``ValueError`` when ``batch_size`` is not a multiple of the
    device count (use it as ``extract(..., sharding=inception_sharding(b))``).
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    n = int(np.prod(list(mesh.shape.values())))
    if batch_size % n:
        raise ValueError(f"feature batch size {batch_size} is not a multiple of the {n} devices it is sharded "
                         f"over; use a multiple of {n}")
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
