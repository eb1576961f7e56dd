"""The embedded default dataset: scikit-learn's real handwritten digits as a TFDS dataset.

scikit-learn ships 1,797 8x8 grey-level digits (values 0..16, 10 classes, from the UCI
"Optical Recognition of Handwritten Digits" set). :class:`Digits` is a TFDS builder that turns them,
locally and with no download, into ``digits/16`` (16x16x1 uint8) or ``digits/32`` (32x32x1) with a
fixed train/test split of 1,437 / 360 images, stratified by class and drawn once from seed 0.

``load_digits_arrays`` gives the same images as numpy arrays without TFDS (the classifier and the
tests use it); the builder stores exactly these arrays.
"""
from __future__ import annotations

import numpy as np

RESOLUTIONS = (8, 16, 32)
NUM_CLASSES = 10
TEST_PER_CLASS = 36   # 360 test images, 1,437 train
SPLIT_SEED = 0


def _split_indices() -> dict[str, np.ndarray]:
    """Fixed stratified split of the 1,797 sklearn digits: ``{"train": (1437,), "test": (360,)}``."""
    from sklearn.datasets import load_digits
    target = load_digits().target
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(target == c))[:TEST_PER_CLASS]
                           for c in range(NUM_CLASSES)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(target)), test)
    return {"train": train, "test": test}


def resize_digits(images_0_16: np.ndarray, resolution: int) -> np.ndarray:
    """``(N, 8, 8)`` sklearn values in [0, 16] -> ``(N, r, r, 1)`` uint8 in [0, 255].

    Bicubic resampling (Pillow) of the 8x8 image scaled to [0, 255], clipped and rounded.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"digits resolution must be one of {RESOLUTIONS}, got {resolution}")
    from PIL import Image
    x = np.asarray(images_0_16, np.float64) * (255.0 / 16.0)
    out = np.empty((len(x), resolution, resolution, 1), np.uint8)
    for i, im in enumerate(x):
        if resolution == 8:
            r = im
        else:
            r = np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize(
                (resolution, resolution), Image.BICUBIC))
        out[i, ..., 0] = np.clip(np.round(r), 0, 255).astype(np.uint8)
    return out


def load_digits_arrays(split: str = "train", resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``split`` ("train" | "test" | "all") as ``(images (N, r, r, 1) uint8, labels (N,) int64)``."""
    from sklearn.datasets import load_digits
    d = load_digits()
    if split == "all":
        idx = np.arange(len(d.target))
    else:
        splits = _split_indices()
        if split not in splits:
            raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
        idx = splits[split]
    return resize_digits(d.images[idx], resolution), d.target[idx].astype(np.int64)
