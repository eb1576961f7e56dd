"""The CLIP tokenizer and text encoder of text-to-image (issue 14): token ids equal transformers'
CLIPTokenizer on tricky strings, truncation and added tokens, and the NNX text encoder equal to transformers'
CLIPTextModel (every parameter perturbed; hidden states, pooled output, clip_skip) within 1e-5. The tiny
tokenizer files and configs come from tests/test_text_to_image.py."""
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from test_text_to_image import (CORPUS, EOS, TEXT_ATOL, TRICKY, _perturb, _text_config,  # noqa: E402
                                _tiny_encoder, write_tokenizer_files)

# ------------------------------------------------------------------------------------------------ tokenizer

@pytest.mark.parity
@pytest.mark.parametrize("max_length,pad", [(77, EOS), (12, EOS), (77, "!")])    # "!": SD 2.x's pad token
def test_tokenizer_ids_equal_transformers(tmp_path, max_length, pad):
    transformers = pytest.importorskip("transformers")
    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    write_tokenizer_files(str(tmp_path), corpus=CORPUS + ["wow!!! yes!"] * 20, max_length=max_length, pad_token=pad)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    tok = load_clip_tokenizer(str(tmp_path))
    assert tok.model_max_length == max_length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(TRICKY)
    want = ref(TRICKY, padding="max_length", max_length=max_length, truncation=True).input_ids
    for s, a, b in zip(TRICKY, ids.tolist(), want):
        assert a == b, f"{s!r}: {a} != {b}"


def test_truncation_warns_naming_the_prompt(tmp_path):
    from jaxdiff.convert.tokenizer import TruncationWarning, load_clip_tokenizer
    write_tokenizer_files(str(tmp_path), max_length=8)
    tok = load_clip_tokenizer(str(tmp_path))
    long = "an astronaut riding a horse on the moon and a cat"
    with pytest.warns(TruncationWarning, match=r"prompt 1 \('an astronaut.*truncated: '.*horse on the moon and a cat'"):
        ids = tok(["a cat", long])
    assert ids.shape == (2, 8) and ids[1, -1] == tok.eos_token_id and ids[0, 0] == tok.bos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["a cat"])                                        # short prompts: no warning


def test_tokenizer_without_files_names_them(tmp_path):
    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    write_tokenizer_files(str(tmp_path))
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*needs vocab.json and merges.txt .*tokenizer.json"):
        load_clip_tokenizer(str(tmp_path))


def test_added_tokens(tmp_path):
    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    n = write_tokenizer_files(str(tmp_path))
    tok = load_clip_tokenizer(str(tmp_path))
    (new,) = tok.add_tokens(["<cat-toy>"])
    assert new == n and tok.vocab_size == n + 1
    assert new in tok("a <cat-toy> on the mat")[0].tolist()


# --------------------------------------------------------------------------------------------- text encoder

def test_encoder_is_causal_and_pools_at_eos():
    m = _tiny_encoder()
    ids = np.array([[48, 3, 4, 49, 49, 49], [48, 3, 4, 49, 7, 8]])
    out = m(ids)
    h = np.asarray(out.last_hidden_state)
    assert h.shape == (2, 6, 16) and out.pooler_output.shape == (2, 16)
    np.testing.assert_allclose(h[0, :4], h[1, :4], atol=1e-6)       # later tokens do not change earlier states
    assert np.abs(h[0, 4:] - h[1, 4:]).max() > 1e-3
    np.testing.assert_allclose(np.asarray(out.pooler_output), h[:, 3], atol=0)   # the first eos
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=10"):
        m(np.zeros((1, 11), np.int32))


def test_resize_token_embeddings_keeps_rows():
    m = _tiny_encoder()
    old = np.asarray(m.embeddings.token_embedding.embedding[...])
    ids = m.add_token_embeddings(np.ones((2, 16)))
    assert ids == [50, 51] and m.config.vocab_size == 52
    table = np.asarray(m.embeddings.token_embedding.embedding[...])
    np.testing.assert_array_equal(table[:50], old)
    np.testing.assert_array_equal(table[50:], 1.0)
    m(np.array([[48, 50, 51, 49]]))                                  # the new ids are usable
    m.resize_token_embeddings(53)
    np.testing.assert_allclose(np.asarray(m.embeddings.token_embedding.embedding[...])[52], table.mean(0), atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("act,eos,skip", [("quick_gelu", None, 0), ("gelu", 2, 1)])
def test_text_encoder_equals_transformers(tmp_path, act, eos, skip):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxdiff.convert.clip import load_clip_text_model, save_clip_text_model
    cfg = _text_config(transformers, 120, hidden_act=act, **({} if eos is None else dict(eos_token_id=eos)))
    torch.manual_seed(0)
    ref = _perturb(transformers.CLIPTextModel(cfg).eval(), torch, 4)
    ref.save_pretrained(str(tmp_path / "te"))
    model = load_clip_text_model(str(tmp_path / "te"))
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 118, size=(3, 77))
    ids[:, 0], ids[0, 5:], ids[1, 20] = 118, 119, 119
    ids[2, -1] = 119
    mask = (np.arange(77)[None] <= np.array([[5], [20], [76]])).astype(np.int64)
    with torch.no_grad():
        r = ref(torch.from_numpy(ids), output_hidden_states=True)
        rm = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = model(ids, output_hidden_states=True)
    assert np.abs(np.asarray(out.last_hidden_state) - r.last_hidden_state.numpy()).max() <= TEXT_ATOL
    assert np.abs(np.asarray(out.pooler_output) - r.pooler_output.numpy()).max() <= TEXT_ATOL
    for a, b in zip(out.hidden_states, r.hidden_states, strict=True):
        assert np.abs(np.asarray(a) - b.numpy()).max() <= TEXT_ATOL
    assert np.abs(np.asarray(model(ids, mask).last_hidden_state) - rm.last_hidden_state.numpy()).max() <= TEXT_ATOL
    if skip:
        with torch.no_grad():
            want = ref.final_layer_norm(r.hidden_states[-(skip + 1)]).numpy()
        assert np.abs(np.asarray(model.encode(ids, clip_skip=skip)) - want).max() <= TEXT_ATOL
    save_clip_text_model(model, str(tmp_path / "back"))           # export: transformers reads it back
    back = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.from_numpy(ids)).last_hidden_state.numpy(),
                                      r.last_hidden_state.numpy())
