"""A small NNX CNN classifier for the embedded digits (16x16x1 or 32x32x1, NHWC, values in [-1, 1]).

It is the feature extractor of :func:`jaxdiff.extractors.digits_classifier`: ``features(x)`` gives the penultimate
embedding ``(B, feature_dim)`` in which Fréchet distance / KID / precision-recall are measured, and
``__call__(x)`` gives the 10 class logits. The trained weights ship as
``jaxdiff/assets/digits_classifier_{16,32}.npz`` (written by ``benchmarks/train_digits_classifier.py``).

Architecture: at 32x32, first a 2x2 average pooling to 16x16 (the digits are bicubic upsamplings of
8x8 images, so this loses almost nothing and keeps the 32x32 model as cheap as the 16x16 one); then
three blocks of 3x3 conv -> GroupNorm(8) -> ReLU -> 2x2 average pooling (16, 32, 64 channels),
taking the image down to 2x2; flatten;
``Dense(4 * C, feature_dim)`` (the features, taken *before* the activation so that no unit is
constantly zero and the feature covariance is generically full rank); ReLU; ``Dense(feature_dim, 10)``.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.layers import Conv2d, Dense, GroupNorm

NUM_CLASSES = 10
_WIDTHS = (16, 32, 64)
_RESOLUTIONS = (16, 32)
_META_PREFIX = "__meta__/"


class ConvStage(nnx.Module):
    """3x3 conv -> GroupNorm -> ReLU -> 2x2 average pooling. ``(B, H, W, Ci) -> (B, H/2, W/2, Co)``."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(in_ch, out_ch, 3, rngs=rngs)
        self.norm = GroupNorm(min(8, out_ch), out_ch, eps=1e-5)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, Ci)`` -> ``(B, H/2, W/2, Co)`` float32."""
        x = jax.nn.relu(self.norm(self.conv(x)))
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class DigitsClassifier(nnx.Module):
    """CNN digit classifier. ``(B, r, r, 1)`` in [-1, 1] -> logits ``(B, 10)``; ``r`` in {16, 32}.

    ``features(x)`` -> ``(B, feature_dim)`` penultimate (pre-activation) embedding.
    Computes in float32 whatever the input dtype.
    """

    def __init__(self, resolution: int = 16, feature_dim: int = 64, *, rngs: nnx.Rngs):
        if resolution not in _RESOLUTIONS:
            raise ValueError(f"DigitsClassifier: resolution must be one of {_RESOLUTIONS}, got {resolution}")
        if feature_dim < 1:
            raise ValueError(f"DigitsClassifier: feature_dim must be positive, got {feature_dim}")
        self.resolution, self.feature_dim = resolution, feature_dim
        widths = _WIDTHS
        chans = (1,) + widths
        self.stages = nnx.List([ConvStage(chans[i], chans[i + 1], rngs=rngs) for i in range(len(widths))])
        self.embed = Dense(4 * widths[-1], feature_dim, rngs=rngs)
        self.head = Dense(feature_dim, NUM_CLASSES, rngs=rngs)

    def _check(self, x: jax.Array) -> jax.Array:
        r = self.resolution
        if x.ndim != 4 or x.shape[1:] != (r, r, 1):
            raise ValueError(f"DigitsClassifier: expected images (B, {r}, {r}, 1), got shape {tuple(x.shape)}")
        return jnp.asarray(x, jnp.float32)

    def features(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, r, r, 1)`` in [-1, 1] -> penultimate features ``(B, feature_dim)`` float32."""
        x = self._check(x)
        if self.resolution == 32:
            b = x.shape[0]
            x = x.reshape(b, 16, 2, 16, 2, 1).mean(axis=(2, 4))
        for stage in self.stages:
            x = stage(x)
        return self.embed(x.reshape(x.shape[0], -1))

    def logits_from_features(self, f: jax.Array) -> jax.Array:
        """``f``: ``(B, feature_dim)`` -> logits ``(B, 10)``."""
        return self.head(jax.nn.relu(f))

    def features_and_logits(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x``: ``(B, r, r, 1)`` -> ``(features (B, feature_dim), logits (B, 10))`` in one pass."""
        f = self.features(x)
        return f, self.logits_from_features(f)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, r, r, 1)`` in [-1, 1] -> logits ``(B, 10)`` float32."""
        return self.logits_from_features(self.features(x))


def _flat_params(model: nnx.Module) -> tuple[dict[str, jax.Array], object, list]:
    state = nnx.state(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    return dict(zip(names, (v for _, v in leaves))), treedef, names


def save_classifier(model: DigitsClassifier, path: str | os.PathLike, **metadata: float) -> None:
    """Write ``model``'s parameters (float32) and scalar ``metadata`` to a compressed ``.npz`` at ``path``."""
    params, _, _ = _flat_params(model)
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
    arrays[_META_PREFIX + "resolution"] = np.asarray(model.resolution)
    arrays[_META_PREFIX + "feature_dim"] = np.asarray(model.feature_dim)
    for k, v in metadata.items():
        arrays[_META_PREFIX + k] = np.asarray(v)
    np.savez_compressed(path, **arrays)


def load_classifier(path: str | os.PathLike) -> tuple[DigitsClassifier, dict[str, float]]:
    """Read a ``.npz`` written by :func:`save_classifier` -> ``(model, metadata)``.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` if its parameters do not
    match the architecture it declares (missing name or wrong shape).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits classifier weights not found at {path!r}; "
                                "train them with benchmarks/train_digits_classifier.py")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    meta = {k[len(_META_PREFIX):]: v.item() for k, v in data.items() if k.startswith(_META_PREFIX)}
    if "resolution" not in meta or "feature_dim" not in meta:
        raise ValueError(f"{path!r} is not a digits classifier file (no resolution/feature_dim metadata)")
    model = DigitsClassifier(int(meta["resolution"]), int(meta["feature_dim"]), rngs=nnx.Rngs(0))
    params, treedef, names = _flat_params(model)
    values = []
    for name in names:
        if name not in data:
            raise ValueError(f"{path!r}: missing parameter {name!r}")
        if data[name].shape != params[name].shape:
            raise ValueError(f"{path!r}: parameter {name!r} has shape {data[name].shape}, "
                             f"expected {params[name].shape}")
        values.append(jnp.asarray(data[name], jnp.float32))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, values))
    return model, meta


def classifier_fn(model: DigitsClassifier) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """A pure jax function ``images (B, r, r, 1) -> (features (B, D), logits (B, 10))`` of ``model``.

    The parameters are closed over as arrays (no Flax objects cross the boundary), so the result can be
    passed to ``jax.jit`` and to :class:`jaxdiff.metrics.features.FeatureExtractor`.
    """
    graphdef, state = nnx.split(model)

    def fn(images):
        return nnx.merge(graphdef, state).features_and_logits(images)

    return fn
