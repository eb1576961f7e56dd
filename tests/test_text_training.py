"""Text-conditioned training (issue 14): the captioned digits, the word tokenizer, caption dropout, a tiny text
model trained through train_lib (jointly trained and frozen encoders), resume equality, sampling a run with
prompts, and the errors that name the part."""
import json
import os
import re
import warnings

import jax
import numpy as np
import pytest

from jaxdiff.data.captioned_digits import CAPTION_KEY, CAPTIONS_PER_IMAGE, captioned_digits_arrays, held_out_prompts
from jaxdiff.data.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, caption, caption_vocabulary
from jaxdiff.data.pipeline import ImageIterator
from jaxdiff.data.words import TruncationWarning, WordTokenizer, split_words
from jaxdiff.train_lib import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- data, tokens
def test_word_tokenizer_pads_marks_unknown_words_and_warns_on_truncation():
    tok = WordTokenizer(caption_vocabulary(), 8)
    ids = tok(["A thick SEVEN!", ""])
    assert ids.shape == (2, 8) and ids.dtype == np.int32
    assert tok.decode(ids[0]) == "a thick seven"
    assert list(ids[0, :5]) == [tok.bos_token_id, *tok.tokenize("a thick seven"), tok.eos_token_id]
    assert list(ids[1, :3]) == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert tok.tokenize("an image of a two")[:3] == [tok.unk_token_id] * 3     # held-out words are unknown
    with pytest.warns(TruncationWarning, match="window of 8.*truncated: 'seven eight'"):
        cut = tok(["one two three four five six seven eight"])
    assert cut[0, -1] == tok.eos_token_id and tok.decode(cut[0]) == "one two three four five six"
    with pytest.raises(ValueError, match="single lower-case words"):
        WordTokenizer(["Two words"])


@pytest.fixture(scope="module")
def records():
    a = captioned_digits_arrays("train", 16)
    return a, [{"image": a["image"][i], "label": int(a["label"][i]),
                CAPTION_KEY: [c.encode() for c in a[CAPTION_KEY][i]]} for i in range(48)]


def test_captioned_digits_hold_every_training_phrasing_and_no_held_out_one(records):
    a, _ = records
    n = len(a["label"])
    assert a["image"].shape == (n, 16, 16, 1) and a[CAPTION_KEY].shape == (n, CAPTIONS_PER_IMAGE)
    for i in (0, 7, n - 1):
        assert list(a[CAPTION_KEY][i, :len(TRAIN_TEMPLATES)]) == [
            caption(a["label"][i], a["thickness"][i], a["slant"][i], a["width"][i], t) for t in TRAIN_TEMPLATES]
    training = a[CAPTION_KEY].ravel().tolist()
    assert len(set(training)) > 20 * n                              # the grammar: many phrasings per image
    # what is held out is the wording: no training caption is a held-out prompt, and the held-out phrasings' own
    # words are in no training caption and unknown to the tokenizer
    every_held_out = [caption(c, t, s, w, h) for h in HELD_OUT_TEMPLATES for c in range(10) for t in range(3)
                      for s in range(3) for w in range(2)]
    assert not set(every_held_out) & set(training)
    held_out_words = {w for h in HELD_OUT_TEMPLATES for w in split_words(re.sub(r"\{[^}]*\}", " ", h))}
    held_out_words -= {w for t in TRAIN_TEMPLATES for w in split_words(t)}
    assert held_out_words == {"an", "image", "of", "written", "in", "ink"}
    assert not held_out_words & set(caption_vocabulary())
    assert not held_out_words & {w for c in set(training) for w in split_words(c)}
    tok = WordTokenizer(caption_vocabulary(), 16)
    assert tok.tokenize(" ".join(sorted(held_out_words))) == [tok.unk_token_id] * 6
    for k, bins in (("thickness", 3), ("slant", 3), ("width", 2)):     # every bin occurs in every class
        assert all(len(np.unique(a[k][a["label"] == c])) == bins for c in range(10))
    held = held_out_prompts(a["label"][:5], a["thickness"][:5], a["slant"][:5], template=1)
    assert held[0] == caption(a["label"][0], a["thickness"][0], a["slant"][0], 0, HELD_OUT_TEMPLATES[1])
    assert not set(held) & set(a[CAPTION_KEY].ravel().tolist())


def test_pipeline_draws_one_caption_per_example_and_epoch_and_resumes(records):
    a, recs = records
    tok = WordTokenizer(caption_vocabulary(), 16)
    kw = dict(global_batch_size=8, image_size=16, seed=3, process_index=0, process_count=1, crop="resize",
              random_flip=False, caption_key=CAPTION_KEY, tokenize=tok, num_threads=0, prefetch=0)
    it = ImageIterator(recs, **kw)
    batches = [next(it) for _ in range(12)]                     # 2 epochs of 6 batches
    assert batches[0]["tokens"].shape == (8, 16) and batches[0]["tokens"].dtype == np.int32
    texts = {tok.decode(r) for b in batches for r in b["tokens"]}
    allowed = {tok.decode(tok([c])[0]) for i in range(48) for c in a[CAPTION_KEY][i]}
    assert texts <= allowed and len(texts) > 48                 # several phrasings of the same images
    again = ImageIterator(recs, **kw)
    again.set_state({**it.get_state(), "next_batch": 7})
    np.testing.assert_array_equal(next(again)["tokens"], batches[7]["tokens"])
    with pytest.raises(ValueError, match="caption feature 'captions' not in the examples.*captioned_digits"):
        ImageIterator([{"image": r["image"], "label": 0} for r in recs], **kw)
    with pytest.raises(ValueError, match="need both caption_key"):
        ImageIterator(recs, **{**kw, "tokenize": None})


def test_caption_dropout_replaces_whole_rows_by_the_empty_caption():
    from jaxdiff.train_lib.step import drop_labels
    tokens = jax.numpy.arange(64 * 5, dtype=jax.numpy.int32).reshape(64, 5) + 10
    null = jax.numpy.asarray([1, 2, 0, 0, 0], jax.numpy.int32)
    out = np.asarray(drop_labels(jax.random.key(0), tokens, 0.5, null))
    dropped = (out == np.asarray(null)).all(1)
    kept = (out == np.asarray(tokens)).all(1)
    assert (dropped | kept).all() and 10 < dropped.sum() < 54
    labels = jax.numpy.arange(64, dtype=jax.numpy.int32) % 10                  # 1-D labels: as before
    np.testing.assert_array_equal(np.asarray(drop_labels(jax.random.key(0), labels, 0.5, 10)) == 10, dropped)


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def captioned_dir(tmp_path_factory):
    from jaxdiff.data.captioned_digits import build_captioned_digits
    d = tmp_path_factory.mktemp("tfds")
    build_captioned_digits(str(d), 16)
    return str(d)


def tiny_text_config(data_dir, **over):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "text_digits.py"))
    values = {"data.data_dir": data_dir, "data.image_size": 8, "model.block_out_channels": (8, 16),
              "model.down_attention": (None, "cross"), "model.down_heads": 1, "model.norm_num_groups": 4,
              "text.width": 16, "text.layers": 1, "text.heads": 2, "text.mlp_dim": 32, "text.max_length": 12,
              "train.steps": 4, "train.batch_size": 8, "train.log_every": 2, "checkpoint.every": 2,
              "checkpoint.keep": 3, "checkpoint.async_save": False, "optim.warmup_steps": 1, "sample.steps": 2,
              "sample.num": 4, "sample.guidance_scale": 2.0, "text.sample_prompts": ("a thick seven", "a thin one")}
    values.update(over)
    config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in values.items()])
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, captioned_dir):
    from jaxdiff.train_lib.loop import train
    workdir = str(tmp_path_factory.mktemp("text_run"))
    out = train(tiny_text_config(captioned_dir, **{"train.sample_every": 4}), workdir)
    return workdir, out


@pytest.mark.slow      # a 4-step run + its resumption through the loop: ~2-10 min on the shared 2-core machine
def test_text_model_trains_jointly_and_resumes_exactly(text_run, captioned_dir, tmp_path):
    from jaxdiff.train_lib.loop import train
    workdir, out = text_run
    assert out["step"] == 4 and np.isfinite(out["final_loss"])
    assert set(out["params"]) == {"unet", "text_encoder"}          # the encoder trains with the UNet
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
    # resume: a copy of the run without its step-4 checkpoint continues from step 2 to the same parameters
    import shutil
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    again = train(tiny_text_config(captioned_dir, **{"train.sample_every": 4}), resumed)
    assert again["step"] == 4
    jax.tree.map(np.testing.assert_array_equal, again["params"], out["params"])


@pytest.mark.slow      # uses the run above
def test_sampling_a_text_run_with_prompts(text_run, tmp_path, capsys):
    from jaxdiff.cli.sample import main
    from jaxdiff.train_lib.experiment import load_sampling_model
    workdir, _ = text_run
    model, _ = load_sampling_model(workdir)
    assert model.context_shape == (12, 16) and model.encode_prompts is not None
    a, b = model.encode_prompts(["a thick seven", "a thin one"])
    assert a.shape == (12, 16) and np.abs(a - b).max() > 1e-3       # different prompts, different contexts
    out = str(tmp_path / "s")
    assert main(["--workdir", workdir, "--prompt", "a thick seven", "--prompt", "a thin one", "--num", "4",
                 "--steps", "2", "--guidance_scale", "2", "--negative_prompt", "a thin seven", "--out", out]) == 0
    record = json.load(open(os.path.join(out, "sample.json")))
    assert record["prompt"] == ["a thick seven", "a thin one"] and record["guidance_scale"] == 2
    images = np.load(os.path.join(out, "samples.npz"))["images"]
    assert images.shape == (4, 8, 8, 1) and np.isfinite(images).all()
    capsys.readouterr()
    assert main(["--workdir", workdir, "--num", "2", "--steps", "2"]) == 2
    assert "is a text-conditioned run: give --prompt" in capsys.readouterr().err


@pytest.mark.slow      # 22 s on 2 cores (builds a CLIP folder and a train state)
def test_frozen_encoder_from_a_clip_folder_stays_out_of_the_train_state(tmp_path):
    from flax import nnx

    from jaxdiff.convert.clip import save_clip_text_model
    from jaxdiff.nn.clip_text import CLIPTextConfig, CLIPTextModel
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                                       num_heads=2, max_position_embeddings=12, eos_token_id=2),
                        rngs=nnx.Rngs(5))
    folder = str(tmp_path / "text_encoder")
    save_clip_text_model(enc, folder)
    c = tiny_text_config(str(tmp_path), **{"text.encoder": folder})
    exp = build_experiment(c, make_mesh())
    state = exp.init_state()
    assert set(state.params) == {"unet"}
    tokens = exp.tokenize(["a thick seven", "a thin one"] * 4)
    batch = {"image": np.zeros((8, 8, 8, 1), np.float32), "label": np.zeros(8, np.int32), "tokens": tokens}
    new, metrics = jax.jit(exp.make_train_step())(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    ref = np.asarray(enc.encode(jax.numpy.asarray(tokens[:2])))
    np.testing.assert_allclose(exp.encode_prompts(new.params, ["a thick seven", "a thin one"]), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("over, match", [
    ({"model.cross_attention_dim": 32}, r"text encoder's width \(16.*'model.cross_attention_dim' \(32\)"),
    ({"model.num_classes": 10}, "captions, not classes: set model.num_classes=None"),
    ({"model.down_attention": (None, "self"), "model.mid_attention": "self"}, "needs cross-attention"),
    ({"text.tokenizer": "no/such/folder"}, "'text.tokenizer' must be one of .*digits_words"),
    ({"text.encoder": "no/such/folder"}, "'text.encoder' must be 'train' or a transformers CLIPTextModel"),
    ({"text.caption_dropout": 0.0}, "guidance_scale' needs a model trained with caption dropout"),
])
def test_text_config_errors_name_the_part(over, match, tmp_path):
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    c = tiny_text_config(str(tmp_path), **over)
    with pytest.raises(ValueError, match=match):
        build_experiment(c, make_mesh())


def test_captions_without_a_text_encoder_and_a_text_run_without_captions_fail(tmp_path):
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    with pytest.raises(ValueError, match="'data.caption_key' is set but 'text.encoder' is None"):
        tiny_text_config(str(tmp_path), **{"text.encoder": None})
    c = tiny_text_config(str(tmp_path), **{"data.caption_key": None})
    with pytest.raises(ValueError, match="needs captions.*captioned_digits"):
        build_experiment(c, make_mesh())


def test_a_clip_bpe_tokenizer_folder_serves_a_trained_encoder_with_its_window(tmp_path):
    pytest.importorskip("tokenizers")
    from test_text_to_image import write_tokenizer_files
    from jaxdiff.train_lib.text_diffusion import make_tokenizer
    n = write_tokenizer_files(str(tmp_path), max_length=77)
    c = tiny_text_config(str(tmp_path), **{"text.tokenizer": str(tmp_path), "text.max_length": 8})
    tok = make_tokenizer(c.text)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok(["a thick seven", "a thick seven " * 6])
    assert ids.shape == (2, 8) and tok.vocab_size == n and ids[1, -1] == tok.eos_token_id
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    with pytest.raises(ValueError, match="'text.word_dropout' / 'text.unknown_words' need a word tokenizer"):
        build_experiment(c, make_mesh())               # word noise is drawn over the word tokenizer's ids


@pytest.mark.parametrize("key, value", [("text.word_dropout", 1.0), ("text.unknown_words", -0.1)])
def test_word_noise_rates_out_of_range_fail(key, value, tmp_path):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny_text_config(str(tmp_path), **{key: value})
