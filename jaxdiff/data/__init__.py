"""Input pipelines: TFDS image datasets and the embedded digits default."""
