"""The embedded captioned digits: the sklearn digits of :mod:`jaxdiff.data.digits` with captions made from the
label and the attributes measured on each image (:mod:`jaxdiff.data.captions`), as a TFDS dataset built locally.

``captioned_digits/16`` and ``captioned_digits/32``, splits ``train`` (1,437) and ``test`` (360), the images and
labels of ``digits/<r>`` in the same order. Each example also holds the binned attributes ``thickness`` (0 thin,
1 regular, 2 thick), ``slant`` (0 left, 1 upright, 2 right), ``width`` (0 narrow, 1 wide), binned per class at
the training split's tertiles / medians at that resolution, and ``captions``: :data:`CAPTIONS_PER_IMAGE`
captions, first one per fixed training phrasing (``captions.TRAIN_TEMPLATES``, in that order), then captions of
the caption grammar (:mod:`jaxdiff.data.caption_grammar`: the digit as a word or numeral and the attribute
phrases in random orders). The data pipeline draws one of them per example and epoch
(``data.caption_key="captions"``). The phrasings of ``captions.HELD_OUT_TEMPLATES`` are in no split: they are
reserved for evaluating prompt following on wordings the model never saw (:func:`held_out_prompts`).
"""
from __future__ import annotations

import functools

import numpy as np

from jaxdiff.data.caption_grammar import compose_captions
from jaxdiff.data.captions import (HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, caption, load_captioned_digits)
from jaxdiff.data.digits import NUM_CLASSES

TFDS_NAME = "captioned_digits"
TFDS_RESOLUTIONS = (16, 32)
CAPTION_KEY = "captions"
ATTRIBUTES = ("thickness", "slant", "width")
CAPTIONS_PER_IMAGE = 32     # the TRAIN_TEMPLATES' captions, then grammar captions
GRAMMAR_SEED = 0


def captioned_digits_arrays(split: str = "train", resolution: int = 16) -> dict[str, np.ndarray]:
    """The records of ``captioned_digits/<resolution>`` ``split`` as arrays: ``image (N, r, r, 1) uint8``,
    ``label (N,)``, ``thickness`` / ``slant`` / ``width`` ``(N,)`` bin indices and ``captions
    (N, CAPTIONS_PER_IMAGE)`` str: one column per training phrasing, then grammar captions."""
    images, labels, _, bins = load_captioned_digits(split, resolution)
    templated = np.asarray([[caption(labels[i], bins["thickness"][i], bins["slant"][i], bins["width"][i], t)
                             for t in TRAIN_TEMPLATES] for i in range(len(labels))], dtype=object)
    composed = compose_captions(labels, bins, CAPTIONS_PER_IMAGE - len(TRAIN_TEMPLATES),
                                seed=GRAMMAR_SEED + (0 if split == "train" else 1))
    captions = np.concatenate([templated, composed], axis=1)
    return {"image": images, "label": labels, **{k: np.asarray(bins[k], np.int64) for k in ATTRIBUTES},
            CAPTION_KEY: captions}


def held_out_prompts(labels, thickness, slant, width=None, template: int = 0) -> list[str]:
    """Prompts in held-out phrasing ``HELD_OUT_TEMPLATES[template]`` for each ``(label, thickness, slant[,
    width])`` (arrays ``(N,)`` of class and bin indices)."""
    labels = np.asarray(labels)
    width = np.zeros_like(labels) if width is None else np.asarray(width)
    t = HELD_OUT_TEMPLATES[template]
    return [caption(labels[i], np.asarray(thickness)[i], np.asarray(slant)[i], width[i], t)
            for i in range(len(labels))]


@functools.cache
def _make_builder_class():
    """Define (once) and return the ``CaptionedDigits`` TFDS builder class (registers ``captioned_digits``)."""
    import tensorflow_datasets as tfds

    class CaptionedDigits(tfds.core.GeneratorBasedBuilder):
        """sklearn digits with measured attributes and captions; see :mod:`jaxdiff.data.captioned_digits`."""

        VERSION = tfds.core.Version("2.0.0")
        RELEASE_NOTES = {"1.0.0": "digits/<r> + thickness, slant, width bins and one caption per training phrasing.",
                         "2.0.0": f"{CAPTIONS_PER_IMAGE} captions per image: the training phrasings', then the "
                                  "caption grammar's."}
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(r), description=f"{r}x{r}x1 captioned digits")
                           for r in TFDS_RESOLUTIONS]

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            from etils import epath
            return epath.Path(__file__)

        def _info(self):
            r = int(self.builder_config.name)
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(r, r, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "thickness": tfds.features.ClassLabel(num_classes=3),
                    "slant": tfds.features.ClassLabel(num_classes=3),
                    "width": tfds.features.ClassLabel(num_classes=2),
                    CAPTION_KEY: tfds.features.Sequence(tfds.features.Text(), length=CAPTIONS_PER_IMAGE),
                }),
                disable_shuffling=True,
                homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in ("train", "test")}

        def _generate_examples(self, split):
            a = captioned_digits_arrays(split, int(self.builder_config.name))
            for i in range(len(a["label"])):
                yield i, {"image": a["image"][i], "label": int(a["label"][i]),
                          **{k: int(a[k][i]) for k in ATTRIBUTES}, CAPTION_KEY: list(a[CAPTION_KEY][i])}

    return CaptionedDigits


def build_captioned_digits(data_dir, resolution: int = 16):
    """Prepare ``captioned_digits/<resolution>`` under ``data_dir`` (array_record) unless already there; returns
    the TFDS builder."""
    if resolution not in TFDS_RESOLUTIONS:
        raise ValueError(f"captioned_digits resolution must be one of {TFDS_RESOLUTIONS}, got {resolution!r}")
    import os
    data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = _make_builder_class()(data_dir=data_dir, config=str(resolution))
    if not builder.is_prepared():
        from jaxdiff.data.tf_setup import import_tensorflow
        import_tensorflow()
        builder.download_and_prepare(file_format="array_record")
    return builder


def __getattr__(name):
    if name == "CaptionedDigits":
        return _make_builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATTRIBUTES", "CAPTIONS_PER_IMAGE", "CAPTION_KEY", "TFDS_NAME", "build_captioned_digits", "captioned_digits_arrays",
           "held_out_prompts"]
