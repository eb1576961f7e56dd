"""Optimizer from ``config.optim``: AdamW with linear warm-up, cosine (or constant) decay and global-norm
gradient clipping; weight decay only on matrices and kernels (ndim >= 2)."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    """Step -> learning rate: 0 -> ``lr`` linearly over ``warmup_steps``, then cosine to
    ``lr * end_lr_factor`` at ``total_steps`` (or constant)."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {optim.schedule!r}")
    if optim.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {optim.lr}")
    warmup = max(int(optim.warmup_steps), 0)
    if optim.schedule == "constant":
        return optax.linear_schedule(0.0, optim.lr, warmup) if warmup else optax.constant_schedule(optim.lr)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total_steps, warmup + 1),
                                              end_value=optim.lr * optim.end_lr_factor)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` for ``config.optim``."""
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay,
                             mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
    return optax.chain(*parts), schedule
