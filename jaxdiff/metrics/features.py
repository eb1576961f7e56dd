"""The feature-extractor slot: any ``images -> (features, logits)`` function, batched extraction, metrics.

A :class:`FeatureExtractor` wraps a pure jax function of images ``(B, H, W, C)`` in [-1, 1] (NHWC,
``H = W = input_size``, ``C = channels``) returning ``(features (B, D), logits (B, K) | None)``.
:func:`extract` runs it batch by batch (one jit compilation: the last batch is padded), optionally
with the batch sharded over devices; :func:`compute_metrics` gives the sample-quality metrics of fake
images against a real reference in that feature space.

Naming is honest: the Fréchet distance is reported as ``"frechet_distance"`` together with
``"feature_space"`` (the extractor's name); it is FID only for InceptionV3 pool3 features, in which
case the alias ``"fid"`` is added too (likewise ``"kid"`` / ``"inception_score"``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.frechet import frechet_distance
from jaxdiff.metrics.inception_score import inception_score
from jaxdiff.metrics.kid import kid
from jaxdiff.metrics.precision_recall import precision_recall
from jaxdiff.metrics.stats import FeatureStats

ExtractFn = Callable[[jax.Array], tuple[jax.Array, "jax.Array | None"]]


@dataclass(frozen=True)
class FeatureExtractor:
    """A named feature extractor.

    ``fn``: pure jax function ``images (B, input_size, input_size, channels)`` float in [-1, 1]
    -> ``(features (B, D), logits (B, K) or None)``; jit-able, batch-size independent.
    ``name``: the feature space ("digits_classifier_16", "inception_v3_pool3", ...).
    """

    name: str
    fn: ExtractFn = field(repr=False)
    input_size: int
    channels: int

    @property
    def is_inception(self) -> bool:
        """True when ``name`` declares InceptionV3 features (then FID/KID/IS are the proper names)."""
        return self.name.lower().startswith("inception")


def _prepare(batch, extractor: FeatureExtractor) -> np.ndarray:
    a = np.asarray(batch)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 127.5 - 1.0
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{extractor.name}: images must be float in [-1, 1] or uint8, got dtype {a.dtype}")
    want = (extractor.input_size, extractor.input_size, extractor.channels)
    if a.ndim != 4 or a.shape[1:] != want:
        raise ValueError(f"{extractor.name}: expected images (B, {want[0]}, {want[1]}, {want[2]}) NHWC, "
                         f"got shape {a.shape}")
    return a


def _batches(images, batch_size: int, extractor: FeatureExtractor):
    if isinstance(images, (np.ndarray, jax.Array)):
        for s in range(0, images.shape[0], batch_size):
            yield _prepare(images[s:s + batch_size], extractor)
    else:
        for b in images:
            b = _prepare(b, extractor)
            for s in range(0, b.shape[0], batch_size):
                yield b[s:s + batch_size]


def extract(extractor: FeatureExtractor, images: np.ndarray | jax.Array | Iterable, batch_size: int = 250,
            sharding: jax.sharding.Sharding | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``extractor`` over ``images`` -> ``(features (N, D), logits (N, K) or None)`` as numpy arrays.

    ``images``: an array ``(N, H, W, C)`` or an iterable of such batches (any sizes; they are re-cut to
    ``batch_size``), float in [-1, 1] or uint8 in [0, 255] (scaled as ``x / 127.5 - 1``).
    ``sharding``: optional sharding of each ``(batch_size, H, W, C)`` batch (e.g.
    ``NamedSharding(mesh, P("data"))``); ``batch_size`` must then split evenly over it. Every batch is
    padded to ``batch_size`` so ``fn`` compiles once; padding rows are dropped from the outputs.
    """
    if batch_size < 1:
        raise ValueError(f"extract: batch_size must be >= 1, got {batch_size}")
    if sharding is not None:
        shape = (batch_size, extractor.input_size, extractor.input_size, extractor.channels)
        try:
            sharding.shard_shape(shape)
        except Exception as e:  # noqa: BLE001 - re-raised with the reason
            raise ValueError(f"extract: batch_size {batch_size} cannot be split by the given sharding: {e}") from e
    fn = jax.jit(extractor.fn)
    feats, logits = [], []
    has_logits = None
    for b in _batches(images, batch_size, extractor):
        n = b.shape[0]
        if n == 0:
            continue
        if n < batch_size:
            b = np.concatenate([b, np.broadcast_to(b[:1], (batch_size - n,) + b.shape[1:])], 0)
        x = jax.device_put(b, sharding) if sharding is not None else jnp.asarray(b)
        f, lg = fn(x)
        if f.ndim != 2 or f.shape[0] != batch_size:
            raise ValueError(f"{extractor.name}: fn must return features (B, D), got shape {tuple(f.shape)}")
        has_logits = lg is not None
        feats.append(np.asarray(jax.device_get(f))[:n])
        if has_logits:
            logits.append(np.asarray(jax.device_get(lg))[:n])
    if not feats:
        raise ValueError("extract: no images")
    return np.concatenate(feats), (np.concatenate(logits) if has_logits else None)


def extract_stats(extractor: FeatureExtractor, images, batch_size: int = 250,
                  sharding: jax.sharding.Sharding | None = None) -> FeatureStats:
    """Streaming :class:`FeatureStats` of ``extractor``'s features over ``images`` (as :func:`extract`),
    without keeping the features. Save with ``save_stats(path, *stats.mu_sigma())``.
    """
    stats = FeatureStats()
    fn = jax.jit(lambda x: extractor.fn(x)[0])
    for b in _batches(images, batch_size, extractor):
        n = b.shape[0]
        if n == batch_size and sharding is not None:
            stats.update(fn(jax.device_put(b, sharding)))
        elif n:
            pad = np.concatenate([b, np.broadcast_to(b[:1], (batch_size - n,) + b.shape[1:])], 0)
            x = jax.device_put(pad, sharding) if sharding is not None else jnp.asarray(pad)
            stats.update(np.asarray(jax.device_get(fn(x)))[:n])
    return stats


def _real_reference(real):
    """-> (mu, sigma, features or None, logits or None) from the accepted forms of a real reference."""
    if isinstance(real, FeatureStats):
        return (*real.mu_sigma(), None)
    if isinstance(real, tuple) and len(real) == 2 and np.ndim(real[0]) == 1:
        return np.asarray(real[0], np.float64), np.asarray(real[1], np.float64), None
    return None


def compute_metrics(extractor: FeatureExtractor, fake_images, real, *, batch_size: int = 250,
                    sharding: jax.sharding.Sharding | None = None, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, k: int = 3, is_splits: int = 10, seed: int = 0) -> dict:
    """Sample-quality metrics of ``fake_images`` against ``real`` in ``extractor``'s feature space.

    ``fake_images``: ``(N, H, W, C)`` (or an iterable of batches), float in [-1, 1] or uint8.
    ``real``: real images (same forms), or a reference given by statistics only — a
    :class:`FeatureStats` or a ``(mu (D,), sigma (D, D))`` tuple (e.g. from ``load_stats``); with
    statistics only, KID and precision/recall (which need features) are omitted.

    Returns a dict: ``feature_space`` (name), ``num_fake``, ``num_real``, ``frechet_distance``;
    with real features ``kid_mean``, ``kid_std``, ``precision``, ``recall``; when the extractor gives
    logits ``classifier_score_mean`` / ``_std`` (the IS formula). For Inception extractors the aliases
    ``fid``, ``kid``, ``inception_score`` are added.
    """
    fake_f, fake_logits = extract(extractor, fake_images, batch_size, sharding)
    ref = _real_reference(real)
    if ref is None:
        real_f, _ = extract(extractor, real, batch_size, sharding)
        return metrics_from_features(real_f, fake_f, fake_logits, feature_space=extractor.name,
                                     kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=k,
                                     is_splits=is_splits, seed=seed)
    return metrics_from_features(None, fake_f, fake_logits, feature_space=extractor.name, real_stats=real,
                                 is_splits=is_splits)


def metrics_from_features(real_features, fake_features, fake_logits=None, *, feature_space: str,
                          real_stats=None, fake_stats: FeatureStats | None = None, kid_subsets: int = 100,
                          kid_subset_size: int = 1000, k: int = 3, is_splits: int = 10, seed: int = 0) -> dict:
    """:func:`compute_metrics` on already extracted features.

    ``real_features``: ``(N_r, D)`` or ``None``; ``real_stats``: a :class:`FeatureStats` or a
    ``(mu (D,), sigma (D, D))`` tuple. At least one is needed: the Frechet distance uses ``real_stats``
    when given (else the statistics of ``real_features``); KID and precision/recall need
    ``real_features``. ``fake_features``: ``(N_f, D)``; ``fake_stats``: their statistics if already
    streamed (else computed here); ``fake_logits``: ``(N_f, K)`` or ``None``. ``feature_space``: name
    reported in the result (names starting with "inception" add the ``fid`` / ``kid`` /
    ``inception_score`` aliases). A dimension mismatch raises ValueError.
    """
    fake_f = np.asarray(fake_features, np.float64)
    if fake_f.ndim != 2:
        raise ValueError(f"metrics: fake features must be (N, D), got shape {fake_f.shape}")
    out: dict = {"feature_space": feature_space, "num_fake": int(fake_f.shape[0]), "num_real": None}
    real_f = None
    if real_features is not None:
        real_f = np.asarray(real_features, np.float64)
        if real_f.ndim != 2 or real_f.shape[1] != fake_f.shape[1]:
            raise ValueError(f"metrics: real features {real_f.shape} and fake features {fake_f.shape} "
                             "must be (N, D) with the same D")
        out["num_real"] = int(real_f.shape[0])
    if real_stats is not None:
        ref = _real_reference(real_stats)
        if ref is None:
            raise ValueError("metrics: real reference must be features, FeatureStats or a (mu, sigma) tuple")
        mu_r, sig_r, _ = ref
        if isinstance(real_stats, FeatureStats):
            out["num_real"] = int(real_stats.count)
        if mu_r.shape[0] != fake_f.shape[1]:
            raise ValueError(f"metrics: reference statistics have dim {mu_r.shape[0]}, "
                             f"features have dim {fake_f.shape[1]}")
    elif real_f is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rank check in frechet_distance reports it once
            mu_r, sig_r = FeatureStats.from_features(real_f).mu_sigma()
    else:
        raise ValueError("metrics: give real features and/or real statistics")
    mu_f, sig_f = (fake_stats or FeatureStats.from_features(fake_f)).mu_sigma()   # warns when N <= D
    out["frechet_distance"] = frechet_distance(mu_r, sig_r, mu_f, sig_f)
    if real_f is not None:
        out["kid_mean"], out["kid_std"] = kid(real_f, fake_f, kid_subsets, kid_subset_size, seed)
        out["precision"], out["recall"] = precision_recall(real_f, fake_f, k=k)
    if fake_logits is not None:
        splits = min(is_splits, fake_f.shape[0])
        out["classifier_score_mean"], out["classifier_score_std"] = inception_score(fake_logits, splits=splits)
    if feature_space.lower().startswith("inception"):
        out["fid"] = out["frechet_distance"]
        if "kid_mean" in out:
            out["kid"] = out["kid_mean"]
        if "classifier_score_mean" in out:
            out["inception_score"] = out["classifier_score_mean"]
    return out
