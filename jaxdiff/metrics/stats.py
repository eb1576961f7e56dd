"""Streaming feature statistics (count, mean, covariance) and the pytorch-fid / clean-fid ``.npz`` format.

:class:`FeatureStats` accumulates batches of features ``(B, D)`` — numpy arrays, or ``jax.Array`` s
possibly sharded over devices along the batch — into host-side float64 moments, batch by batch.

Numerical choice: *centred* accumulation with the pairwise (Chan et al., 1979) merge. Each batch is
reduced to ``(n_b, mean_b, M2_b = sum (x - mean_b)(x - mean_b)^T)`` — on device for jax inputs (a jitted
two-pass reduction; with batch-sharded input XLA reduces per device and all-reduces the partial sums,
so only ``D + D^2`` numbers leave the devices) — and merged into the running state with

    n = n_a + n_b,   delta = mean_b - mean_a,   mean = mean_a + delta n_b / n,
    M2 = M2_a + M2_b + outer(delta, delta) n_a n_b / n.

Unlike raw sums (``sum x x^T - n mean mean^T``), this does not cancel catastrophically when the
features have a large mean relative to their spread. Accuracy: with float64 batch reductions (numpy
input, or jax input with ``jax_enable_x64``) ``mean`` and ``covariance`` agree with ``np.mean`` /
``np.cov`` on the concatenated features to ~1e-12 relative (tested at 1e-6); with float32 device
reductions the per-batch moments carry float32 rounding (~1e-6 relative to the batch's own spread),
after which merging is float64.

``merge`` combines states accumulated on different hosts (or different streams) with the same
formula, so the order and the batch split do not matter beyond rounding.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _device_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x``: ``(B, D)`` -> (batch mean ``(D,)``, centred scatter ``(D, D)``), in x's float dtype."""
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    return mean, jnp.einsum("bi,bj->ij", xc, xc, precision=jax.lax.Precision.HIGHEST)


def _as_features(features, dim: int | None) -> tuple[object, bool]:
    if isinstance(features, jax.Array):
        if features.ndim != 2:
            raise ValueError(f"FeatureStats: features must be (B, D), got shape {tuple(features.shape)}")
        if not jnp.issubdtype(features.dtype, jnp.floating):
            features = features.astype(jnp.float32)
        is_jax = True
    else:
        features = np.asarray(features, np.float64)
        if features.ndim != 2:
            raise ValueError(f"FeatureStats: features must be (B, D), got shape {features.shape}")
        is_jax = False
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"FeatureStats: feature dimension {features.shape[1]} does not match the "
                         f"accumulated dimension {dim}")
    return features, is_jax


@dataclass
class FeatureStats:
    """Running first and second moments of features in float64 on the host.

    Attributes: ``count`` (int), ``mean_`` ``(D,)``, ``m2`` ``(D, D)`` = sum of outer products of the
    centred features (``None`` until the first batch fixes ``D``). Use :meth:`update` per batch,
    :meth:`merge` across hosts/streams, then :attr:`mean` and :meth:`covariance`.
    """

    count: int = 0
    mean_: np.ndarray | None = None
    m2: np.ndarray | None = None
    dim: int | None = field(default=None)

    @classmethod
    def from_features(cls, features) -> "FeatureStats":
        """Statistics of one array of features ``(N, D)`` (numpy or jax, possibly sharded)."""
        s = cls()
        s.update(features)
        return s

    def _merge_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        if self.count == 0:
            self.count, self.mean_, self.m2 = int(n_b), mean_b.copy(), m2_b.copy()
            self.dim = mean_b.shape[0]
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean_
        self.mean_ = self.mean_ + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def update(self, features) -> "FeatureStats":
        """Add a batch ``features`` ``(B, D)`` (numpy, or a jax.Array, possibly sharded along B). Returns self.

        jax inputs are reduced on their devices (jitted, one compilation per batch shape/sharding) and
        only the batch moments are copied to the host. Empty batches (B = 0) are ignored.
        """
        features, is_jax = _as_features(features, self.dim)
        b = features.shape[0]
        if b == 0:
            return self
        if is_jax:
            mean_b, m2_b = jax.device_get(_device_moments(features))
            mean_b, m2_b = np.asarray(mean_b, np.float64), np.asarray(m2_b, np.float64)
        else:
            mean_b = features.mean(axis=0)
            xc = features - mean_b
            m2_b = xc.T @ xc
        self._merge_moments(b, mean_b, m2_b)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Return a new ``FeatureStats`` holding the statistics of both (e.g. from two hosts)."""
        if not isinstance(other, FeatureStats):
            raise ValueError(f"FeatureStats.merge: expected FeatureStats, got {type(other).__name__}")
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"FeatureStats.merge: feature dimensions differ ({self.dim} vs {other.dim})")
        out = FeatureStats()
        if self.count:
            out._merge_moments(self.count, self.mean_, self.m2)
        if other.count:
            out._merge_moments(other.count, other.mean_, other.m2)
        return out

    @property
    def mean(self) -> np.ndarray:
        """Mean ``(D,)`` float64."""
        if self.count == 0:
            raise ValueError("FeatureStats: no features accumulated yet")
        return self.mean_.copy()

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance ``(D, D)`` float64, ``M2 / (count - ddof)`` (``ddof=1``: unbiased, as ``np.cov``).

        Warns (``UserWarning``) when ``count <= D``: the covariance then has rank < D (singular).
        """
        if self.count <= ddof:
            raise ValueError(f"FeatureStats: covariance needs more than {ddof} samples, have {self.count}")
        if self.count <= self.dim:
            warnings.warn(f"FeatureStats: singular covariance: {self.count} samples <= feature dim "
                          f"{self.dim} (rank <= {self.count - 1}); Fréchet distances from it are unreliable",
                          stacklevel=2)
        return self.m2 / (self.count - ddof)

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean (D,), unbiased covariance (D, D))``, the pair :func:`save_stats` writes."""
        return self.mean, self.covariance()


def save_stats(path: str | os.PathLike, mu, sigma) -> None:
    """Write ``mu`` ``(D,)`` and ``sigma`` ``(D, D)`` to ``path`` as ``.npz`` with keys ``"mu"``, ``"sigma"``.

    The format of pytorch-fid's ``--save-stats`` and clean-fid's reference statistics (float64 here).
    """
    mu, sigma = _check_mu_sigma(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), None, str(path))
    np.savez(path, mu=mu, sigma=sigma)


def _check_mu_sigma(mu, sigma, dim, where):
    if mu.ndim != 1:
        raise ValueError(f"{where}: 'mu' must have shape (D,), got {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: 'sigma' must have shape (D, D) = {(mu.shape[0],) * 2} to match 'mu', "
                         f"got {sigma.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{where}: statistics have feature dim {mu.shape[0]}, expected {dim}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{where}: statistics contain non-finite values")
    return mu, sigma


def load_stats(path: str | os.PathLike, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu (D,), sigma (D, D))`` float64 from a pytorch-fid / clean-fid style ``.npz``.

    ``dim``: if given, the required feature dimension. Raises ``ValueError`` when the keys ``"mu"`` /
    ``"sigma"`` are missing, shapes are inconsistent or ``D != dim``.
    """
    where = os.fspath(path)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (found {sorted(z.files)}); "
                             "expected the pytorch-fid/clean-fid format with 'mu' and 'sigma'")
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    return _check_mu_sigma(mu, sigma, dim, where)
