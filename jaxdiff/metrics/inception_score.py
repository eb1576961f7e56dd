"""Inception Score (Salimans et al., 2016) from class logits or probabilities.

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = E_x p(y|x)

computed on ``splits`` disjoint chunks of the samples, reporting the mean and standard deviation over
chunks. With logits from a classifier other than InceptionV3 this is a "classifier score", not IS.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def inception_score(logits=None, *, probs=None, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` of the score over ``splits`` chunks; pass exactly one of ``logits`` / ``probs`` ``(N, K)``.

    Chunks are ``np.array_split`` of the samples in order (sizes differ by at most one, so every sample
    counts; the original code drops the remainder of ``N // splits``). ``std`` is over chunks with
    ``ddof=0`` (as the original). ``probs`` rows must be non-negative and sum to 1 (tolerance 1e-4);
    ``0 log 0 = 0``. float64 throughout.
    """
    if (logits is None) == (probs is None):
        raise ValueError("inception_score: pass exactly one of logits= or probs=")
    a = np.asarray(logits if probs is None else probs, np.float64)
    if a.ndim != 2:
        raise ValueError(f"inception_score: expected (N, K) {'logits' if probs is None else 'probs'}, "
                         f"got shape {a.shape}")
    n = a.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: need 1 <= splits <= N, got splits={splits}, N={n}")
    if not np.all(np.isfinite(a)):
        raise ValueError("inception_score: input contains non-finite values")
    if probs is None:
        logp = log_softmax(a, axis=1)
        p = np.exp(logp)
    else:
        if np.any(a < 0) or np.max(np.abs(a.sum(1) - 1.0)) > 1e-4:
            raise ValueError("inception_score: probs rows must be non-negative and sum to 1")
        p = a
        with np.errstate(divide="ignore"):
            logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    scores = []
    for idx in np.array_split(np.arange(n), splits):
        pc, lc = p[idx], logp[idx]
        py = pc.mean(0)
        with np.errstate(divide="ignore"):
            logpy = np.where(py > 0, np.log(np.where(py > 0, py, 1.0)), 0.0)
        kl = np.sum(pc * (lc - logpy[None, :]), axis=1).mean()
        scores.append(np.exp(kl))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())
