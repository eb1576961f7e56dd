"""The embedded default dataset: scikit-learn's real handwritten digits as a TFDS dataset.

scikit-learn ships 1,797 8x8 grey-level digits (values 0..16, 10 classes, from the UCI
"Optical Recognition of Handwritten Digits" set). :class:`Digits` is a TFDS builder that turns them,
locally and with no download, into ``digits/16`` (16x16x1 uint8) or ``digits/32`` (32x32x1) with a
fixed train/test split of 1,437 / 360 images, stratified by class and drawn once from seed 0.

``load_digits_arrays`` gives the same images as numpy arrays without TFDS (the classifier and the
tests use it); the builder stores exactly these arrays.
"""
from __future__ import annotations

import functools

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


# --- TFDS builder ------------------------------------------------------------------------------
# ``tensorflow_datasets`` is imported only when the builder is first asked for (module
# ``__getattr__`` below), so ``import jaxdiff.data.digits`` stays as light as numpy + sklearn.

TFDS_NAME = "digits"
TFDS_RESOLUTIONS = (16, 32)


@functools.cache
def _make_builder_class():
    """Define (once) and return the ``Digits`` TFDS builder class; registers ``digits`` with TFDS."""
    import tensorflow_datasets as tfds     # TensorFlow itself only when building (see below)

    class Digits(tfds.core.GeneratorBasedBuilder):
        """sklearn digits as ``digits/16`` or ``digits/32``: image (r, r, 1) uint8, label in 0..9.

        Splits ``train`` (1,437) and ``test`` (360), exactly :func:`load_digits_arrays`. Everything
        is generated locally from scikit-learn's bundled copy; nothing is downloaded.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "sklearn digits, stratified 1437/360 split from seed 0."}
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name=str(r), description=f"{r}x{r}x1 bicubic-upsampled digits")
            for r in TFDS_RESOLUTIONS
        ]

        # TFDS looks for a checksums file next to the builder's source; its default lookup needs
        # the optional ``importlib_resources`` package, so point it at this file directly.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            from etils import epath
            return epath.Path(__file__)

        @property
        def resolution(self) -> int:
            return int(self.builder_config.name)

        def _info(self):
            r = self.resolution
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(r, r, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }),
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # keep the order of ``load_digits_arrays``
                homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {split: self._generate_examples(split) for split in ("train", "test")}

        def _generate_examples(self, split):
            images, labels = load_digits_arrays(split, self.resolution)
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"image": image, "label": int(label)}

    return Digits


def __getattr__(name):
    if name == "Digits":
        return _make_builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_digits(data_dir, resolution: int = 16):
    """Prepare ``digits/<resolution>`` under ``data_dir`` (array_record) unless already there.

    Idempotent: a prepared dataset is only opened (well under a second). Returns the TFDS builder;
    ``builder.as_data_source(split)`` gives random access to ``{"image": (r, r, 1) uint8,
    "label": int64}`` records.
    """
    if resolution not in TFDS_RESOLUTIONS:
        raise ValueError(f"digits TFDS resolution must be one of {TFDS_RESOLUTIONS}, got {resolution!r}")
    import os
    data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = _make_builder_class()(data_dir=data_dir, config=str(resolution))
    if not builder.is_prepared():
        from jaxdiff.data.tf_setup import import_tensorflow
        import_tensorflow()      # encoding needs TensorFlow: keep it off the accelerators
        builder.download_and_prepare(file_format="array_record")
    return builder
