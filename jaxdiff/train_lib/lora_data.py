"""The data of a text-conditioned LoRA run: the instance images (``config.data``'s dataset, optionally only the
examples of one label and only the first few of them, DreamBooth's handful) and, with prior preservation, the class
images the frozen base drew from the class prompt once at the start of the run.

The class images are written to ``<workdir>/class_images/`` (``images.npz`` ``(N, H, W, C)`` float32 in [-1, 1],
``meta.json``, ``grid.png``) before the first step, so a resumed run reads the very same images and never draws
them again; a file made for another prompt, count, seed or base is refused. Each batch's class rows are a pure
function of ``(seed, batch index)`` (epochs of permutations of the N images), so resumption is exact.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxdiff.data import pipeline

log = logging.getLogger("jaxdiff.train")
CLASS_DIR = "class_images"
_CLASS_ORDER_TAG, CLASS_SAMPLE_TAG = 5, 13


class Subset(Sequence):
    """The examples ``indices`` of ``source`` (a random-access source), in that order."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]


def parse_filter(conditions: Sequence[str]) -> dict[str, int]:
    """``("label=7", "thickness=2")`` -> ``{"label": 7, "thickness": 2}``; ValueError naming a malformed entry."""
    out = {}
    for cond in conditions:
        key, eq, value = str(cond).partition("=")
        if not eq or not key.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"config key 'lora.instance_filter': {cond!r} must read 'feature=integer', e.g. 'label=7'")
        out[key.strip()] = int(value)
    return out


def instance_indices(source: Sequence[Mapping], conditions: Sequence[str], count: int) -> list[int]:
    """Indices of the fine-tuning examples: those whose features equal ``conditions`` (``"feature=value"``
    strings; none: all), the first ``count`` of them (0: all). ValueError for a feature the examples lack or
    when no example is left."""
    where = parse_filter(conditions)
    if where:
        missing = sorted(set(where) - set(source[0]))
        if missing:
            raise ValueError(f"config key 'lora.instance_filter' names features {missing} the examples lack; "
                             f"available: {sorted(source[0])}")
        indices = [i for i in range(len(source)) if all(int(source[i][k]) == v for k, v in where.items())]
        if not indices:
            raise ValueError(f"config key 'lora.instance_filter' = {tuple(conditions)}: no example matches")
    else:
        indices = list(range(len(source)))
    return indices[:count] if count else indices


def instance_iterator(data_config, *, global_batch_size: int, seed: int, conditions: Sequence[str] = (),
                      count: int = 0) -> pipeline.ImageIterator:
    """Batches ``{"image", ...}`` of the instance images (no labels, no captions: the instance prompt is the
    caption of every one). A subset smaller than a batch is repeated until it fills one."""
    fields = {"random_flip": True, "crop": "center", "image_key": "image", "shuffle": True, "num_threads": 2,
              "prefetch": 2, **dict(data_config)}
    source = pipeline.open_source(fields["name"], fields["split"], fields.get("data_dir"))
    indices = instance_indices(source, conditions, count)
    indices = indices * math.ceil(global_batch_size / len(indices))
    log.info("LoRA instance images: %d examples of %s%s", len(set(indices)), fields["name"],
             f" with {', '.join(conditions)}" if conditions else "")
    return pipeline.ImageIterator(Subset(source, indices), global_batch_size=global_batch_size,
                                  image_size=fields["image_size"], seed=seed, random_flip=fields["random_flip"],
                                  crop=fields["crop"], image_key=fields["image_key"], label_key=None,
                                  shuffle=fields["shuffle"], num_threads=fields["num_threads"],
                                  prefetch=fields["prefetch"])


class PriorBatches:
    """An instance iterator whose batches also hold ``"class_image"`` ``(local_B, H, W, C)``: rows
    ``k B .. (k + 1) B - 1`` of the endless sequence of permutations (drawn from ``(seed, epoch)``) of
    ``class_images`` for global batch ``k``, this host's share of them. State: the instance iterator's."""

    def __init__(self, instances: pipeline.ImageIterator, class_images: np.ndarray, seed: int):
        self.instances, self.class_images, self.seed = instances, np.asarray(class_images, np.float32), int(seed)

    def __iter__(self):
        return self

    def class_rows(self, k: int) -> np.ndarray:
        """Indices into ``class_images`` of global batch ``k``'s class rows, this host's share ``(local_B,)``."""
        n, b = len(self.class_images), self.instances.global_batch_size
        rows = np.arange(k * b, (k + 1) * b)
        epochs = rows // n
        perms = {int(e): np.random.default_rng([self.seed, int(e), _CLASS_ORDER_TAG]).permutation(n)
                 for e in np.unique(epochs)}
        idx = np.array([perms[int(e)][r % n] for e, r in zip(epochs, rows)])
        lb, p = self.instances.local_batch_size, self.instances.process_index
        return idx[p * lb:(p + 1) * lb]

    def __next__(self) -> dict:
        k = self.instances.get_state()["next_batch"]
        batch = dict(next(self.instances))
        batch["class_image"] = self.class_images[self.class_rows(k)]
        return batch

    def get_state(self) -> dict:
        return self.instances.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.instances.set_state(state)

    def close(self) -> None:
        self.instances.close()


def class_images(workdir: str, meta: dict, draw: Callable[[], np.ndarray]) -> np.ndarray:
    """``(N, H, W, C)`` float32: the class images of ``<workdir>/class_images/`` when they exist (ValueError
    when their ``meta.json`` differs from ``meta``: another prompt, count, seed or base), else ``draw()``'s,
    written there first (process 0; atomically)."""
    folder = os.path.join(workdir, CLASS_DIR)
    path, meta_path = os.path.join(folder, "images.npz"), os.path.join(folder, "meta.json")
    if os.path.isfile(path):
        with open(meta_path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"{folder} holds class images made for another setting (key: (saved, this run)): "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(diff.items()))
                             + "; use a new workdir (or delete that folder to draw them again)")
        with np.load(path) as f:
            images = f["images"]
        log.info("prior preservation: %d class images read from %s", len(images), path)
        return images
    images = np.clip(np.asarray(draw(), np.float32), -1.0, 1.0)
    if jax.process_index() == 0:
        from jaxdiff.train_lib.images import save_grid
        os.makedirs(folder, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, images=images)
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, path)
        save_grid(images[:100], os.path.join(folder, "grid.png"), scale=2)
        log.info("prior preservation: %d class images drawn from the frozen base, written to %s", len(images), path)
    return images


__all__ = ["CLASS_DIR", "CLASS_SAMPLE_TAG", "PriorBatches", "Subset", "class_images", "instance_indices", "parse_filter",
           "instance_iterator"]
