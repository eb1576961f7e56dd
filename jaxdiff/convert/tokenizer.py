"""CLIP's byte-level BPE tokenizer from a pipeline's ``tokenizer/`` files, with the ``tokenizers`` package (no
torch, no transformers, nothing downloaded).

The tokenizer is built from ``vocab.json`` + ``merges.txt`` with the normalisation and pre-tokenisation of
transformers' ``CLIPTokenizer`` (NFC, whitespace runs to one space, lower case; CLIP's split pattern, then
byte-level; ``</w>`` ends each word; ``<|startoftext|> ... <|endoftext|>`` around each text). A folder holding
only a ``tokenizer.json`` (what transformers 5 saves) is read as it is. Special tokens and
``model_max_length`` come from ``tokenizer_config.json`` / ``special_tokens_map.json``; added tokens (textual
inversion) from ``added_tokens.json`` or the config's ``added_tokens_decoder``.

:meth:`CLIPTokenizer.__call__` pads and truncates to ``model_max_length`` as diffusers' Stable Diffusion
pipelines do, warning (``TruncationWarning``) with the prompt and the part that was cut.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
CONFIG_FILE, SPECIAL_FILE, ADDED_FILE = "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"
DEFAULT_MAX_LENGTH = 77
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_DEFAULTS = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|endoftext|>")


class TruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's window and was cut."""


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the CLIP tokenizer needs the `tokenizers` package: pip install 'jaxdiff[text]' "
                          "(or pip install tokenizers)") from e
    return tokenizers


def _content(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_clip_bpe(vocab: dict, merges: list, *, bos_token: str, eos_token: str, unk_token: str,
                   pad_token: str | None = None):
    """A ``tokenizers.Tokenizer`` with CLIP's BPE pipeline over ``vocab`` ({token: id}) and ``merges``
    (``"a b"`` strings or pairs); ``bos ... eos`` added around each text. The special tokens (the pad token
    included: SD 2.x pads with ``"!"``) are matched in the raw text before BPE, as transformers does."""
    tk = _import_tokenizers()
    from tokenizers import Regex, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    pairs = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
    tok = tk.Tokenizer(BPE(vocab=dict(vocab), merges=pairs, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t in dict.fromkeys([bos_token, eos_token, unk_token, pad_token or eos_token])])
    tok.post_processor = processors.RobertaProcessing((eos_token, tok.token_to_id(eos_token)),
                                                      (bos_token, tok.token_to_id(bos_token)),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


class CLIPTokenizer:
    """Text -> token ids ``(B, model_max_length)`` int32, as diffusers tokenizes prompts.

    Attributes: ``model_max_length``; ``bos_token_id``, ``eos_token_id``, ``pad_token_id``; ``backend`` (the
    ``tokenizers.Tokenizer``)."""

    def __init__(self, backend, *, model_max_length: int = DEFAULT_MAX_LENGTH, bos_token: str = _DEFAULTS["bos_token"],
                 eos_token: str = _DEFAULTS["eos_token"], pad_token: str = _DEFAULTS["pad_token"],
                 source: str = ""):
        self.backend, self.source = backend, source
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        ids = {}
        for name, t in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            ids[name] = backend.token_to_id(t)
            if ids[name] is None:
                raise ValueError(f"tokenizer {source!r}: the {name} token {t!r} is not in the vocabulary")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos"], ids["eos"], ids["pad"]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add new (non-special) tokens, e.g. textual-inversion placeholders; returns their ids (the text
        encoder's token table must grow to match: ``CLIPTextModel.add_token_embeddings``)."""
        tk = _import_tokenizers()
        self.backend.add_tokens([tk.AddedToken(t, normalized=False) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    def tokenize(self, text: str) -> list[int]:
        """All ids of ``text`` with ``bos``/``eos``, untruncated and unpadded."""
        return list(self.backend.encode(text).ids)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True).replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str], *, max_length: int | None = None) -> np.ndarray:
        """``(B, max_length)`` int32 ids (default ``model_max_length``): ``bos`` + tokens + ``eos``, cut to
        ``max_length`` (the last kept position holds ``eos``) and padded with ``pad_token``. A prompt that is
        cut raises a :class:`TruncationWarning` naming the prompt and the part removed."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r}")
        n = int(max_length or self.model_max_length)
        if n < 2:
            raise ValueError(f"max_length must be at least 2 (bos and eos), got {n}")
        out = np.full((len(prompts), n), self.pad_token_id, np.int32)
        for i, enc in enumerate(self.backend.encode_batch(list(prompts))):
            ids = list(enc.ids)
            if len(ids) > n:
                removed = self.decode(ids[n - 1:-1])
                warnings.warn(TruncationWarning(
                    f"prompt {i} ({prompts[i][:60]!r}{'...' if len(prompts[i]) > 60 else ''}) is longer than the "
                    f"text encoder's {n} tokens; this part was truncated: {removed!r}"), stacklevel=2)
                ids = ids[:n - 1] + [self.eos_token_id]
            out[i, :len(ids)] = ids
        return out


def load_clip_tokenizer(folder: str, *, what: str | None = None) -> CLIPTokenizer:
    """:class:`CLIPTokenizer` from a tokenizer folder (a pipeline's ``tokenizer/``): ``vocab.json`` +
    ``merges.txt`` (or a ``tokenizer.json``), ``tokenizer_config.json`` / ``special_tokens_map.json`` for the
    special tokens and ``model_max_length`` (77 when absent or unset). FileNotFoundError names the part and
    the files it lacks."""
    what = what or f"tokenizer {folder!r}"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: no such folder")
    tk = _import_tokenizers()
    cfg = _read_json(os.path.join(folder, CONFIG_FILE))
    special = {**_DEFAULTS, **{k: _content(v) for k, v in _read_json(os.path.join(folder, SPECIAL_FILE)).items()
                               if k in _DEFAULTS}}
    special.update({k: _content(cfg[k]) for k in _DEFAULTS if cfg.get(k) is not None})
    vocab_path, merges_path = os.path.join(folder, VOCAB_FILE), os.path.join(folder, MERGES_FILE)
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = [ln for ln in f.read().split("\n") if ln.strip() and not ln.startswith("#version")]
        backend = build_clip_bpe(vocab, merges, bos_token=special["bos_token"], eos_token=special["eos_token"],
                                 unk_token=special["unk_token"], pad_token=special["pad_token"])
        added = _read_json(os.path.join(folder, ADDED_FILE))
        decoder = cfg.get("added_tokens_decoder") or {}
        extra = {tok: int(i) for tok, i in added.items()}
        extra.update({_content(v): int(k) for k, v in decoder.items()})
        for tok, idx in sorted(extra.items(), key=lambda kv: kv[1]):
            if backend.token_to_id(tok) is None:
                backend.add_tokens([tk.AddedToken(tok, normalized=False)])
                if backend.token_to_id(tok) != idx:
                    raise ValueError(f"{what}: added token {tok!r} should have id {idx}, "
                                     f"got {backend.token_to_id(tok)}")
    elif os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
        backend = tk.Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
        backend.no_truncation()
        backend.no_padding()
    else:
        present = sorted(os.listdir(folder))
        raise FileNotFoundError(f"{what}: needs {VOCAB_FILE} and {MERGES_FILE} (or {TOKENIZER_FILE}); the folder "
                                f"holds {present}")
    max_len = cfg.get("model_max_length")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 2 <= max_len <= 100_000:
        max_len = DEFAULT_MAX_LENGTH
    return CLIPTokenizer(backend, model_max_length=max_len, bos_token=special["bos_token"],
                         eos_token=special["eos_token"], pad_token=special["pad_token"], source=folder)


__all__ = ["CLIPTokenizer", "TruncationWarning", "build_clip_bpe", "load_clip_tokenizer"]
