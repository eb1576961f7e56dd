"""Image grids as PNG (Pillow)."""
from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` floats in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile ``(N, H, W, C)`` images in [-1, 1] into one uint8 ``(rows*(H+pad)+pad, ..., C)`` image,
    ``nrow`` images a row (default: about square), each enlarged ``scale`` times (nearest)."""
    x = to_uint8(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid


def save_grid(images: np.ndarray, path: str, nrow: int | None = None, scale: int = 1) -> str:
    """Write :func:`make_grid` of ``images`` to ``path`` (PNG); returns the path."""
    from PIL import Image
    grid = make_grid(images, nrow, scale=scale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
