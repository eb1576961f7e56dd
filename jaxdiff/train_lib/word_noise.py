"""Word noise on caption tokens for text encoders trained from scratch (``text.word_dropout``,
``text.unknown_words``): words replaced by, and extra words inserted as, the tokenizer's unknown word, so that
its embedding is trained as "a word this model does not know" and prompts with unseen words still work.

Drawn inside the jitted train step from the step's key, so a resumed run draws the same noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def add_word_noise(key: jax.Array, tokens: jax.Array, *, drop: float, insert: float, unk_id: int, eos_id: int,
                   pad_id: int, first_word_id: int, max_run: int = 3) -> jax.Array:
    """``tokens (B, S)`` int (``bos``, words, ``eos``, then ``pad``) -> ``(B, S)`` with noise.

    Each word (id >= ``first_word_id``) becomes ``unk_id`` with probability ``drop``. Before each word and
    before ``eos``, a run of unknown words is inserted with probability ``insert``: one word, and each further
    one (up to ``max_run``, runs like "an image of") with probability 1/2. A row whose insertions would not fit
    in ``S`` gets none (its words are kept, ``eos`` is never cut).
    """
    b, s = tokens.shape
    k_drop, k_start, k_more = jax.random.split(key, 3)
    is_word = tokens >= first_word_id
    tokens = jnp.where(is_word & (jax.random.uniform(k_drop, (b, s)) < drop), unk_id, tokens)
    gap = is_word | (tokens == eos_id)
    run = gap & (jax.random.uniform(k_start, (b, s)) < insert)
    count = run.astype(jnp.int32)
    for more in jax.random.split(k_more, max_run - 1):
        run = run & (jax.random.uniform(more, (b, s)) < 0.5)
        count = count + run.astype(jnp.int32)
    length = jnp.sum(tokens != pad_id, axis=1)
    fits = length + count.sum(axis=1) <= s
    count = jnp.where(fits[:, None], count, 0)
    new_length = length + count.sum(axis=1)
    position = jnp.arange(s)[None] + jnp.cumsum(count, axis=1)            # where each old token moves
    position = jnp.where(tokens != pad_id, position, s)                    # pads: dropped (out of range)
    out = jnp.where(jnp.arange(s)[None] < new_length[:, None], unk_id, pad_id).astype(tokens.dtype)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    return out.at[rows, position].set(tokens, mode="drop")


__all__ = ["add_word_noise"]
