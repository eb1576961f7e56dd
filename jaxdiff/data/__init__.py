"""Input pipelines: TFDS image datasets and the embedded datasets (digits, the default; photo crops).

Importing this package loads numpy only; TensorFlow Datasets is imported by :func:`open_source`,
:func:`build_digits`, :func:`build_photo_crops` and the builder classes when first used.
"""
from jaxdiff.data.digits import build_digits, load_digits_arrays
from jaxdiff.data.photos import build_photo_crops, load_photo_crops
from jaxdiff.data.pipeline import (
    ImageIterator,
    SyntheticIterator,
    make_iterator,
    open_source,
    synthetic_iterator,
    to_global,
)

__all__ = [
    "ImageIterator",
    "SyntheticIterator",
    "build_digits",
    "build_photo_crops",
    "load_digits_arrays",
    "load_photo_crops",
    "make_iterator",
    "open_source",
    "synthetic_iterator",
    "to_global",
]
