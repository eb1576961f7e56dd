"""Input pipeline: the digits TFDS dataset, a generic TFDS dataset, and the batch iterator's contract.

Everything is real: TFDS writes array_record files under a temporary data_dir (digits once per
test process, module-scoped) and the iterators read them back through ``tfds.data_source``.
"""
import json
import os
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from jaxdiff.data import (ImageIterator, build_digits, load_digits_arrays, make_iterator, open_source,
                          synthetic_iterator, to_global)

B = 64   # 1437 // 64 = 22 batches per digits epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    build_digits(path, 16)
    return path


@pytest.fixture(scope="module")
def train(data_dir):
    return open_source("digits/16", "train", data_dir)


def _iterator(source, **kw):
    args = dict(global_batch_size=B, image_size=16, seed=7, process_index=0, process_count=1)
    return ImageIterator(source, **{**args, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
            assert x[key].dtype == y[key].dtype


class IndexSource:
    """In-memory source whose example ``i`` is a 4x4 grey image filled with ``i % 256``, label ``i``."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((4, 4, 1), i % 256, np.uint8), "label": i}


# --- the digits dataset ----------------------------------------------------------------------------

def test_digits_tfds_equals_arrays_bitwise(data_dir):
    for split, size in (("train", 1437), ("test", 360)):
        source = open_source("digits/16", split, data_dir)
        assert len(source) == size
        images, labels = load_digits_arrays(split, 16)
        got = source.__getitems__(list(range(size)))
        np.testing.assert_array_equal(np.stack([r["image"] for r in got]), images)
        np.testing.assert_array_equal(np.array([r["label"] for r in got]), labels)


def test_digits_32_config(tmp_path):
    builder = build_digits(str(tmp_path), 32)
    assert builder.info.full_name == "digits/32/1.0.0"
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    source = open_source("digits/32", "test", str(tmp_path))
    images, _ = load_digits_arrays("test", 32)
    np.testing.assert_array_equal(source[359]["image"], images[359])


def test_build_digits_is_idempotent(data_dir):
    info = os.path.join(data_dir, "digits", "16", "1.0.0", "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    t0 = time.perf_counter()
    builder = build_digits(data_dir, 16)
    assert time.perf_counter() - t0 < 2.0
    assert builder.is_prepared() and os.stat(info).st_mtime_ns == before
    assert builder.info.file_format.value == "array_record"


def test_split_slicing(data_dir):
    assert len(open_source("digits/16", "train[:90%]", data_dir)) == 1293
    assert len(open_source("digits/16", "test[10:20]", data_dir)) == 10


# --- batches -----------------------------------------------------------------------------------

def test_batch_shapes_range_and_values(train):
    batch = next(_iterator(train))
    assert batch["image"].shape == (B, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (B,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    # Unshuffled, unflipped, native size: exactly the stored digits scaled to [-1, 1].
    images, labels = load_digits_arrays("train", 16)
    plain = next(_iterator(train, shuffle=False, random_flip=False, label_key="label"))
    np.testing.assert_array_equal(plain["image"], images[:B].astype(np.float32) / np.float32(127.5) - 1)
    np.testing.assert_array_equal(plain["label"], labels[:B])
    assert "label" not in next(_iterator(train, label_key=None))


def test_deterministic_and_independent_of_threads(train):
    a = _take(_iterator(train, num_threads=0), 3)
    b = _take(_iterator(train, num_threads=2, prefetch=3), 3)
    _assert_batches_equal(a, b)
    c = next(_iterator(train, seed=8))
    assert not np.array_equal(a[0]["label"], c["label"])


def test_epochs_are_permutations_and_drop_the_remainder():
    source = IndexSource(10)
    it = ImageIterator(source, global_batch_size=4, image_size=4, seed=1, process_index=0, process_count=1,
                       random_flip=False, num_threads=0)
    epochs = [np.concatenate([next(it)["label"] for _ in range(2)]) for _ in range(3)]
    for seen in epochs:
        assert len(set(seen.tolist())) == 8 and set(seen.tolist()) <= set(range(10))
    assert not np.array_equal(epochs[0], epochs[1])
    assert it.epoch == 3 and it.steps_per_epoch == 2
    first = next(ImageIterator(source, global_batch_size=4, image_size=4, seed=1, process_index=0,
                               process_count=1, random_flip=False, shuffle=False))
    np.testing.assert_array_equal(first["label"], [0, 1, 2, 3])


def test_state_restore_mid_epoch_and_across_epochs(train):
    big = 256   # 5 batches per epoch: resuming at batch 3 crosses into epoch 1 at batch 5
    it = _iterator(train, global_batch_size=big, crop="random")
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_batch"] == 3 and state["seed"] == 7 and state["global_batch_size"] == big
    expected = _take(it, 4)
    fresh = _iterator(train, global_batch_size=big, crop="random", prefetch=4)
    next(fresh)   # leaves prefetched batches behind, which set_state must discard
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)
    assert fresh.epoch == 1


def test_two_processes_concatenate_to_one(train):
    for kw in ({}, {"crop": "random", "image_size": 12}):
        whole = _take(_iterator(train, **kw), 2)
        halves = [_take(_iterator(train, process_index=p, process_count=2, **kw), 2) for p in (0, 1)]
        for k in range(2):
            assert halves[0][k]["image"].shape[0] == B // 2
            joined = {key: np.concatenate([halves[0][k][key], halves[1][k][key]]) for key in whole[k]}
            _assert_batches_equal([joined], [whole[k]])


def test_random_flip_happens_and_is_deterministic(train):
    plain = next(_iterator(train, random_flip=False, shuffle=False))["image"]
    flipped = next(_iterator(train, random_flip=True, shuffle=False))["image"]
    again = next(_iterator(train, random_flip=True, shuffle=False))["image"]
    np.testing.assert_array_equal(flipped, again)
    is_flipped = np.array([np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
                           for f, p in zip(flipped, plain)])
    unchanged = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain)])
    assert np.all(is_flipped | unchanged)
    assert 0.25 * B < is_flipped.sum() < 0.75 * B


def test_synthetic_iterator():
    it = synthetic_iterator(global_batch_size=8, image_size=6, channels=3, seed=2, process_index=0, process_count=1)
    first = _take(it, 2)
    assert first[0]["image"].shape == (8, 6, 6, 3) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].dtype == np.int32 and np.all((0 <= first[0]["label"]) & (first[0]["label"] < 10))
    assert np.abs(first[0]["image"]).max() <= 1 and not np.array_equal(first[0]["image"], first[1]["image"])
    half = synthetic_iterator(global_batch_size=8, image_size=6, channels=3, seed=2, process_index=1,
                              process_count=2)
    half.set_state(json.loads(json.dumps({**it.get_state(), "next_batch": 1})))
    np.testing.assert_array_equal(next(half)["image"], first[1]["image"][4:])
    with pytest.raises(ValueError, match="seed"):
        half.set_state({**it.get_state(), "seed": 3})


# --- configs, devices, errors ----------------------------------------------------------------------

def test_make_iterator_from_config(data_dir, train):
    cfg = ml_collections.ConfigDict({"name": "digits/16", "split": "train", "data_dir": data_dir,
                                     "image_size": 8, "random_flip": True, "crop": "resize",
                                     "label_key": "label"})
    batch = next(make_iterator(cfg, global_batch_size=B, seed=7, process_index=0, process_count=1))
    expected = next(_iterator(train, image_size=8, crop="resize"))
    _assert_batches_equal([batch], [expected])
    cfg.unknown_option = 1
    with pytest.raises(ValueError, match=r"unknown fields \['unknown_option'\]"):
        make_iterator(cfg, global_batch_size=B, seed=0)
    with pytest.raises(ValueError, match=r"missing fields \['image_size'\]"):
        make_iterator({"name": "digits/16", "split": "train"}, global_batch_size=B, seed=0)


def test_to_global_on_8_devices(train):
    batch = next(_iterator(train))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    out = to_global(batch, sharding)
    assert out["image"].shape == (B, 16, 16, 1) and out["label"].shape == (B,)
    assert out["image"].sharding == sharding and len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[1].data.shape == (B // 8, 16, 16, 1)
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    replicated = to_global(batch, {"image": sharding, "label": NamedSharding(mesh, P())})
    np.testing.assert_array_equal(np.asarray(replicated["label"]), batch["label"])
    with pytest.raises(ValueError, match="sharding keys"):
        to_global(batch, {"image": sharding})


def test_errors(train, tmp_path):
    with pytest.raises(ValueError, match=r"'no_such_dataset' not found.*tfds build no_such_dataset"):
        open_source("no_such_dataset", "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"'mnist' is not prepared.*--file_format=array_record"):
        open_source("mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match="digits/16, digits/32"):
        open_source("digits/8", "train", str(tmp_path))
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        _iterator(train, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="crop must be one of"):
        _iterator(train, crop="corner")
    with pytest.raises(ValueError, match="feature 'img' not in"):
        _iterator(train, image_key="img")
    it = _iterator(train)
    for bad, field in (({"seed": 8}, "seed"), ({"global_batch_size": 32}, "global_batch_size")):
        with pytest.raises(ValueError, match=field):
            it.set_state({**it.get_state(), **bad})
    with pytest.raises(ValueError, match="must have the fields"):
        it.set_state({"next_batch": 0})


def test_import_stays_light():
    code = "import sys, jaxdiff.data; assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# --- a generic (non-digits) TFDS dataset ---------------------------------------------------------

class TinyRgb(tfds.core.GeneratorBasedBuilder):
    """Five 20x24 RGB images with random pixels and a ``label`` equal to their index."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(20, 24, 3)),
                "label": tfds.features.ClassLabel(num_classes=5)}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, image in enumerate(tiny_rgb_images()):
            yield i, {"image": image, "label": i}


def tiny_rgb_images():
    return np.random.default_rng(0).integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)


def test_generic_tfds_dataset_center_crop_and_resize(tmp_path):
    TinyRgb(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    source = open_source("tiny_rgb", "train", str(tmp_path))
    assert len(source) == 5
    it = ImageIterator(source, global_batch_size=4, image_size=16, seed=0, process_index=0, process_count=1,
                       random_flip=False, shuffle=False, crop="center")
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(batch["label"], [0, 1, 2, 3])
    expected = [np.asarray(Image.fromarray(im[:, 2:22]).resize((16, 16), Image.BICUBIC, reducing_gap=2.0))
                for im in tiny_rgb_images()[:4]]
    np.testing.assert_array_equal(batch["image"], np.stack(expected).astype(np.float32) / np.float32(127.5) - 1)
    resized = next(ImageIterator(source, global_batch_size=4, image_size=16, seed=0, process_index=0,
                                 process_count=1, crop="resize", label_key=None))
    assert resized["image"].shape == (4, 16, 16, 3) and "label" not in resized


def test_tfrecord_only_dataset_is_refused(tmp_path):
    TinyRgb(data_dir=str(tmp_path)).download_and_prepare(file_format="tfrecord")
    with pytest.raises(ValueError, match=r"stored as 'tfrecord'.*tfds build tiny_rgb --data_dir=.*"
                                         r"--file_format=array_record"):
        open_source("tiny_rgb", "train", str(tmp_path))
