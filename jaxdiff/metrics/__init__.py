"""Sample-quality metrics (pure jax/numpy): streaming feature statistics, Fréchet distance, KID,
improved precision/recall, Inception-style score, and a feature-extractor slot.

:mod:`jaxdiff.metrics.inception` wraps pytorch-fid's FID InceptionV3 as a ``FeatureExtractor`` (Flax is
imported when it is built); :func:`quantize_uint8` quantizes float samples as a PNG writer does.
The digits-specific pieces (:mod:`jaxdiff.metrics.digits`, which loads the project's trained classifier
from :mod:`jaxdiff.nn.classifier`) are imported on demand, not here.
"""
from jaxdiff.metrics.features import FeatureExtractor, compute_metrics, extract, extract_stats, metrics_from_features
from jaxdiff.metrics.frechet import frechet_distance, trace_sqrt_product
from jaxdiff.metrics.inception import inception_extractor, inception_sharding
from jaxdiff.metrics.inception_score import inception_score
from jaxdiff.metrics.kid import kid, kid_subset_indices, mmd2_unbiased, polynomial_kernel
from jaxdiff.metrics.precision_recall import knn_radii, precision_recall
from jaxdiff.metrics.quantize import check_range, quantize_uint8
from jaxdiff.metrics.stats import FeatureStats, load_stats, save_stats

__all__ = [
    "FeatureExtractor", "FeatureStats", "check_range", "compute_metrics", "extract", "extract_stats",
    "frechet_distance", "inception_extractor", "inception_score", "inception_sharding", "kid",
    "kid_subset_indices", "knn_radii", "load_stats", "metrics_from_features", "mmd2_unbiased",
    "polynomial_kernel", "precision_recall", "quantize_uint8", "save_stats", "trace_sqrt_product",
]
