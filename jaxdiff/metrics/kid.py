"""Kernel Inception Distance (Bińkowski et al., 2018): unbiased MMD^2 with a cubic polynomial kernel.

    k(x, y) = (x . y / d + 1)^3

averaged over ``num_subsets`` random subsets of ``m`` real and ``m`` fake features (drawn without
replacement within a subset). Defaults follow clean-fid / torch-fidelity: 100 subsets of 1,000, with
``m`` capped by the smaller set. In a non-Inception feature space this is a kernel distance in that
space, not "KID" proper.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def polynomial_kernel(x: jax.Array, y: jax.Array, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> jax.Array:
    """``(gamma x . y + coef0) ** degree`` for ``x (n, d)``, ``y (m, d)`` -> ``(n, m)``.

    ``gamma`` defaults to ``1 / d``.
    """
    d = x.shape[-1]
    g = 1.0 / d if gamma is None else gamma
    return (g * jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST) + coef0) ** degree


def _mmd2_unbiased(x: jax.Array, y: jax.Array) -> jax.Array:
    m = x.shape[0]
    kxx = polynomial_kernel(x, x)
    kyy = polynomial_kernel(y, y)
    kxy = polynomial_kernel(x, y)
    off = 1.0 / (m * (m - 1))
    return ((kxx.sum() - jnp.trace(kxx)) * off + (kyy.sum() - jnp.trace(kyy)) * off
            - 2.0 * kxy.mean())


_mmd2_subsets = jax.jit(lambda x, y, ix, iy: jax.lax.map(lambda ij: _mmd2_unbiased(x[ij[0]], y[ij[1]]), (ix, iy)))


def _as_2d(a, name):
    a = jnp.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"kid: {name} features must be (N, D), got shape {tuple(a.shape)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.float32)
    return a


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 between equal-size samples ``x (m, D)`` and ``y (m, D)`` with the cubic kernel, m >= 2.

    ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + (same for y) - 2 mean_{i, j} k(x_i, y_j)``.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(f"mmd2_unbiased: x and y must have the same shape (m >= 2, D), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return float(jax.jit(_mmd2_unbiased)(x, y))


def kid_subset_indices(n_real: int, n_fake: int, num_subsets: int = 100, subset_size: int = 1000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The subsets :func:`kid` averages over: ``(real_idx (S, m), fake_idx (S, m))`` int arrays.

    ``m = min(subset_size, n_real, n_fake)``, ``S = num_subsets``.

    Each row is drawn without replacement by ``numpy.random.default_rng(seed)`` (real then fake, per subset).
    """
    m = min(subset_size, n_real, n_fake)
    if m < 2:
        raise ValueError(f"kid: need at least 2 real and 2 fake features, got {n_real} and {n_fake}")
    if num_subsets < 1:
        raise ValueError(f"kid: num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    ir = np.empty((num_subsets, m), np.int64)
    jf = np.empty((num_subsets, m), np.int64)
    for s in range(num_subsets):
        ir[s] = rng.choice(n_real, m, replace=False)
        jf[s] = rng.choice(n_fake, m, replace=False)
    return ir, jf


def kid(real_features, fake_features, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID estimate -> ``(mean, std)`` of the unbiased MMD^2 over ``num_subsets`` subsets.

    ``real_features``: ``(N_r, D)``; ``fake_features``: ``(N_f, D)`` (numpy or jax). Subsets are those of
    :func:`kid_subset_indices` (size ``min(subset_size, N_r, N_f)``). ``std`` is the population standard
    deviation over subsets (``ddof=0``, as torch-fidelity; 0.0 for one subset). Computed in jax, one
    subset at a time (``lax.map``), in the input's float dtype (float64 with ``jax_enable_x64``).

    The estimate is unbiased for *independent* samples and can be negative. Passing the very same
    features as real and fake is not that case: it gives ``-2 (mean k(x_i, x_i) - mean_{i != j}
    k(x_i, x_j)) / m < 0``. The value scales with the feature magnitudes (the kernel is cubic).
    """
    x, y = _as_2d(real_features, "real"), _as_2d(fake_features, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: real and fake feature dims differ ({x.shape[1]} vs {y.shape[1]})")
    ir, jf = kid_subset_indices(x.shape[0], y.shape[0], num_subsets, subset_size, seed)
    vals = np.asarray(_mmd2_subsets(x, y, jnp.asarray(ir), jnp.asarray(jf)), np.float64)
    return float(vals.mean()), float(vals.std())
