"""A word-level tokenizer: text -> token ids ``(B, model_max_length)`` with no files and no download, for small
text encoders trained from scratch on a closed caption grammar (the captioned digits).

Text is lower-cased and split into runs of letters and digits (punctuation dropped). Ids: ``0`` pad, ``1``
begin, ``2`` end, ``3`` unknown word, then the vocabulary. Each row is ``bos`` + words + ``eos``, padded; a
caption longer than the window is cut (the last kept position holds ``eos``) with a
:class:`~jaxdiff.data.words.TruncationWarning` naming it, as CLIP's tokenizer does.
"""
from __future__ import annotations

import re
import warnings
from typing import Sequence

import numpy as np

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+")


class TruncationWarning(UserWarning):
    """A text longer than the tokenizer's window was cut."""


def split_words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits of ``text``."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """``tok(texts) -> (B, model_max_length)`` int32 ids over ``vocabulary`` (see the module docstring).

    Attributes: ``model_max_length``, ``vocab_size`` (specials included), ``pad_token_id`` (0),
    ``bos_token_id`` (1), ``eos_token_id`` (2), ``unk_token_id`` (3), ``words`` (the vocabulary, in id order).
    """

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, vocabulary: Sequence[str], model_max_length: int = 16):
        words = list(dict.fromkeys(vocabulary))
        bad = [w for w in words if split_words(w) != [w]]
        if bad:
            raise ValueError(f"vocabulary entries must be single lower-case words, got {bad[:5]}")
        if isinstance(model_max_length, bool) or int(model_max_length) != model_max_length or model_max_length < 3:
            raise ValueError(f"model_max_length must be an integer >= 3 (bos, a word, eos), got {model_max_length!r}")
        self.words = words
        self.model_max_length = int(model_max_length)
        self._ids = {w: i + len(SPECIAL) for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL) + len(self.words)

    def tokenize(self, text: str) -> list[int]:
        """Word ids of ``text`` (no bos / eos)."""
        return [self._ids.get(w, self.unk_token_id) for w in split_words(text)]

    def decode(self, ids) -> str:
        """Words of ``ids`` (special tokens dropped)."""
        table = list(SPECIAL) + self.words
        return " ".join(table[int(i)] for i in ids if int(i) >= len(SPECIAL))

    def __call__(self, texts: str | Sequence[str], *, max_length: int | None = None) -> np.ndarray:
        """``(B, max_length)`` int32 ids (default ``model_max_length``)."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a string or a list of strings, got {texts!r}")
        n = int(max_length or self.model_max_length)
        out = np.full((len(texts), n), self.pad_token_id, np.int32)
        for i, text in enumerate(texts):
            ids = [self.bos_token_id] + self.tokenize(text) + [self.eos_token_id]
            if len(ids) > n:
                warnings.warn(TruncationWarning(
                    f"text {i} ({text[:60]!r}) has {len(ids)} tokens, more than the text encoder's window of {n}; "
                    f"this part was truncated: {self.decode(ids[n - 1:-1])!r}"), stacklevel=2)
                ids = ids[:n - 1] + [self.eos_token_id]
            out[i, :len(ids)] = ids
        return out


def grammar_vocabulary(templates: Sequence[str], fields: dict[str, Sequence]) -> list[str]:
    """The words of every caption ``templates`` can make: the templates' own words (``{field}`` slots removed)
    and the words of every value of each field (``fields``: ``{name: values}``), sorted."""
    words = set()
    for t in templates:
        words.update(split_words(re.sub(r"\{[^}]*\}", " ", t)))
    for values in fields.values():
        for v in values:
            words.update(split_words(str(v)))
    return sorted(words)


__all__ = ["SPECIAL", "TruncationWarning", "WordTokenizer", "grammar_vocabulary", "split_words"]
