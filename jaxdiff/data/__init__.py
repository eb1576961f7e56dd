"""Input pipelines: TFDS image datasets and the embedded digits default.

Importing this package loads numpy only; TensorFlow Datasets is imported by :func:`open_source`,
:func:`build_digits` and ``digits.Digits`` when first used.
"""
from jaxdiff.data.digits import build_digits, load_digits_arrays
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
    "load_digits_arrays",
    "make_iterator",
    "open_source",
    "synthetic_iterator",
    "to_global",
]
