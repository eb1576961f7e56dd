"""Scoring images in a feature space: the extractors by name, reference statistics of a dataset split,
streamed features of generated images, and the metrics (FID / KID / precision / recall / IS) against a
reference. ``jaxdiff.evaluate`` is the command line over it."""
from __future__ import annotations

import os
import time
import warnings
from typing import Iterable

import jax
import numpy as np

from jaxdiff.metrics.features import FeatureExtractor, extract, metrics_from_features
from jaxdiff.metrics.quantize import CONVENTION, DEFAULT_ATOL, quantize_uint8
from jaxdiff.metrics.stats import FeatureStats, load_stats, save_stats

FEATURES = ("inception", "digits")


class EvalError(ValueError):
    """A user-facing problem with the inputs (printed as ``error: ...``, exit status 2)."""


# --- extractors ----------------------------------------------------------------------------------

def build_extractor(kind: str, *, image_size: int, channels: int, inception_weights=None) -> FeatureExtractor:
    """The feature extractor ``kind`` ("inception" | "digits") for images ``(B, image_size, image_size, channels)``."""
    if kind == "digits":
        from jaxdiff.extractors import DIGITS_RESOLUTIONS as RESOLUTIONS, digits_classifier
        if image_size not in RESOLUTIONS or channels != 1:
            sizes = " or ".join(map(str, RESOLUTIONS))
            raise EvalError(f"--features digits needs grey (1-channel) images of size {sizes}, "
                            f"got {image_size}x{image_size}x{channels}; use --features inception")
        return digits_classifier(image_size)
    if kind == "inception":
        from jaxdiff.extractors import inception_extractor
        if channels not in (1, 3):
            raise EvalError(f"--features inception needs 1-channel (grey, repeated to RGB) or 3-channel images, "
                            f"got {channels} channels")
        return inception_extractor(inception_weights, image_size=image_size, channels=channels)
    raise EvalError(f"--features must be one of {FEATURES}, got {kind!r}")


def feature_batch_and_sharding(batch: int):
    """``(feature batch size, sharding or None)``: ``batch`` rounded up to a multiple of the device count,
    split over all devices along the batch when there is more than one."""
    n = jax.device_count()
    if n == 1:
        return batch, None
    from jaxdiff.metrics.inception import inception_sharding
    fb = -(-batch // n) * n
    return fb, inception_sharding(fb)


def feature_dim(extractor: FeatureExtractor) -> int:
    """The extractor's feature dimension D, from an abstract evaluation (no computation)."""
    x = jax.ShapeDtypeStruct((1, extractor.input_size, extractor.input_size, extractor.channels), np.float32)
    return int(jax.eval_shape(extractor.fn, x)[0].shape[-1])


class FeatureAccumulator:
    """Features of batches of images, streamed: ``FeatureStats`` plus the ``(N, D)`` features and logits.

    ``add(images)``: ``(B, H, W, C)`` uint8 (or float in [-1, 1]); the images are not kept.
    """

    def __init__(self, extractor: FeatureExtractor, batch_size: int, sharding=None):
        self.extractor, self.batch_size, self.sharding = extractor, batch_size, sharding
        self.stats = FeatureStats()
        self._features: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    def add(self, images) -> None:
        f, lg = extract(self.extractor, images, self.batch_size, self.sharding)
        self.stats.update(f)
        self._features.append(np.asarray(f, np.float32))
        if lg is not None:
            self._logits.append(np.asarray(lg, np.float32))

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self._features)

    @property
    def logits(self) -> np.ndarray | None:
        return np.concatenate(self._logits) if self._logits else None


# --- reference -----------------------------------------------------------------------------------

def features_path_for(stats_path: str) -> str:
    """``refs/x.npz`` -> ``refs/x_features.npz`` (where ``--write_ref_stats`` puts the features)."""
    stem = stats_path[:-4] if stats_path.endswith(".npz") else stats_path
    return stem + "_features.npz"


def load_reference_features(path: str, extractor: FeatureExtractor) -> np.ndarray:
    """``(M, D)`` float32 features from an ``.npz`` with key ``features``; checks D and the feature space."""
    if not os.path.isfile(path):
        raise EvalError(f"--ref_features {path!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "features" not in z.files:
            raise EvalError(f"{path}: missing key 'features' (found {sorted(z.files)}); expected (M, D) features")
        feats = np.asarray(z["features"], np.float32)
        space = str(z["feature_space"]) if "feature_space" in z.files else None
    if space is not None and space != extractor.name:
        raise EvalError(f"{path}: features are in the space {space!r}, but --features gives {extractor.name!r}")
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise EvalError(f"{path}: 'features' must be (M, D) with M >= 2, got shape {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise EvalError(f"{path}: 'features' contain non-finite values")
    return feats


def dataset_batches(dataset: str, split: str, image_size: int | None, batch: int, data_dir=None, crop="center",
                    limit: int | None = None):
    """``(num_examples, iterator of uint8 (b, s, s, C) batches)`` over a TFDS split, in order, every example once.

    Opens the split with :func:`jaxdiff.data.pipeline.open_source` and applies the training pipeline's
    deterministic transform (``crop`` + bicubic resize to ``image_size``; no flip, no shuffle), but keeps
    uint8 (as the PNG files pytorch-fid reads) and keeps the last partial batch (``make_iterator`` drops it).
    ``image_size=None``: the native size (images must then be square).
    """
    from jaxdiff.data import transforms
    from jaxdiff.data.pipeline import open_source
    source = open_source(dataset, split, data_dir)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise EvalError(f"dataset {dataset!r} split {split!r} is empty")
    first = transforms.check_image(source[0]["image"], "image")
    if image_size is None:
        if first.shape[0] != first.shape[1]:
            raise EvalError(f"{dataset} images are {first.shape[0]}x{first.shape[1]}: give --image_size to crop")
        image_size = first.shape[0]

    def gen():
        for s in range(0, n, batch):
            imgs = [transforms.crop_and_resize(transforms.check_image(source[i]["image"], "image"), image_size, crop)
                    for i in range(s, min(s + batch, n))]
            yield np.stack(imgs)

    return n, image_size, first.shape[-1], gen()


def write_reference(out: str, *, dataset: str, split: str, features: str, image_size: int | None = None,
                    batch: int = 250, data_dir=None, crop: str = "center", limit: int | None = None,
                    inception_weights=None, progress: bool = True) -> dict:
    """Statistics (``out``: mu, sigma) and features (``<stem>_features.npz``) of a TFDS split in the feature
    space ``features``; returns a summary dict."""
    from tqdm import tqdm
    if not dataset or not split:
        raise EvalError("writing reference statistics needs --dataset and --split")
    try:
        n, size, ch, batches = dataset_batches(dataset, split, image_size, batch, data_dir, crop, limit)
    except ValueError as e:
        raise EvalError(str(e)) from e
    extractor = build_extractor(features, image_size=size, channels=ch, inception_weights=inception_weights)
    fb, sharding = feature_batch_and_sharding(batch)
    acc = FeatureAccumulator(extractor, fb, sharding)
    t0 = time.perf_counter()
    with tqdm(total=n, desc=f"features {dataset}:{split}", unit="img", disable=not progress) as bar:
        for b in batches:
            acc.add(b)
            bar.update(len(b))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mu, sigma = acc.stats.mu_sigma()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_stats(out, mu, sigma)
    fpath = features_path_for(out)
    np.savez(fpath, features=acc.features, feature_space=np.asarray(extractor.name),
             dataset=np.asarray(dataset), split=np.asarray(split))
    return {"ref_stats": out, "ref_features": fpath, "dataset": dataset, "split": split,
            "num": n, "image_size": size, "channels": ch, "feature_space": extractor.name,
            "feature_dim": int(mu.shape[0]), "seconds": time.perf_counter() - t0,
            "warnings": [str(w.message) for w in caught]}


def load_reference(extractor: FeatureExtractor, ref_stats: str | None, ref_features: str | None):
    """``(stats (mu, sigma) | None, features (M, D) | None)`` from their files, checked against the
    extractor's feature space and dimension before any sampling."""
    if ref_stats is None and ref_features is None:
        raise EvalError("give the reference: --ref_stats stats.npz (mu, sigma) and/or --ref_features features.npz "
                        "(write them with --write_ref_stats)")
    dim = feature_dim(extractor)
    feats = load_reference_features(ref_features, extractor) if ref_features else None
    if feats is not None and feats.shape[1] != dim:
        raise EvalError(f"{ref_features}: features have dim {feats.shape[1]}, {extractor.name} "
                        f"gives {dim}: wrong --ref_features for --features?")
    stats = None
    if ref_stats is not None:
        if not os.path.isfile(ref_stats):
            raise EvalError(f"--ref_stats {ref_stats!r} does not exist (write it with --write_ref_stats)")
        try:
            stats = load_stats(ref_stats, dim)
        except ValueError as e:
            raise EvalError(f"{e} (--ref_stats for --features {extractor.name})") from e
    return stats, feats


# --- scoring -------------------------------------------------------------------------------------

def score(fake: FeatureAccumulator, feature_space: str, ref_stats=None, ref_features=None, *, kid_subsets=100,
          kid_subset_size=1000, k=3, is_splits=10, seed=0) -> dict:
    """Metrics of the accumulated fake features against ``ref_stats`` ``(mu (D,), sigma (D, D))`` and/or
    ``ref_features`` ``(M, D)``.

    The Fréchet distance compares the streamed fake statistics with ``ref_stats`` when given (else with
    the statistics of ``ref_features``); KID (``kid_mean``, ``kid_std``) and ``precision`` / ``recall``
    need ``ref_features``; ``classifier_score_mean`` / ``_std`` (the IS formula) need logits. Inception
    feature spaces add the aliases ``fid``, ``kid``, ``inception_score``. Warnings (e.g. fewer samples
    than feature dimensions: singular covariance) are collected, deduplicated, under ``"warnings"``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = metrics_from_features(ref_features, fake.features, fake.logits, feature_space=feature_space,
                                        real_stats=ref_stats, fake_stats=fake.stats, kid_subsets=kid_subsets,
                                        kid_subset_size=kid_subset_size, k=k, is_splits=is_splits, seed=seed)
        except ValueError as e:
            raise EvalError(f"{e}: wrong --ref_stats / --ref_features for --features?") from None
    msgs: list[str] = []
    for w in caught:
        if str(w.message) not in msgs:
            msgs.append(str(w.message))
    out["warnings"] = msgs
    return out




def score_chunks(chunks: Iterable[tuple[int, np.ndarray]], num: int, extractor: FeatureExtractor, *,
                 batch: int, reference: tuple, clip: bool = False, range_tolerance: float | None = None,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 3, seed: int = 0,
                 progress: bool = True) -> dict:
    """Score ``num`` images arriving as ``(start, images (b, H, W, C) float in [-1, 1])`` chunks (samples
    being drawn, or a file's): quantize to uint8 as a PNG writer would, stream the features, and compare
    with ``reference`` (:func:`load_reference`). Returns the metrics plus timing and clipping figures."""
    from tqdm import tqdm
    fb, sharding = feature_batch_and_sharding(batch)
    acc = FeatureAccumulator(extractor, fb, sharding)
    t_source = t_feat = 0.0
    clipped = values = 0
    with tqdm(total=num, desc=f"score {extractor.name}", unit="img", disable=not progress) as bar:
        t = time.perf_counter()
        for start, images in chunks:
            t_source += time.perf_counter() - t
            t = time.perf_counter()
            try:
                u8 = quantize_uint8(images, clip=clip, atol=DEFAULT_ATOL if range_tolerance is None else range_tolerance)
            except ValueError as e:
                raise EvalError(f"images {start}..{start + len(images) - 1}: {e}") from e
            clipped += int(np.sum(np.abs(images) > 1.0))
            values += int(np.size(images))
            acc.add(u8)
            t_feat += time.perf_counter() - t
            bar.update(len(images))
            t = time.perf_counter()
    ref_stats, ref_features = reference
    metrics = score(acc, extractor.name, ref_stats, ref_features, kid_subsets=kid_subsets,
                    kid_subset_size=kid_subset_size, k=k, seed=seed)
    return {"quantization": CONVENTION, "clip": clip, "clipped_fraction": clipped / max(values, 1),
            "seconds_source": t_source, "seconds_features": t_feat, **metrics}


def npz_chunks(path: str, batch: int) -> tuple[int, tuple[int, int, int], Iterable[tuple[int, np.ndarray]]]:
    """``(num, (H, W, C), chunks)`` of the ``images`` (N, H, W, C) float in [-1, 1] of a ``samples.npz``
    (what ``jaxdiff-sample`` writes)."""
    if not os.path.isfile(path):
        raise EvalError(f"--samples {path!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z.files:
            raise EvalError(f"{path}: missing key 'images' (found {sorted(z.files)}); expected (N, H, W, C)")
        images = np.asarray(z["images"])
    if images.ndim != 4 or images.shape[0] < 2:
        raise EvalError(f"{path}: 'images' must be (N, H, W, C) with N >= 2, got shape {images.shape}")
    return images.shape[0], tuple(images.shape[1:]), ((s, images[s:s + batch]) for s in range(0, len(images), batch))
