"""Per-example image transforms: square crop, resize, horizontal flip, scaling to [-1, 1].

All functions are pure numpy/Pillow. The random ones take their randomness as plain numbers drawn
by the caller (:func:`draw_augmentation`), so an example's augmentation is fixed by the generator
it was drawn from and not by which thread or host processes it.
"""
from __future__ import annotations

import math

import numpy as np

CROPS = ("center", "random", "resize")
RANDOM_CROP_MIN_FRAC = 0.8   # "random": crop side is at least 80% of the short side (as ADM)


def _to_pil(image: np.ndarray):
    from PIL import Image
    if image.shape[-1] == 1:
        return Image.fromarray(image[..., 0])
    return Image.fromarray(image)


def _from_pil(pil, channels: int) -> np.ndarray:
    out = np.asarray(pil)
    return out[..., None] if channels == 1 else out


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(height, width, C)`` uint8, bicubic (Pillow, box pre-reduction).

    Returns the input unchanged when it already has the target size.
    """
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image
    pil = _to_pil(image).resize((width, height), Image.BICUBIC, reducing_gap=2.0)
    return _from_pil(pil, image.shape[-1])


def check_image(image: np.ndarray, key: str) -> np.ndarray:
    """Validate one decoded image: ``(H, W)`` or ``(H, W, C)`` uint8 with C in {1, 3, 4}; -> (H, W, C)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
        raise ValueError(f"feature {key!r} must be uint8 images of shape (H, W, C) with C in (1, 3, 4), "
                         f"got dtype {image.dtype} shape {image.shape}")
    return image


def draw_augmentation(rng: np.random.Generator) -> tuple[bool, float, float, float]:
    """Draw ``(flip, scale_u, offset_y_u, offset_x_u)``: a fair coin and three uniforms in [0, 1).

    Always the same four draws in the same order, whatever the crop mode, so turning one
    augmentation on or off does not change the others.
    """
    u = rng.random(4)
    return bool(u[0] < 0.5), float(u[1]), float(u[2]), float(u[3])


def crop_and_resize(image: np.ndarray, size: int, crop: str,
                    scale_u: float = 0.5, offset_y_u: float = 0.5, offset_x_u: float = 0.5) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(size, size, C)`` uint8.

    crop:
      "center": the central ``min(H, W)`` square, resized to ``size`` (ADM / DDPM for CelebA, LSUN).
      "resize": the whole image resized to ``size`` x ``size`` (aspect ratio not kept).
      "random": a square of side ``s`` between ``0.8 * min(H, W)`` and ``min(H, W)`` (from
        ``scale_u``) at a random position (``offset_*_u``), resized to ``size`` -- ADM's random crop.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    h, w = image.shape[:2]
    if crop == "resize":
        return resize(image, size, size)
    side = min(h, w)
    if crop == "center":
        top, left = (h - side) // 2, (w - side) // 2
    else:
        low = max(1, math.ceil(RANDOM_CROP_MIN_FRAC * side))
        side = low + min(int(scale_u * (side - low + 1)), side - low)
        top = min(int(offset_y_u * (h - side + 1)), h - side)
        left = min(int(offset_x_u * (w - side + 1)), w - side)
    return resize(image[top:top + side, left:left + side], size, size)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] -> float32 in [-1, 1] as ``x / 127.5 - 1`` (any shape)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
