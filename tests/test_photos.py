"""The embedded photo-crops dataset: split sizes, no train/test overlap, and the TFDS build equals the arrays."""
from __future__ import annotations

import numpy as np

from jaxdiff.data import load_photo_crops, open_source
from jaxdiff.data.photos import CROP, TEST_COLUMNS


def test_photo_crops_splits_and_tfds_build(tmp_path):
    train, test = load_photo_crops("train"), load_photo_crops("test")
    assert train.shape == (6100, 32, 32, 3) and test.shape == (104, 32, 32, 3)
    assert train.dtype == np.uint8 and train.std() > 20          # real photographs, not blank
    # train crops end before the held-out columns: the first test crop of photo 0 is not in train
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[0]
    np.testing.assert_array_equal(test[0], photo[:CROP, photo.shape[1] - TEST_COLUMNS:][:, :CROP])
    assert not any(np.array_equal(test[0], t) for t in train[:3050])
    src = open_source("photo_crops/32", "test", str(tmp_path))
    assert len(src) == 104
    np.testing.assert_array_equal(np.stack([src[i]["image"] for i in range(len(src))]), test)
    assert len(open_source("photo_crops/32", "train", str(tmp_path))) == 6100
