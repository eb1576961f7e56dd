"""Textual-inversion files (jaxdiff.convert.textual_inversion): a new token added to a CLIP BPE tokenizer and its
trained row appended to a transformers CLIPTextModel's table in jaxdiff, written in diffusers' format, is read by
diffusers' own ``load_textual_inversion`` and gives the same token ids and prompt embeddings in PyTorch (float32,
max abs error <= 1e-4; every encoder parameter perturbed away from its init)."""
import numpy as np
import pytest

from jaxdiff.convert.textual_inversion import load_textual_inversion, save_textual_inversion

ATOL = 1e-4


def test_file_round_trip_and_bad_input(tmp_path):
    e = np.random.RandomState(0).randn(16).astype(np.float32)
    path = save_textual_inversion(str(tmp_path / "ti"), "<v1>", e)
    token, back = load_textual_inversion(path)
    assert token == "<v1>" and path.endswith("learned_embeds.safetensors")
    np.testing.assert_array_equal(back, e)
    with pytest.raises(ValueError, match=r"shape \(D,\) or \(n, D\)"):
        save_textual_inversion(str(tmp_path / "x.safetensors"), "<v1>", np.zeros((2, 2, 2)))
    from safetensors.numpy import save_file
    save_file({"a": e, "b": e}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="holds one tensor"):
        load_textual_inversion(str(tmp_path / "two.safetensors"))


@pytest.mark.parity
def test_diffusers_load_textual_inversion_reads_a_jaxdiff_token(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from diffusers.loaders import TextualInversionLoaderMixin
    from test_text_to_image import _perturb, _text_config, write_tokenizer_files

    from jaxdiff.convert.clip import load_clip_text_model
    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    from jaxdiff.train_lib.lora_tokens import add_new_tokens

    n = write_tokenizer_files(str(tmp_path / "tokenizer"), max_length=16)
    torch_encoder = _perturb(transformers.CLIPTextModel(_text_config(transformers, n, max_position_embeddings=16)),
                             torch, 1).eval()
    torch_encoder.save_pretrained(str(tmp_path / "text_encoder"))
    # jaxdiff: the token, a trained-looking row, the file
    tok, ids = add_new_tokens(load_clip_tokenizer(str(tmp_path / "tokenizer")), ("<v1>",))
    encoder = load_clip_text_model(str(tmp_path / "text_encoder"))
    row = np.random.RandomState(3).randn(1, encoder.config.hidden_size).astype(np.float32)
    assert encoder.add_token_embeddings(row) == ids == [n]
    path = save_textual_inversion(str(tmp_path / "ti"), "<v1>", row[0])

    # diffusers: its loader on the stock tokenizer and encoder
    class TextOnlyPipeline(TextualInversionLoaderMixin):
        def __init__(self, tokenizer, text_encoder):
            self.tokenizer, self.text_encoder, self.hf_device_map = tokenizer, text_encoder, None
            self.components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    pipe = TextOnlyPipeline(transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer")), torch_encoder)
    pipe.load_textual_inversion(path)
    prompts = ["a photo of <v1>", "<v1> on a table", "a photo of a cat"]
    want = pipe.tokenizer(prompts, padding="max_length", max_length=16, truncation=True).input_ids
    assert tok(prompts).tolist() == want and n in want[0]
    with torch.no_grad():
        ref = pipe.text_encoder(torch.tensor(want))[0].numpy()
    import jax.numpy as jnp
    got = np.asarray(encoder.encode(jnp.asarray(tok(prompts))))
    np.testing.assert_allclose(got, ref, atol=ATOL)
    assert np.abs(got[0] - got[2]).max() > 1e-3
