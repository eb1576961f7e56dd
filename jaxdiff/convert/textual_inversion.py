"""Textual-inversion embeddings in diffusers' file format: a safetensors file holding one tensor, the new token's
embedding ``(D,)`` (or ``(n, D)`` for a token of n vectors), under the token's own name; what
``StableDiffusionPipeline.load_textual_inversion(path)`` reads (it adds the token to the tokenizer and the rows to
the text encoder's table)."""
from __future__ import annotations

import os

import numpy as np

FILE_NAME = "learned_embeds.safetensors"


def save_textual_inversion(path: str, token: str, embedding) -> str:
    """Write ``embedding`` ``(D,)`` or ``(n, D)`` float32 for ``token`` to ``path`` (a folder gets
    ``learned_embeds.safetensors``); returns the file's path."""
    from safetensors.numpy import save_file
    e = np.asarray(embedding, np.float32)
    if e.ndim not in (1, 2) or not e.size:
        raise ValueError(f"a token embedding must have shape (D,) or (n, D), got {e.shape}")
    if not isinstance(token, str) or not token:
        raise ValueError(f"token must be a non-empty string, got {token!r}")
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, FILE_NAME)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({token: np.ascontiguousarray(e)}, path)
    return path


def load_textual_inversion(path: str) -> tuple[str, np.ndarray]:
    """``(token, embedding (D,) or (n, D) float32)`` of a diffusers textual-inversion file (or a folder with
    ``learned_embeds.safetensors``). ValueError for a file that holds not exactly one tensor."""
    from safetensors.numpy import load_file
    if os.path.isdir(path):
        path = os.path.join(path, FILE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no textual-inversion file {path}")
    tensors = load_file(path)
    if len(tensors) != 1:
        raise ValueError(f"{path}: a diffusers textual-inversion file holds one tensor under the token's name, "
                         f"found {sorted(tensors)[:5]}")
    (token, embedding), = tensors.items()
    return token, np.asarray(embedding, np.float32)


__all__ = ["FILE_NAME", "load_textual_inversion", "save_textual_inversion"]
