"""Sample-quality metrics (pure jax/numpy): streaming feature statistics, Fréchet distance, KID,
improved precision/recall, Inception-style score, and a feature-extractor slot (``FeatureExtractor``).

The extractors that need networks (pytorch-fid's FID InceptionV3, the project's digits classifier and
``digits_quality``) live above ``nn``/``convert``/``data`` in :mod:`jaxdiff.extractors`; nothing here imports
Flax or another jaxdiff package. :func:`inception_sharding` splits feature batches over devices;
:func:`quantize_uint8` quantizes float samples as a PNG writer does.
"""
from jaxdiff.metrics.features import FeatureExtractor, compute_metrics, extract, extract_stats, metrics_from_features
from jaxdiff.metrics.frechet import frechet_distance, trace_sqrt_product
from jaxdiff.metrics.inception import inception_sharding
from jaxdiff.metrics.inception_score import inception_score
from jaxdiff.metrics.kid import kid, kid_subset_indices, mmd2_unbiased, polynomial_kernel
from jaxdiff.metrics.precision_recall import knn_radii, precision_recall
from jaxdiff.metrics.quantize import check_range, quantize_uint8
from jaxdiff.metrics.stats import FeatureStats, load_stats, save_stats

__all__ = [
    "FeatureExtractor", "FeatureStats", "check_range", "compute_metrics", "extract", "extract_stats",
    "frechet_distance", "inception_score", "inception_sharding", "kid",
    "kid_subset_indices", "knn_radii", "load_stats", "metrics_from_features", "mmd2_unbiased",
    "polynomial_kernel", "precision_recall", "quantize_uint8", "save_stats", "trace_sqrt_product",
]
