"""Deterministic, resumable, multi-host image batches from TFDS array_record datasets.

The contract: global batch ``k`` is a pure function of ``(seed, k, global_batch_size, dataset)``.

* Epoch ``e = k // steps_per_epoch`` visits the examples in the permutation drawn from
  ``(seed, e)``; the last ``num_examples % global_batch_size`` examples of each epoch are dropped.
* Example at position ``i`` of epoch ``e`` draws its flip and random crop from ``(seed, e, i)``.
* Host ``p`` of ``P`` gets rows ``[p * B / P, (p + 1) * B / P)`` of each global batch, so the
  hosts' batches concatenated in host order equal the single-host batch bit for bit, and a run can
  resume on a different number of hosts.
* Worker threads and prefetching only decide *when* a batch is built, never what is in it.

``get_state`` is the next batch index plus the parameters that fix the order; ``set_state``
resumes exactly there.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdiff.data import transforms
from jaxdiff.data.digits import TFDS_NAME as _DIGITS, TFDS_RESOLUTIONS as _DIGITS_RES
from jaxdiff.data.photos import TFDS_NAME as _PHOTOS
from jaxdiff.data.captioned_digits import TFDS_NAME as _CAPTIONED, TFDS_RESOLUTIONS as _CAPTIONED_RES

DIGITS_DATA_DIR = "~/.cache/jaxdiff/tensorflow_datasets"
_PERMUTATION_TAG, _AUGMENT_TAG, _CAPTION_TAG = 0, 1, 2


# --- sources -----------------------------------------------------------------------------------

def _family_resolution(name: str, family: str, resolutions) -> int | None:
    """Resolution of a ``family[/r][:version]`` name (``digits``, ``captioned_digits``; 16 without ``/r``),
    None for a dataset of another family; ValueError for an unknown ``r``."""
    base = name.split(":")[0]
    if base == family:
        return 16
    if not base.startswith(family + "/"):
        return None
    config = base.split("/", 1)[1]
    if config not in tuple(str(r) for r in resolutions):
        raise ValueError(f"unknown {family} config {config!r} in {name!r}; accepted: "
                         + ", ".join(f"{family}/{r}" for r in resolutions))
    return int(config)


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Sequence[dict]:
    """Random-access source over a TFDS dataset prepared in array_record format.

    ``source[i]`` is the decoded example dict, e.g. ``{"image": (H, W, C) uint8, "label": int}``;
    ``len(source)`` is the number of examples in ``split`` (TFDS slicing such as
    ``"train[:90%]"`` is supported). The embedded ``digits/16``, ``digits/32`` and ``photo_crops/32``
    are built locally first (default ``data_dir``: ``~/.cache/jaxdiff/tensorflow_datasets``); any other dataset must
    already be prepared under ``data_dir`` (None: the TFDS default). Nothing is downloaded.
    """
    import tensorflow_datasets as tfds
    resolution = _family_resolution(name, _DIGITS, _DIGITS_RES)
    if resolution is not None:
        from jaxdiff.data.digits import build_digits
        data_dir = os.path.expanduser(os.fspath(data_dir or DIGITS_DATA_DIR))
        build_digits(data_dir, resolution)
    elif _family_resolution(name, _CAPTIONED, _CAPTIONED_RES) is not None:
        from jaxdiff.data.captioned_digits import build_captioned_digits
        data_dir = os.path.expanduser(os.fspath(data_dir or DIGITS_DATA_DIR))
        build_captioned_digits(data_dir, _family_resolution(name, _CAPTIONED, _CAPTIONED_RES))
    elif name.split(":")[0] in (_PHOTOS, _PHOTOS + "/32"):
        from jaxdiff.data.photos import build_photo_crops
        data_dir = os.path.expanduser(os.fspath(data_dir or DIGITS_DATA_DIR))
        build_photo_crops(data_dir)
    else:   # a dataset of its own may decode with TensorFlow: keep it off the accelerators
        from jaxdiff.data.tf_setup import import_tensorflow
        import_tensorflow()
        if data_dir is not None:
            data_dir = os.path.expanduser(os.fspath(data_dir))
    where = f"data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
    how = (f"prepare it with `tfds build {name} "
           f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record`")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"dataset {name!r} not found in {where}; {how} "
                         f"(or use 'digits/16', 'digits/32', 'captioned_digits/16', 'photo_crops/32')") from e
    if not builder.is_prepared():
        raise ValueError(f"dataset {name!r} is not prepared in {where}; {how}")
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise ValueError(f"dataset {name!r} in {where} is stored as {file_format and file_format.value!r}, "
                         f"random access needs array_record; {how}")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (ValueError, KeyError) as e:
        raise ValueError(f"bad split {split!r} for dataset {name!r}; available splits: "
                         f"{sorted(builder.info.splits)} ({e})") from e


# --- iterators ---------------------------------------------------------------------------------

def _resolve_processes(process_index, process_count, global_batch_size) -> tuple[int, int, int]:
    """``(process_index, process_count, local_batch_size)``, defaulting to JAX's process info."""
    if process_count is None:
        import jax
        process_count = jax.process_count()
    if process_index is None:
        import jax
        process_index = jax.process_index()
    if int(global_batch_size) != global_batch_size or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count "
                         f"{process_count}")
    return int(process_index), int(process_count), int(global_batch_size) // int(process_count)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class _BatchIterator:
    """Shared machinery: batch counter, state, thread pool and in-order prefetch queue.

    Subclasses implement ``_build(k) -> dict`` (pure in ``k``) and ``_state_fields() -> dict``.
    """

    def __init__(self, *, global_batch_size, seed, process_index, process_count, num_threads, prefetch):
        self.process_index, self.process_count, self.local_batch_size = _resolve_processes(
            process_index, process_count, global_batch_size)
        self.global_batch_size = int(global_batch_size)
        self.seed = _check_seed(seed)
        if num_threads < 0 or prefetch < 0:
            raise ValueError(f"num_threads and prefetch must be >= 0, got {num_threads}, {prefetch}")
        self.prefetch = int(prefetch)
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="jaxdiff-data")
                      if num_threads > 0 and prefetch > 0 else None)
        self._pending: collections.deque = collections.deque()   # futures for batches next, next+1, ...
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pool is None:
            batch = self._build(self._next)
        else:
            while len(self._pending) < self.prefetch:
                self._pending.append(self._pool.submit(self._build, self._next + len(self._pending)))
            batch = self._pending.popleft().result()
        self._next += 1
        return batch

    def _drop_pending(self):
        for future in self._pending:
            future.cancel()
        self._pending.clear()

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: ``{"next_batch": k, "seed": ..., "global_batch_size": ..., ...}``."""
        return {"next_batch": self._next, "seed": self.seed, "global_batch_size": self.global_batch_size,
                **self._state_fields()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state["next_batch"]``; the other fields must match this iterator's."""
        mine = self.get_state()
        if not isinstance(state, Mapping) or set(state) != set(mine):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"iterator state must have the fields {sorted(mine)}, got {got}")
        diff = {k: (state[k], mine[k]) for k in mine if k != "next_batch" and state[k] != mine[k]}
        if diff:
            raise ValueError("iterator state does not match this iterator (field: (state, iterator)): "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(diff.items())))
        nxt = state["next_batch"]
        if isinstance(nxt, bool) or int(nxt) != nxt or nxt < 0:
            raise ValueError(f"next_batch must be a non-negative integer, got {nxt!r}")
        self._drop_pending()
        self._next = int(nxt)

    def close(self) -> None:
        """Stop the worker threads (batches already handed out stay valid)."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ImageIterator(_BatchIterator):
    """Endless, deterministic, host-sharded batches of images from a random-access ``source``.

    ``next(it)`` -> ``{"image": float32 (local_B, image_size, image_size, C) in [-1, 1],
    "label": int32 (local_B,)}`` with ``local_B = global_batch_size // process_count`` (no
    "label" when ``label_key`` is None). ``source`` is any sequence of example dicts, e.g. from
    :func:`open_source`. See the module docstring for the determinism contract.

    crop: "center" | "random" | "resize" (see :func:`transforms.crop_and_resize`).
    caption_key / tokenize: text-conditioned data: each example's caption (a string, or a list of captions of
      which one is drawn from ``(seed, epoch, position)``) is turned into ``"tokens"`` ``(local_B, S)`` int32 by
      ``tokenize(list of str) -> (n, S)`` (a word or CLIP tokenizer).
    num_threads / prefetch: worker threads, and how many batches are built ahead (0: inline).
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], *, global_batch_size: int, image_size: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None,
                 random_flip: bool = True, crop: str = "center", image_key: str = "image",
                 label_key: str | None = "label", shuffle: bool = True,
                 num_threads: int = 2, prefetch: int = 2, caption_key: str | None = None, tokenize=None):
        if crop not in transforms.CROPS:
            raise ValueError(f"crop must be one of {transforms.CROPS}, got {crop!r}")
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        super().__init__(global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, num_threads=num_threads, prefetch=prefetch)
        self.source, self.num_examples = source, len(source)
        if self.num_examples < self.global_batch_size:
            raise ValueError(f"the source has {self.num_examples} examples, fewer than one global batch "
                             f"of {self.global_batch_size}")
        first = source[0]
        for key in (image_key, label_key):
            if key is not None and key not in first:
                raise ValueError(f"feature {key!r} not in the examples; available: {sorted(first)}")
        if (caption_key is None) != (tokenize is None):
            raise ValueError("captions need both caption_key (the feature holding them) and tokenize (the text "
                             f"model's tokenizer); got caption_key={caption_key!r}, tokenize={tokenize!r}")
        if caption_key is not None and caption_key not in first:
            raise ValueError(f"caption feature {caption_key!r} not in the examples of this dataset (a text-conditioned "
                             f"run needs captions, e.g. dataset 'captioned_digits/16'); available: {sorted(first)}")
        self.caption_key, self.tokenize = caption_key, tokenize
        transforms.check_image(first[image_key], image_key)
        self.image_size, self.crop, self.random_flip, self.shuffle = int(image_size), crop, bool(random_flip), bool(shuffle)
        self.image_key, self.label_key = image_key, label_key
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        self._permutation = functools.lru_cache(maxsize=2)(self._epoch_permutation)

    def _state_fields(self):
        return {"num_examples": self.num_examples, "shuffle": self.shuffle}

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next // self.steps_per_epoch

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch, _PERMUTATION_TAG]).permutation(self.num_examples)

    def _example(self, record: Mapping[str, Any], epoch: int, position: int) -> np.ndarray:
        image = transforms.check_image(record[self.image_key], self.image_key)
        flip, u = False, (0.5, 0.5, 0.5)
        if self.random_flip or self.crop == "random":
            flip, *u = transforms.draw_augmentation(
                np.random.default_rng([self.seed, epoch, _AUGMENT_TAG, position]))
        image = transforms.crop_and_resize(image, self.image_size, self.crop, *u)
        return image[:, ::-1] if flip and self.random_flip else image

    def _build(self, k: int) -> dict[str, np.ndarray]:
        epoch, step = divmod(k, self.steps_per_epoch)
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = range(start, start + self.local_batch_size)
        indices = [int(i) for i in self._permutation(epoch)[start:start + self.local_batch_size]]
        getitems = getattr(self.source, "__getitems__", None)
        records = getitems(indices) if getitems is not None else [self.source[i] for i in indices]
        images = [self._example(r, epoch, pos) for r, pos in zip(records, positions)]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images of one batch differ in shape {sorted(shapes)}; channels must agree")
        batch = {"image": transforms.to_unit_range(np.stack(images))}
        if self.label_key is not None:
            batch["label"] = np.asarray([r[self.label_key] for r in records], np.int32)
        if self.caption_key is not None:
            texts = [self._caption(r[self.caption_key], epoch, pos) for r, pos in zip(records, positions)]
            batch["tokens"] = np.asarray(self.tokenize(texts), np.int32)
        return batch

    def _caption(self, value, epoch: int, position: int) -> str:
        """The example's caption: the one given, or one of its captions drawn from ``(seed, epoch, position)``."""
        if not isinstance(value, (str, bytes)):
            options = list(value)
            if not options:
                raise ValueError(f"an example has no caption in feature {self.caption_key!r}")
            rng = np.random.default_rng([self.seed, epoch, _CAPTION_TAG, position])
            value = options[int(rng.integers(len(options)))]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class SyntheticIterator(_BatchIterator):
    """Random data with :class:`ImageIterator`'s interface, for throughput benchmarks.

    ``next(it)`` -> ``{"image": float32 (local_B, image_size, image_size, channels) uniform in
    [-1, 1), "label": int32 (local_B,) in [0, num_classes)}`` (no "label" if num_classes is None).
    Row ``i`` of global batch ``k`` is drawn from ``(seed, k, i)``: host-count independent too.
    """

    def __init__(self, *, global_batch_size: int, image_size: int, seed: int = 0, channels: int = 3,
                 num_classes: int | None = 10, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 0, prefetch: int = 0):
        super().__init__(global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, num_threads=num_threads, prefetch=prefetch)
        if image_size < 1 or channels < 1 or (num_classes is not None and num_classes < 1):
            raise ValueError(f"image_size, channels and num_classes must be positive, got "
                             f"{image_size}, {channels}, {num_classes}")
        self.shape = (int(image_size), int(image_size), int(channels))
        self.num_classes = num_classes

    def _state_fields(self):
        return {"synthetic_shape": list(self.shape), "num_classes": self.num_classes}

    def _build(self, k: int) -> dict[str, np.ndarray]:
        start = self.process_index * self.local_batch_size
        rngs = [np.random.default_rng([self.seed, k, i]) for i in range(start, start + self.local_batch_size)]
        batch = {"image": np.stack([2 * r.random(self.shape, np.float32) - 1 for r in rngs])}
        if self.num_classes is not None:
            batch["label"] = np.asarray([r.integers(self.num_classes) for r in rngs], np.int32)
        return batch


def synthetic_iterator(*, global_batch_size: int, image_size: int, seed: int = 0, channels: int = 3,
                       num_classes: int | None = 10, process_index: int | None = None,
                       process_count: int | None = None, **threads) -> SyntheticIterator:
    """Endless random batches shaped like :class:`ImageIterator`'s; see :class:`SyntheticIterator`."""
    return SyntheticIterator(global_batch_size=global_batch_size, image_size=image_size, seed=seed,
                             channels=channels, num_classes=num_classes, process_index=process_index,
                             process_count=process_count, **threads)


# --- config and device placement ---------------------------------------------------------------

_REQUIRED = ("name", "split", "image_size")
_DEFAULTS = {"data_dir": None, "random_flip": True, "crop": "center", "label_key": "label",
             "image_key": "image", "shuffle": True, "num_threads": 2, "prefetch": 2, "caption_key": None}


def _config_fields(config) -> dict[str, Any]:
    if hasattr(config, "to_dict"):          # ml_collections.ConfigDict
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "__dict__"):
        return {k: v for k, v in vars(config).items() if not k.startswith("_")}
    raise ValueError(f"data config must be a ConfigDict, mapping or attribute object, got {type(config).__name__}")


def make_iterator(data_config, *, global_batch_size: int, seed: int, process_index: int | None = None,
                  process_count: int | None = None, tokenize=None) -> ImageIterator:
    """Open ``data_config.name`` / ``.split`` and wrap it in an :class:`ImageIterator`.

    Required fields: name, split, image_size. Optional: data_dir (None: TFDS default, or
    ``~/.cache/jaxdiff/tensorflow_datasets`` for digits), random_flip (True), crop ("center"),
    label_key ("label"; None: no labels), image_key ("image"), shuffle (True), num_threads (2),
    prefetch (2), caption_key (None; with ``tokenize``, batches get ``"tokens"``). Batches: see
    :class:`ImageIterator`.
    """
    fields = _config_fields(data_config)
    unknown = sorted(set(fields) - set(_REQUIRED) - set(_DEFAULTS))
    missing = [k for k in _REQUIRED if k not in fields]
    if unknown or missing:
        raise ValueError(f"data config: unknown fields {unknown}, missing fields {missing}; accepted: "
                         f"required {list(_REQUIRED)}, optional {sorted(_DEFAULTS)}")
    cfg = {**_DEFAULTS, **fields}
    source = open_source(cfg["name"], cfg["split"], cfg["data_dir"])
    return ImageIterator(source, global_batch_size=global_batch_size, image_size=cfg["image_size"],
                         seed=seed, process_index=process_index, process_count=process_count,
                         random_flip=cfg["random_flip"], crop=cfg["crop"], image_key=cfg["image_key"],
                         label_key=cfg["label_key"], shuffle=cfg["shuffle"],
                         num_threads=cfg["num_threads"], prefetch=cfg["prefetch"],
                         caption_key=cfg["caption_key"], tokenize=tokenize)


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local batch -> global ``jax.Array``s via ``jax.make_array_from_process_local_data``.

    ``batch[key]``: ``(local_B, ...)`` on this host; the result is ``(local_B * process_count, ...)``
    laid out by ``sharding`` (one ``jax.sharding.Sharding`` for all keys, or a dict per key).
    """
    import jax
    if isinstance(sharding, Mapping):
        if set(sharding) != set(batch):
            raise ValueError(f"sharding keys {sorted(sharding)} do not match batch keys {sorted(batch)}")
        shardings = dict(sharding)
    elif isinstance(sharding, jax.sharding.Sharding):
        shardings = {key: sharding for key in batch}
    else:
        raise ValueError(f"sharding must be a jax.sharding.Sharding or a dict of them, got {type(sharding).__name__}")
    return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
            for key, value in batch.items()}
