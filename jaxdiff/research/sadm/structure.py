"""The structural distance of SADM (Yang et al., CVPR 2024), as read here: how differently two paired
batches relate their own samples to each other, measured in a feature space that the structure
discriminator learns.

The paper's exact distance is not public in a form checked here (docs/sadm.md lists what was checked);
this module is *our reading* of its description ("the pairwise relationships among samples in each
training batch", "affinity matrix", "a comparison-based structure discriminator"):

    f = normalize(encoder(x)) (B, F)              unit features (our choice: bounds the affinities)
    S(X)_ij = softmax_{j != i}(f_i . f_j / tau)   row-stochastic affinity, the diagonal left out
    d(X0, X0_hat) = mean_i KL(S(X0)_i || S(X0_hat)_i)

Row ``i`` of both batches belongs to the same training example (``X0_hat`` are the denoiser's clean
estimates of noised ``X0``), so the two affinity matrices are compared entry by entry. The denoiser
minimises ``d``; the encoder (the discriminator) maximises it. Cosine affinities with a fixed temperature
keep ``d`` bounded (``<= 2 / tau`` per row), so the maximisation cannot run away without a gradient
penalty or spectral normalisation.

Pure JAX; no Flax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_features(f: jax.Array, name: str) -> None:
    if f.ndim != 2:
        raise ValueError(f"{name} must be (B, F) features, got shape {f.shape}")
    if f.shape[0] < 3:
        raise ValueError(f"the structural distance needs a batch of at least 3 samples (each row compares "
                         f"two or more others), got {f.shape[0]}")


def affinity_log_probs(features: jax.Array, temperature: float) -> jax.Array:
    """Row-wise log affinities of a batch: ``(B, F) -> (B, B)`` float32, ``log S_ij`` with ``S`` the
    softmax over ``j != i`` of cosine similarities / ``temperature``; the diagonal holds 0 (excluded)."""
    _check_features(features, "features")
    f = features.astype(jnp.float32)
    f = f / jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-12)
    logits = (f @ f.T) / temperature
    eye = jnp.eye(f.shape[0], dtype=bool)
    logp = jax.nn.log_softmax(jnp.where(eye, -jnp.inf, logits), axis=-1)
    return jnp.where(eye, 0.0, logp)


def structural_distance(real_features: jax.Array, fake_features: jax.Array, temperature: float) -> jax.Array:
    """``mean_i KL(S(real)_i || S(fake)_i)``: a float32 scalar >= 0, zero iff the two batches' affinity
    rows agree. ``real_features``, ``fake_features``: ``(B, F)`` with row ``i`` of both from example ``i``."""
    _check_features(real_features, "real_features")
    _check_features(fake_features, "fake_features")
    if real_features.shape[0] != fake_features.shape[0]:
        raise ValueError(f"real and fake batches must pair up row by row, got {real_features.shape[0]} and "
                         f"{fake_features.shape[0]} rows")
    log_p = affinity_log_probs(real_features, temperature)
    log_q = affinity_log_probs(fake_features, temperature)
    kl_rows = jnp.sum(jnp.exp(log_p) * (log_p - log_q) * (1.0 - jnp.eye(log_p.shape[0])), axis=-1)
    return jnp.mean(kl_rows)
