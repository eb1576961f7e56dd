"""New tokens for a text-conditioned LoRA run (textual-inversion style): the tokenizer learns whole new tokens
(``"<v1>"``) and the text encoder's token table gets one new row each, started from a given word's embedding or
at random. Only the new rows are trained; the old table stays frozen beside them.

``add_new_tokens(tokenizer, tokens) -> (tokenizer, ids)``: CLIP BPE tokenizers (:mod:`jaxdiff.convert.tokenizer`)
add them as added tokens (as transformers' ``add_tokens`` does, so ids are ``vocab_size ..``); the word tokenizer
(:mod:`jaxdiff.data.words`) is wrapped by :class:`WordTokenizerWithTokens`, which matches the new tokens verbatim
before splitting the rest into words.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.words import SPECIAL, WordTokenizer, split_words

#: tag of the random initialisation of new rows (folded into the run's seed)
TOKEN_INIT_TAG = 11


def _token_pattern(tokens: Sequence[str]) -> re.Pattern:
    """A regex matching any of ``tokens`` verbatim (longest first; an alphanumeric edge must not touch a letter or
    digit, so ``"sks"`` does not match inside ``"asks"``)."""
    parts = []
    for t in sorted(tokens, key=len, reverse=True):
        left = r"(?<![A-Za-z0-9])" if t[0].isalnum() else ""
        right = r"(?![A-Za-z0-9])" if t[-1].isalnum() else ""
        parts.append(left + re.escape(t) + right)
    return re.compile("(" + "|".join(parts) + ")")


class WordTokenizerWithTokens(WordTokenizer):
    """A :class:`~jaxdiff.data.words.WordTokenizer` with whole new tokens after its vocabulary: ``tokens[i]`` has
    id ``base.vocab_size + i`` and is matched verbatim (case-sensitive) wherever it occurs in a text; the rest of
    the text is split into words as before. ``(B, S)`` rows as the base tokenizer's."""

    def __init__(self, base: WordTokenizer, tokens: Sequence[str]):
        super().__init__(base.words, base.model_max_length)
        self.added_tokens = list(tokens)
        start = base.vocab_size
        self._added = {t: start + i for i, t in enumerate(self.added_tokens)}
        self._pattern = _token_pattern(self.added_tokens)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL) + len(self.words) + len(self.added_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` (no bos / eos): new tokens as themselves, the rest word by word."""
        ids = []
        for k, piece in enumerate(self._pattern.split(text)):
            ids.extend([self._added[piece]] if k % 2 else super().tokenize(piece))
        return ids

    def decode(self, ids) -> str:
        table = list(SPECIAL) + self.words + self.added_tokens
        return " ".join(table[int(i)] for i in ids if int(i) >= len(SPECIAL))


def check_new_tokens(tokens: Sequence[str], tokenizer) -> None:
    """ValueError for a new token that is empty, holds whitespace, repeats, or is already in ``tokenizer``'s
    vocabulary (a word of the word tokenizer, a special token, or a BPE vocabulary entry)."""
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"config key 'lora.new_tokens' repeats a token: {tokens}")
    for t in tokens:
        if not isinstance(t, str) or not t or any(ch.isspace() for ch in t):
            raise ValueError(f"config key 'lora.new_tokens': {t!r} must be a non-empty string without whitespace")
        if isinstance(tokenizer, WordTokenizer):
            known = t in SPECIAL or (split_words(t) == [t] and t in tokenizer.words)
        else:
            known = tokenizer.backend.token_to_id(t) is not None
        if known:
            raise ValueError(f"config key 'lora.new_tokens': {t!r} is already in the tokenizer's vocabulary; a new "
                             "concept needs a new token (e.g. '<v1>')")


def add_new_tokens(tokenizer, tokens: Sequence[str]):
    """``(tokenizer, ids)``: ``tokenizer`` able to read ``tokens`` (checked by :func:`check_new_tokens`) and their
    ids, ``vocab_size .. vocab_size + n - 1`` of the tokenizer before."""
    check_new_tokens(tokens, tokenizer)
    start = tokenizer.vocab_size
    if isinstance(tokenizer, WordTokenizer):
        tokenizer = WordTokenizerWithTokens(tokenizer, tokens)
        ids = [start + i for i in range(len(tokens))]
    else:
        ids = tokenizer.add_tokens(list(tokens))
    if ids != list(range(start, start + len(tokens))):
        raise ValueError(f"the tokenizer gave the new tokens {list(tokens)} ids {ids}, expected {start}..")
    return tokenizer, ids


def initial_rows(table: np.ndarray, tokenizer, init_words: Sequence[str], n: int, seed: int) -> np.ndarray:
    """``(n, D)`` float32 starting embeddings of ``n`` new tokens: row ``i`` is the mean embedding (in ``table``
    ``(V, D)``) of the tokens of ``init_words[i]`` (e.g. ``"seven"``), or, where ``init_words`` is ``()`` or
    ``init_words[i] == ""``, Gaussian with the table's standard deviation (drawn from ``(seed, i)``). ValueError for a
    word the tokenizer does not know."""
    init_words = tuple(init_words) or ("",) * n
    if len(init_words) != n:
        raise ValueError(f"config key 'lora.token_init' has {len(init_words)} entries for {n} new tokens: give one "
                         "per token ('' for a random start) or ()")
    table = np.asarray(table, np.float32)
    key = jax.random.fold_in(jax.random.key(seed), TOKEN_INIT_TAG)
    std = float(table.std())
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    rows = []
    for i, word in enumerate(init_words):
        if not word:
            rows.append(np.asarray(jax.random.normal(jax.random.fold_in(key, i), table.shape[1:], jnp.float32)) * std)
            continue
        ids = [int(t) for t in tokenizer([word])[0] if int(t) not in specials]
        if not ids or getattr(tokenizer, "unk_token_id", None) in ids:
            raise ValueError(f"config key 'lora.token_init': {word!r} is not made of known tokens of the base's "
                             "tokenizer")
        rows.append(table[ids].mean(axis=0))
    return np.stack(rows).astype(np.float32)


__all__ = ["TOKEN_INIT_TAG", "WordTokenizerWithTokens", "add_new_tokens", "check_new_tokens", "initial_rows"]
