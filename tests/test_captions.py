"""Captions for the digits (issue 14): attributes measured on each image, binned per class, several phrasings."""
import numpy as np
import pytest

from jaxdiff.data.captions import (DIGIT_WORDS, HELD_OUT_TEMPLATES, SLANT, THICKNESS, TRAIN_TEMPLATES, WIDTH,
                                   AttributeBins, caption, make_captions, measure_attributes)


def _bar(width, shear=0.0, top=4, bottom=28):
    """A 32x32 vertical stroke of ``width`` pixels, its top shifted right by ``shear`` per row."""
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float64)
    centre = 16 + shear * (16 - rows)
    return ((np.abs(cols - centre) < width / 2) & (rows >= top) & (rows < bottom)).astype(np.float32)


def test_measures_follow_the_drawing():
    a = measure_attributes(np.stack([_bar(2), _bar(5), _bar(9), _bar(3, 0.5), _bar(3, -0.5)])[..., None])
    assert a["thickness"][0] < a["thickness"][1] < a["thickness"][2]
    assert a["slant"][3] == pytest.approx(0.5, abs=0.02) and a["slant"][4] == pytest.approx(-0.5, abs=0.02)
    assert a["slant"][0] == pytest.approx(0.0, abs=1e-9)
    assert a["width"][0] < a["width"][1] < a["width"][2]
    u8 = measure_attributes((np.stack([_bar(5)]) * 255).astype(np.uint8))      # uint8 input reads as 0..255
    assert u8["thickness"][0] == pytest.approx(a["thickness"][1])
    with pytest.raises(ValueError, match="grey images"):
        measure_attributes(np.zeros((1, 8, 8, 3)))


def test_bins_and_captions():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    attrs = {k: rng.normal(size=300) + labels for k in ("thickness", "slant", "width")}
    bins = AttributeBins.fit(attrs, labels).words(attrs, labels)
    for c in range(10):                               # every class gets every word, in about equal parts
        for k, n in (("thickness", 3), ("slant", 3), ("width", 2)):
            counts = np.bincount(bins[k][labels == c], minlength=n)
            assert counts.min() >= 30 // n - 1
    caps = make_captions(labels, bins, seed=1)
    assert caps == make_captions(labels, bins, seed=1) and caps != make_captions(labels, bins, seed=2)
    for i in (0, 150, 299):
        assert DIGIT_WORDS[labels[i]] in caps[i] or str(labels[i]) in caps[i]
    assert caption(3, 2, 0, 1, HELD_OUT_TEMPLATES[0]) == "an image of a thick slanted left three"
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    words = {w for t in (THICKNESS, SLANT, WIDTH) for w in t}
    assert len(words) == 8


def test_captioned_digits():
    pytest.importorskip("sklearn")
    from jaxdiff.data.captions import load_captioned_digits
    images, labels, caps, bins = load_captioned_digits("train", 16, seed=0)
    assert images.shape == (1437, 16, 16, 1) and len(caps) == 1437
    assert len(set(caps)) > 300                        # prompts carry more than the class
    for k, n in (("thickness", 3), ("slant", 3)):
        assert np.bincount(bins[k], minlength=n).min() > 400
    _, test_labels, test_caps, test_bins = load_captioned_digits("test", 16, templates=HELD_OUT_TEMPLATES)
    assert len(test_caps) == 360 and all(c.startswith(("an image of", "digit ")) for c in test_caps)
    assert np.bincount(test_bins["slant"], minlength=3).min() > 60    # train-fitted bins still split the test set


def test_caption_grammar_composes_many_phrasings_in_the_training_vocabulary():
    from jaxdiff.data.caption_grammar import compose_captions
    from jaxdiff.data.captions import caption_vocabulary
    from jaxdiff.data.words import split_words
    labels = np.arange(10)
    bins = {"thickness": labels % 3, "slant": (labels + 1) % 3, "width": labels % 2}
    caps = compose_captions(labels, bins, 40, seed=0)
    assert caps.shape == (10, 40)
    np.testing.assert_array_equal(caps, compose_captions(labels, bins, 40, seed=0))
    assert (caps != compose_captions(labels, bins, 40, seed=1)).any()
    vocab = set(caption_vocabulary())
    for i in range(10):
        assert len(set(caps[i])) > 30                                # many distinct phrasings per image
        true, other = set(), set()                                     # this image's attribute words, the rest
        for values, b in ((THICKNESS, bins["thickness"][i]), (SLANT, bins["slant"][i]), (WIDTH, bins["width"][i])):
            true |= set(split_words(values[b]))
            other |= {w for j, v in enumerate(values) if j != b for w in split_words(v)}
        for c in caps[i]:
            words = split_words(c)
            assert set(words) <= vocab                                 # every word is known to the tokenizer
            assert DIGIT_WORDS[i] in words or str(i) in words          # the digit, as a word or numeral
            assert not set(words) & (other - true)                     # only the image's own attributes
    flat = [split_words(c) for c in caps.ravel()]
    numeral = [w for w in flat if any(x.isdigit() for x in w)]
    assert 0.35 < len(numeral) / len(flat) < 0.65
    slant_first = [w for w in flat if "slanted" in w and w[-1] in DIGIT_WORDS + tuple("0123456789")
                   and w.index("slanted") < len(w) - 1]
    assert slant_first                                                 # "... slanted left seven": digit last
    assert any(w[0] in ("digit", "number") for w in flat)              # digit phrase first ...
    assert any(w[0] in ("thin", "regular", "thick") and w[-1] in ("left", "right", "upright") for w in flat)
