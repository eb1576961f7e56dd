"""Captions for the embedded digits (issue 14, text-conditioned training): the class and attributes measured on
each image, in several phrasings, so that a prompt carries more than the label.

Measured on the grey image ``x`` in [0, 1] (ink bright), with the ink mask ``x > 0.5``:

* **thickness**: ink area / boundary pixels of the mask (a stroke of width w and length L has area ~ wL and
  ~2L boundary pixels), so it grows with the stroke width;
* **slant**: the intensity-weighted shear ``cov(col, -row) / var(row)`` (> 0: the top leans right);
* **width**: the width of the ink's bounding box over the image width (sklearn's digits are scaled to the
  full height, so their height says little; their width does).

Each attribute is binned per class at the training split's tertiles (thickness: thin / regular / thick;
slant: slanted left / upright / slanted right) or median (width: narrow / wide), so every class has all words.
``TRAIN_TEMPLATES`` phrase the training captions; ``HELD_OUT_TEMPLATES`` are kept for evaluating prompt
following on phrasings the model never saw.
"""
from __future__ import annotations

import dataclasses

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "regular", "thick")
SLANT = ("slanted left", "upright", "slanted right")
WIDTH = ("narrow", "wide")
TRAIN_TEMPLATES = (
    "a {thickness} {digit}",
    "the digit {digit}, {slant}",
    "a {width} handwritten {digit} with {thickness} strokes",
    "{digit}, {thickness}, {slant}",
    "a {slant} {digit} drawn with {thickness} lines",
    "handwritten number {number}, {width} and {thickness}",
)
HELD_OUT_TEMPLATES = (
    "an image of a {thickness} {slant} {digit}",
    "digit {number} written {slant} in {thickness} ink",
)


def measure_attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """``images (N, H, W[, 1])`` (uint8 0..255 or float in [0, 1]) -> ``{"thickness", "slant", "width"}`` (N,)."""
    x = np.asarray(images)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"grey images expected (N, H, W, 1), got {x.shape}")
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W[, 1]), got {x.shape}")
    x = x.astype(np.float64) / (255.0 if np.issubdtype(np.asarray(images).dtype, np.integer) else 1.0)
    n, h, w = x.shape
    mask = x > 0.5
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    interior = padded[:, 1:-1, 1:-1] & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & \
        padded[:, 1:-1, 2:]
    area = mask.sum((1, 2)).astype(np.float64)
    boundary = (mask & ~interior).sum((1, 2)).astype(np.float64)
    thickness = area / np.maximum(boundary, 1.0)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    mass = np.maximum(x.sum((1, 2)), 1e-9)
    cy = (x * rows).sum((1, 2)) / mass
    cx = (x * cols).sum((1, 2)) / mass
    dy, dx = -(rows[None] - cy[:, None, None]), cols[None] - cx[:, None, None]
    slant = (x * dx * dy).sum((1, 2)) / np.maximum((x * dy * dy).sum((1, 2)), 1e-9)
    ink_cols = mask.any(1)
    first = np.where(ink_cols.any(1), ink_cols.argmax(1), 0)
    last = np.where(ink_cols.any(1), w - 1 - ink_cols[:, ::-1].argmax(1), -1)
    width = (last - first + 1) / w
    return {"thickness": thickness, "slant": slant, "width": width}


@dataclasses.dataclass(frozen=True)
class AttributeBins:
    """Per-class bin edges: ``thickness`` and ``slant`` ``(10, 2)`` tertiles, ``width`` ``(10,)`` medians."""

    thickness: np.ndarray
    slant: np.ndarray
    width: np.ndarray

    @classmethod
    def fit(cls, attributes: dict, labels: np.ndarray) -> "AttributeBins":
        labels = np.asarray(labels)
        edges = {k: [] for k in ("thickness", "slant", "width")}
        for c in range(len(DIGIT_WORDS)):
            sel = labels == c
            if not sel.any():
                raise ValueError(f"no image of class {c} to fit the attribute bins")
            edges["thickness"].append(np.quantile(attributes["thickness"][sel], [1 / 3, 2 / 3]))
            edges["slant"].append(np.quantile(attributes["slant"][sel], [1 / 3, 2 / 3]))
            edges["width"].append(np.median(attributes["width"][sel]))
        return cls(**{k: np.asarray(v) for k, v in edges.items()})

    def words(self, attributes: dict, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Bin indices ``{"thickness": 0..2, "slant": 0..2, "width": 0..1}`` (N,) for each image."""
        labels = np.asarray(labels)
        out = {}
        for k in ("thickness", "slant"):
            e = getattr(self, k)[labels]
            v = attributes[k]
            out[k] = (v > e[:, 0]).astype(np.int64) + (v > e[:, 1]).astype(np.int64)
        out["width"] = (attributes["width"] > self.width[labels]).astype(np.int64)
        return out


def caption(label: int, thickness: int, slant: int, width: int, template: str) -> str:
    """One caption from bin indices and a template (fields ``digit``, ``number``, ``thickness``, ``slant``,
    ``width``)."""
    return template.format(digit=DIGIT_WORDS[int(label)], number=int(label), thickness=THICKNESS[int(thickness)],
                           slant=SLANT[int(slant)], width=WIDTH[int(width)])


def make_captions(labels: np.ndarray, bins: dict, seed: int = 0,
                  templates: tuple = TRAIN_TEMPLATES) -> list[str]:
    """One caption per image, its template drawn from ``templates`` with ``seed`` (``bins`` from
    :meth:`AttributeBins.words`)."""
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(templates), size=len(labels))
    return [caption(labels[i], bins["thickness"][i], bins["slant"][i], bins["width"][i], templates[choice[i]])
            for i in range(len(labels))]


def load_captioned_digits(split: str = "train", resolution: int = 16, seed: int = 0,
                          templates: tuple = TRAIN_TEMPLATES):
    """``(images (N, r, r, 1) uint8, labels (N,), captions list[str], bins {name: (N,)})`` for the digits of
    ``split``; the bins are fitted on the training split (at this resolution) for every split."""
    from jaxdiff.data.digits import load_digits_arrays
    train_images, train_labels = load_digits_arrays("train", resolution)
    fitted = AttributeBins.fit(measure_attributes(train_images), train_labels)
    images, labels = (train_images, train_labels) if split == "train" else load_digits_arrays(split, resolution)
    bins = fitted.words(measure_attributes(images), labels)
    return images, labels, make_captions(labels, bins, seed, templates), bins


__all__ = ["AttributeBins", "DIGIT_WORDS", "HELD_OUT_TEMPLATES", "SLANT", "THICKNESS", "TRAIN_TEMPLATES",
           "WIDTH", "caption", "caption_vocabulary", "load_captioned_digits", "make_captions", "measure_attributes"]


def caption_vocabulary(templates: tuple = TRAIN_TEMPLATES) -> list[str]:
    """Every word a training caption can hold: those of ``templates`` and of the caption grammar
    (:mod:`jaxdiff.data.caption_grammar`); the word-level tokenizer's vocabulary. Words of other phrasings, such
    as the held-out ones, are unknown to it."""
    from jaxdiff.data.caption_grammar import GRAMMAR_WORDS
    from jaxdiff.data.words import grammar_vocabulary
    return grammar_vocabulary(tuple(templates) + GRAMMAR_WORDS,
                              {"digit": DIGIT_WORDS, "number": range(10), "thickness": THICKNESS, "slant": SLANT,
                               "width": WIDTH})
