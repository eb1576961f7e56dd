"""Feature extractors built from networks: pytorch-fid's FID InceptionV3 and the project's digits classifier,
each wrapped as a :class:`~jaxdiff.metrics.features.FeatureExtractor` for the pure metrics of
:mod:`jaxdiff.metrics`.

This module sits above ``nn``, ``convert`` and ``data`` (it loads networks and the real digits) and below
``train_lib`` and the entry points; :mod:`jaxdiff.metrics` itself imports none of them.

**FID Inception.** :func:`inception_extractor` wraps :class:`jaxdiff.nn.inception.InceptionV3FID`
(pytorch-fid's FID network, loaded from its weight file by :func:`jaxdiff.convert.inception.load_inception_fid`)
as a ``FeatureExtractor`` named ``"inception_v3_fid"``, so :func:`~jaxdiff.metrics.features.compute_metrics`
adds the ``fid`` / ``kid`` / ``inception_score`` aliases. Its ``fn`` maps images
``(B, image_size, image_size, channels)`` in [-1, 1] to ``(pool3 features (B, 2048), logits (B, 1008))``
and runs pytorch-fid's input pipeline (``[0, 1]``, bilinear resize to 299x299 as
``F.interpolate(align_corners=False)``, ``2 x - 1``) inside the network.

Batching and devices: :func:`~jaxdiff.metrics.features.extract` (and ``extract_stats`` /
``compute_metrics``) jit ``fn`` once per batch shape and pad the last batch, so a run compiles once;
pass ``sharding=jaxdiff.metrics.inception_sharding(batch_size)`` (or any batch-axis ``NamedSharding``) to
split each batch over all devices. The network's parameters are closed over by ``fn`` and replicated.

Quantization: pytorch-fid reads PNG files (uint8). To score float samples as pytorch-fid would score
their PNGs, quantize them first with :func:`jaxdiff.metrics.quantize.quantize_uint8` (``evaluate.py``
does); uint8 batches are mapped to [-1, 1] by ``extract`` and back to ``u / 255`` by the network's
pipeline (within 1 float32 ulp of pytorch-fid's ``ToTensor``).

Grey images: pytorch-fid opens PNGs with ``Image.open(path).convert("RGB")``, which copies the one
grey channel to R, G and B (clean-fid does the same repeat). ``channels=1`` extractors therefore repeat
the channel to 3 inside ``fn``; features equal those of the 3-channel copy exactly. Other channel
counts raise ``ValueError``.

**Digits.** :func:`digits_classifier` wraps the shipped ``jaxdiff/assets/digits_classifier_{16,32}.npz``
(:class:`jaxdiff.nn.classifier.DigitsClassifier`, trained by ``benchmarks/train_digits_classifier.py``;
held-out test-split accuracy is stored in the file and reported in
``benchmarks/results/digits_classifier.md``) as a ``FeatureExtractor`` whose features are its 64-d
penultimate embedding. :func:`digits_quality` scores class-conditional samples: does the classifier
agree with the requested class, and how far are the samples from real digits in that feature space.

Shipped weights (2,000 AdamW steps, ±2 px / ±4 px shift augmentation, seed 0): held-out test-split
accuracy 98.89% at 16x16 and 98.61% at 32x32 (train split 100%); about 156 kB each. On the real
test split ``digits_quality`` gives class agreement = that accuracy, and the Fréchet distance between
the real train and test splits is far below that of uniform noise (see ``tests/test_metrics.py``).
"""
from __future__ import annotations

import os
from functools import lru_cache

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.inception import load_inception_fid
from jaxdiff.data.digits import load_digits_arrays
from jaxdiff.metrics.features import FeatureExtractor, extract, metrics_from_features
from jaxdiff.nn.classifier import classifier_fn, load_classifier
from jaxdiff.nn.inception import InceptionV3FID

__all__ = ["INCEPTION_NAME", "DIGITS_RESOLUTIONS", "inception_fn", "inception_extractor",
           "classifier_weights_path", "digits_classifier", "digits_classifier_info", "digits_quality"]

INCEPTION_NAME = "inception_v3_fid"
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_RESOLUTIONS = (16, 32)


# ----------------------------------------------------------------------------------------------------
# FID Inception
# ----------------------------------------------------------------------------------------------------

def inception_fn(model: InceptionV3FID, *, channels: int = 3, logits: bool = True):
    """A pure jax function of ``model`` (an :class:`~jaxdiff.nn.inception.InceptionV3FID`):
    images ``(B, H, W, channels)`` in [-1, 1] -> ``(features (B, 2048), logits (B, 1008) or None)``.

    ``channels`` 1 (grey: repeated to RGB, as pytorch-fid's ``convert("RGB")``) or 3. The module's
    variables are split out once and closed over as arrays, so the function is jit-able and holds no
    Flax object.
    """
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
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
        raise ValueError(f"inception_extractor: image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"inception_extractor: channels must be 1 (grey, repeated to RGB as pytorch-fid's "
                         f"convert('RGB')) or 3, got {channels}")
    if isinstance(weights, InceptionV3FID):
        model = weights
    elif weights is None or isinstance(weights, (str, os.PathLike)):
        model = load_inception_fid(weights, precision=precision)
    else:
        raise ValueError(f"inception_extractor: weights must be an InceptionV3FID, a path or None, "
                         f"got {type(weights).__name__}")
    return FeatureExtractor(name=INCEPTION_NAME, fn=inception_fn(model, channels=channels, logits=logits),
                            input_size=int(image_size), channels=int(channels))


# ----------------------------------------------------------------------------------------------------
# digits classifier
# ----------------------------------------------------------------------------------------------------

def classifier_weights_path(resolution: int = 16) -> str:
    """Path of the shipped classifier weights for ``resolution`` (16 or 32); the file may be missing."""
    if resolution not in DIGITS_RESOLUTIONS:
        raise ValueError(f"digits classifier: resolution must be one of {DIGITS_RESOLUTIONS}, got {resolution}")
    return os.path.join(ASSETS_DIR, f"digits_classifier_{resolution}.npz")


@lru_cache(maxsize=None)
def _load_classifier(resolution: int):
    path = classifier_weights_path(resolution)
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits classifier weights for resolution {resolution} are missing: {path}. "
                                "Run `python benchmarks/train_digits_classifier.py` to create them.")
    model, meta = load_classifier(path)
    if int(meta["resolution"]) != resolution:
        raise ValueError(f"{path}: holds a classifier for resolution {meta['resolution']}, not {resolution}")
    return classifier_fn(model), meta


def digits_classifier(resolution: int = 16) -> FeatureExtractor:
    """The shipped digits classifier as a :class:`FeatureExtractor` named ``digits_classifier_{r}``.

    ``fn``: images ``(B, r, r, 1)`` in [-1, 1] -> ``(features (B, 64), logits (B, 10))``.
    Raises ``FileNotFoundError`` when the weights file is absent.
    """
    fn, _ = _load_classifier(resolution)
    return FeatureExtractor(name=f"digits_classifier_{resolution}", fn=fn, input_size=resolution, channels=1)


def digits_classifier_info(resolution: int = 16) -> dict:
    """Metadata stored with the shipped weights (``test_accuracy``, ``train_accuracy``, ``steps``, ...)."""
    return dict(_load_classifier(resolution)[1])


@lru_cache(maxsize=None)
def _real_test_features(resolution: int):
    images, _ = load_digits_arrays("test", resolution)
    f, _ = extract(digits_classifier(resolution), images, batch_size=120)
    return f


def digits_quality(images, requested_labels, real_images=None, *, batch_size: int = 250,
                   kid_subsets: int = 100, seed: int = 0) -> dict:
    """Quality of digit samples ``images`` ``(N, r, r, 1)`` (float in [-1, 1], or uint8) with ``r`` in {16, 32}.

    ``requested_labels``: ``(N,)`` int in [0, 10), the class each sample was asked to be.
    ``real_images``: the real reference ``(M, r, r, 1)``; default the held-out 360-image test split.

    Returns ``{"class_agreement": fraction whose predicted class == requested label,
    "per_class_agreement": (10,) list (NaN for absent classes), "mean_confidence": mean max softmax
    probability, "frechet_classifier_distance": Fréchet distance in the classifier's 64-d feature space,
    "kid_mean", "kid_std", "precision", "recall", "classifier_score_mean", "classifier_score_std",
    "num_fake", "num_real", "feature_space"}``. KID uses subsets of ``min(1000, N, M)``.
    """
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 1 or a.shape[1] != a.shape[2]:
        raise ValueError(f"digits_quality: images must be (N, r, r, 1), got shape {a.shape}")
    r = a.shape[1]
    if r not in DIGITS_RESOLUTIONS:
        raise ValueError(f"digits_quality: resolution must be one of {DIGITS_RESOLUTIONS}, got {r}")
    labels = np.asarray(requested_labels)
    if labels.shape != (a.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"digits_quality: requested_labels must be int (N,) = ({a.shape[0]},), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError("digits_quality: requested_labels must lie in [0, 10)")
    ext = digits_classifier(r)
    fake_f, fake_logits = extract(ext, a, batch_size)
    real_f = _real_test_features(r) if real_images is None else extract(ext, real_images, batch_size)[0]
    out = metrics_from_features(real_f, fake_f, fake_logits, feature_space=ext.name,
                                kid_subsets=kid_subsets, seed=seed)
    out["frechet_classifier_distance"] = out.pop("frechet_distance")
    pred = fake_logits.argmax(-1)
    out["class_agreement"] = float(np.mean(pred == labels))
    out["per_class_agreement"] = [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else float("nan")
                                  for c in range(10)]
    z = fake_logits - fake_logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    out["mean_confidence"] = float(p.max(-1).mean())
    return out
