"""TensorFlow as the data stack uses it: on the host only. JAX owns the accelerators; a TensorFlow that
saw a GPU would reserve its memory at start-up, so every place that brings TensorFlow in (building the
embedded TFDS datasets, decoding with TFDS) goes through :func:`import_tensorflow`."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("jaxdiff.data")
_HIDDEN = False


def import_tensorflow():
    """``tensorflow``, with GPUs and TPUs hidden from it (once per process; a no-op where it has none)."""
    global _HIDDEN
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    if not _HIDDEN:
        for kind in ("GPU", "TPU"):
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError) as e:   # already initialised, or no such device type
                log.debug("tf.config.set_visible_devices([], %r): %s", kind, e)
        _HIDDEN = True
    return tf


def import_tfds():
    """``tensorflow_datasets``, after :func:`import_tensorflow` has hidden the accelerators."""
    import_tensorflow()
    import tensorflow_datasets as tfds
    return tfds
