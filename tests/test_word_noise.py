"""Word noise on caption tokens (train_lib/word_noise.py): words dropped to <unk> and <unk> runs inserted,
the caption's own words kept in order, eos never cut, deterministic in the key."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.captions import caption_vocabulary
from jaxdiff.data.words import SPECIAL, WordTokenizer
from jaxdiff.train_lib.word_noise import add_word_noise

TOK = WordTokenizer(caption_vocabulary(), 16)
KW = dict(unk_id=TOK.unk_token_id, eos_id=TOK.eos_token_id, pad_id=TOK.pad_token_id, first_word_id=len(SPECIAL))
noise = jax.jit(add_word_noise, static_argnames=("drop", "insert", "unk_id", "eos_id", "pad_id", "first_word_id"))


def _words(row):
    """The ids between bos and eos, and whether the row is bos ... eos then pads only."""
    row = list(np.asarray(row))
    end = row.index(TOK.eos_token_id)
    well_formed = row[0] == TOK.bos_token_id and all(t == TOK.pad_token_id for t in row[end + 1:])
    return row[1:end], well_formed


def test_word_noise_keeps_the_caption_and_adds_unknown_words():
    texts = ["a thick slanted left seven", "digit 3, thin", "", "one two three four five six seven eight nine"]
    tokens = jnp.asarray(np.repeat(TOK(texts), 64, axis=0))                 # 4 captions x 64 draws
    out = np.asarray(noise(jax.random.key(0), tokens, drop=0.2, insert=0.3, **KW))
    np.testing.assert_array_equal(out, noise(jax.random.key(0), tokens, drop=0.2, insert=0.3, **KW))
    assert (out != np.asarray(noise(jax.random.key(1), tokens, drop=0.2, insert=0.3, **KW))).any()
    np.testing.assert_array_equal(noise(jax.random.key(0), tokens, drop=0.0, insert=0.0, **KW), tokens)
    unk, dropped, inserted, runs = TOK.unk_token_id, 0, 0, 0
    for row, src in zip(out, np.asarray(tokens)):
        words, ok = _words(row)
        original, _ = _words(src)
        assert ok
        kept = [w for w in words if w != unk]
        it = iter(original)                                          # known words: the original's, in order
        assert all(any(w == o for o in it) for w in kept)
        dropped += len(original) - len(kept)
        inserted += len(words) - len(original)
        runs += any(words[i:i + 2] == [unk, unk] for i in range(len(words)))
    n_words = sum(len(_words(r)[0]) for r in np.asarray(tokens))
    assert 0.1 < dropped / n_words < 0.3 and inserted > 0 and runs > 0
    empty, _ = _words(out[128])                                      # "" -> only insertions (before eos)
    assert set(empty) <= {unk}
