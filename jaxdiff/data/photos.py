"""A second embedded dataset: 32x32 crops of the two real photographs scikit-learn ships
(``china.jpg`` and ``flower.jpg``, 427x640x3), for training autoencoders on natural images.

Each photo's rightmost 128 columns are held out: ``test`` holds the 13 x 4 non-overlapping crops there
(104 in all), ``train`` the crops of the remaining 427 x 512 region on a stride-8 grid (50 x 61 per photo,
6,100 in all). No crop of one split overlaps the other. TFDS name ``photo_crops/32``; nothing is downloaded.
"""
from __future__ import annotations

import functools

import os

import numpy as np

CROP = 32
TRAIN_STRIDE = 8
TEST_COLUMNS = 128
TFDS_NAME = "photo_crops"


def load_photo_crops(split: str = "train") -> np.ndarray:
    """``(N, 32, 32, 3)`` uint8 crops of ``split`` ("train" | "test"), in a fixed order (photo, row, column)."""
    if split not in ("train", "test"):
        raise ValueError(f"photo_crops split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_sample_images
    crops = []
    for photo in load_sample_images().images:
        h, w, _ = photo.shape
        edge = w - TEST_COLUMNS
        if split == "train":
            rows, cols = range(0, h - CROP + 1, TRAIN_STRIDE), range(0, edge - CROP + 1, TRAIN_STRIDE)
        else:
            rows, cols = range(0, h - CROP + 1, CROP), range(edge, w - CROP + 1, CROP)
        crops += [photo[r:r + CROP, c:c + CROP] for r in rows for c in cols]
    return np.stack(crops).astype(np.uint8)


@functools.cache
def _make_builder_class():
    """Define (once) and return the ``PhotoCrops`` TFDS builder class (registers ``photo_crops``)."""
    import tensorflow_datasets as tfds     # TensorFlow itself only when building (see below)

    class PhotoCrops(tfds.core.GeneratorBasedBuilder):
        """scikit-learn's two sample photos as 32x32x3 crops, ``photo_crops/32``; see the module docstring."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "stride-8 train crops, held-out right 128 columns for test."}
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(CROP), description="32x32x3 crops")]

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            from etils import epath
            return epath.Path(__file__)

        def _info(self):
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(CROP, CROP, 3),
                                                                                  dtype=np.uint8)}),
                disable_shuffling=True,
                homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_sample_images.html",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in ("train", "test")}

        def _generate_examples(self, split):
            for i, image in enumerate(load_photo_crops(split)):
                yield i, {"image": image}

    return PhotoCrops


def build_photo_crops(data_dir, resolution: int = CROP):
    """Prepare ``photo_crops/32`` under ``data_dir`` (array_record) unless already there; returns the builder."""
    if resolution != CROP:
        raise ValueError(f"photo_crops exists at resolution {CROP} only, got {resolution!r}")
    data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = _make_builder_class()(data_dir=data_dir, config=str(CROP))
    if not builder.is_prepared():
        from jaxdiff.data.tf_setup import import_tensorflow
        import_tensorflow()      # encoding needs TensorFlow: keep it off the accelerators
        builder.download_and_prepare(file_format="array_record")
    return builder
