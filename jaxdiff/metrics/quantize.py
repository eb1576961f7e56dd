"""Float samples -> uint8 exactly as writing them to a PNG with ``torchvision.utils.save_image`` does.

pytorch-fid scores *PNG files*, i.e. uint8 images. Generated samples (float in [-1, 1]) must be
quantized the way the PNG writer would, or the Inception features see 0.5-level offsets a PNG never
has. Which writer? Pillow stores whatever uint8 it is given (PNG is lossless), so the convention is
the float -> uint8 step before it. The usual path in diffusion code bases that feed pytorch-fid is

    torchvision.utils.save_image(x, path, normalize=True, value_range=(-1, 1))

which does ``x.clamp(-1, 1)``, ``(x + 1) / 2`` (``sub_(low).div_(high - low)``), then
``mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)``: round half *up* by truncation of
``v + 0.5``, all in float32. :func:`quantize_uint8` reproduces these float32 operations in this order
(bit-identical to torchvision; tested against torch and a PIL PNG round trip).

Alternatives, and why not: ``np.round((x + 1) * 127.5)`` (round half to even; jaxdiff's own
``train_lib.images.to_uint8`` for preview grids) differs from it only on exact ties and in the last
float32 bit of ``(x + 1) * 127.5`` vs ``(x + 1) / 2 * 255`` (rare 1-level differences); plain
truncation ``((x + 1) * 127.5).astype(uint8)`` is biased by half a level (-0.5 on average) and is
not what the PNG path does.

Range: values outside [-1, 1] by more than ``atol`` raise ``ValueError`` (a wrong convention such as
[0, 1] or [0, 255] inputs, or a diverged sampler) unless ``clip=True``, which clamps silently like
``save_image``. Diffusion samplers do not clip their final sample, so slightly out-of-range values
are normal; clamping them is what the PNG path does.
"""
from __future__ import annotations

import numpy as np

DEFAULT_ATOL = 1e-2
CONVENTION = "torchvision.save_image: floor(clamp((clamp(x,-1,1)+1)/2*255+0.5, 0, 255)), float32"


def check_range(images, *, atol: float = DEFAULT_ATOL, what: str = "images") -> tuple[float, float]:
    """Check float ``images`` (any shape) are finite and within ``[-1 - atol, 1 + atol]`` -> ``(min, max)``.

    Raises ``ValueError`` naming the observed range, the number of offending values and the likely
    cause (images in [0, 255] or [0, 1]).
    """
    a = np.asarray(images)
    if a.size == 0:
        raise ValueError(f"{what}: empty array")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: expected float images in [-1, 1], got dtype {a.dtype}")
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(f"{what}: {int(a.size - finite.sum())} non-finite values (NaN/inf); the sampler diverged?")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1.0 - atol or hi > 1.0 + atol:
        n_out = int(np.sum((a < -1.0 - atol) | (a > 1.0 + atol)))
        hint = ""
        if hi > 2.0 and lo >= -atol:
            hint = " They look like [0, 255] values: pass uint8 images, or map them to [-1, 1] first."
        elif lo >= -atol:
            hint = " They may be in [0, 1]: map them to [-1, 1] with 2 x - 1."
        raise ValueError(f"{what}: values span [{lo:.4g}, {hi:.4g}], outside [-1, 1] beyond the tolerance "
                         f"{atol:g} ({n_out} of {a.size} values).{hint} To clamp them as a PNG writer "
                         "(torchvision's save_image) would, use clip=True (evaluate.py --clip).")
    return lo, hi


def quantize_uint8(images, *, clip: bool = False, atol: float = DEFAULT_ATOL) -> np.ndarray:
    """Quantize float images in [-1, 1] to uint8 as ``torchvision.utils.save_image(x, normalize=True,
    value_range=(-1, 1))`` does before writing a PNG (see the module docstring).

    ``images``: float array, any shape (e.g. ``(N, H, W, C)``), numpy or jax. Returns a numpy uint8
    array of the same shape: ``floor(clamp((clamp(x, -1, 1) + 1) / 2 * 255 + 0.5, 0, 255))`` computed
    in float32. uint8 input is returned unchanged (already quantized).

    ``clip=False``: ``ValueError`` when a value lies outside ``[-1 - atol, 1 + atol]`` or is not finite;
    ``clip=True``: out-of-range values are clamped (non-finite values still raise).
    """
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a
    if clip:
        check_range(a, atol=np.inf, what="quantize_uint8")
    else:
        check_range(a, atol=atol, what="quantize_uint8")
    x = np.clip(a.astype(np.float32), np.float32(-1), np.float32(1))
    x = (x - np.float32(-1)) / np.float32(2)                         # normalize: sub_(low).div_(high - low)
    x = x * np.float32(255) + np.float32(0.5)                        # mul(255).add_(0.5)
    x = np.clip(x, np.float32(0), np.float32(255))                   # clamp_(0, 255)
    return x.astype(np.uint8)                                        # to(uint8): truncation toward zero
