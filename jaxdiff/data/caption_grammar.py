"""A caption grammar for the captioned digits: many phrasings per image, composed from a digit phrase and
attribute phrases in random orders, so that a text encoder trained from scratch learns what the words mean rather
than six fixed sentences (issue 14: prompt following on held-out phrasings).

A caption names the digit (always; as a word, "seven", or a numeral, "7", in about equal parts, optionally with
"a" / "the" / "digit" / "number" / "handwritten") and some of its attributes (thickness ~75%, slant ~75%,
width ~40% of the captions). Each attribute is either a bare adjective before the digit ("a thick slanted left
seven") or a phrase of its own ("with thick strokes", "drawn slanted left", "wide"), and the phrases, the digit
phrase among them, come in a random order joined by spaces, commas or "and". Its words are
:data:`GRAMMAR_WORDS` plus the attribute values; the held-out phrasings' own words ("an", "image", "of",
"written", "in", "ink") are in none of them (asserted by the tests).
"""
from __future__ import annotations

import numpy as np

from jaxdiff.data.captions import DIGIT_WORDS, SLANT, THICKNESS, WIDTH

DIGIT_PHRASES = ("{d}", "a {d}", "the {d}", "digit {d}", "the digit {d}", "number {d}", "the number {d}",
                 "handwritten {d}", "a handwritten {d}", "handwritten digit {d}", "handwritten number {d}")
THICKNESS_PHRASES = ("{v}", "{v} strokes", "with {v} strokes", "{v} lines", "with {v} lines", "drawn with {v} lines")
SLANT_PHRASES = ("{v}", "drawn {v}")
WIDTH_PHRASES = ("{v}",)
SEPARATORS = (" ", ", ", " and ")
DETERMINERS = ("", "a ", "the ")
ATTRIBUTE_RATES = {"thickness": 0.75, "slant": 0.75, "width": 0.4}
GRAMMAR_WORDS = ("a", "the", "digit", "number", "handwritten", "with", "strokes", "lines", "drawn", "and")


def compose_caption(label: int, thickness: int, slant: int, width: int, rng: np.random.Generator) -> str:
    """One caption of the grammar for a digit of class ``label`` with bin indices ``thickness`` (0..2),
    ``slant`` (0..2), ``width`` (0..1), drawn with ``rng``."""
    d = DIGIT_WORDS[int(label)] if rng.random() < 0.5 else str(int(label))
    values = {"thickness": THICKNESS[int(thickness)], "slant": SLANT[int(slant)], "width": WIDTH[int(width)]}
    phrases = {"thickness": THICKNESS_PHRASES, "slant": SLANT_PHRASES, "width": WIDTH_PHRASES}
    adjectives, parts = [], []
    for name in ("thickness", "slant", "width"):
        if rng.random() >= ATTRIBUTE_RATES[name]:
            continue
        if rng.random() < 0.5:
            adjectives.append(values[name])
        else:
            forms = phrases[name]
            parts.append(forms[int(rng.integers(len(forms)))].format(v=values[name]))
    rng.shuffle(adjectives)
    if adjectives:      # "a thick slanted left seven": determiner, adjectives, then the digit (noun) phrase
        noun = DIGIT_PHRASES[int(rng.integers(len(DIGIT_PHRASES)))].format(d=d).removeprefix("a ")
        noun = noun.removeprefix("the ")
        digit_phrase = DETERMINERS[int(rng.integers(len(DETERMINERS)))] + " ".join(adjectives) + " " + noun
    else:
        digit_phrase = DIGIT_PHRASES[int(rng.integers(len(DIGIT_PHRASES)))].format(d=d)
    parts.insert(int(rng.integers(len(parts) + 1)), digit_phrase)
    out = parts[0]
    for p in parts[1:]:
        out += SEPARATORS[int(rng.integers(len(SEPARATORS)))] + p
    return out


def compose_captions(labels, bins: dict, per_image: int, seed: int = 0) -> np.ndarray:
    """``(N, per_image)`` object array of grammar captions for each image (``labels (N,)``, ``bins``:
    ``{"thickness", "slant", "width"}`` (N,) bin indices), image ``i``'s drawn from ``(seed, i)``."""
    labels = np.asarray(labels)
    out = np.empty((len(labels), int(per_image)), dtype=object)
    for i in range(len(labels)):
        rng = np.random.default_rng([int(seed), i])
        for j in range(int(per_image)):
            out[i, j] = compose_caption(labels[i], bins["thickness"][i], bins["slant"][i], bins["width"][i], rng)
    return out


__all__ = ["ATTRIBUTE_RATES", "DETERMINERS", "DIGIT_PHRASES", "GRAMMAR_WORDS", "SEPARATORS", "SLANT_PHRASES",
           "THICKNESS_PHRASES", "WIDTH_PHRASES", "compose_caption", "compose_captions"]
