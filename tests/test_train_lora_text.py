"""task="lora" on a text-conditioned base (train_lib/lora_text.py): new tokens in the word and CLIP tokenizers and
as trained rows of the token table, DreamBooth prior preservation (class images drawn once, kept in the workdir,
reused on resume; the weighted loss), the base bitwise frozen (old token rows included), exact resumption, sampling
the run with its new token, and the errors that name the problem."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data.captions import caption_vocabulary
from jaxdiff.data.words import WordTokenizer
from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib.lora_data import PriorBatches, class_images
from jaxdiff.train_lib.lora_tokens import add_new_tokens, initial_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ tokens
def test_word_tokenizer_learns_whole_new_tokens_and_keeps_old_ids():
    base = WordTokenizer(caption_vocabulary(), 12)
    tok, ids = add_new_tokens(base, ("<v1>", "sks"))
    assert ids == [base.vocab_size, base.vocab_size + 1] and tok.vocab_size == base.vocab_size + 2
    row = tok(["a <v1> seven", "a thick seven"])
    assert list(row[0, :5]) == [tok.bos_token_id, base.tokenize("a")[0], ids[0], base.tokenize("seven")[0],
                                tok.eos_token_id]
    np.testing.assert_array_equal(row[1], base(["a thick seven"])[0])      # texts without new tokens: as before
    assert tok.tokenize("sks asks") == [ids[1], tok.unk_token_id]         # whole tokens only
    assert tok.decode(row[0]) == "a <v1> seven"
    for bad, match in [(("seven",), "already in the tokenizer's vocabulary"), (("<pad>",), "already in"),
                       (("<v1>", "<v1>"), "repeats"), (("a b",), "without whitespace")]:
        with pytest.raises(ValueError, match=match):
            add_new_tokens(base, bad)


def test_clip_tokenizer_adds_tokens_after_its_vocabulary(tmp_path):
    pytest.importorskip("tokenizers")
    from test_text_to_image import write_tokenizer_files

    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    n = write_tokenizer_files(str(tmp_path), max_length=16)
    tok = load_clip_tokenizer(str(tmp_path))
    before = tok(["a photo of a cat"])
    tok, ids = add_new_tokens(tok, ("<v1>",))
    assert ids == [n] and tok.vocab_size == n + 1
    assert ids[0] in tok(["a photo of <v1>"])[0]
    np.testing.assert_array_equal(tok(["a photo of a cat"]), before)
    with pytest.raises(ValueError, match="'<v1>' is already in the tokenizer's vocabulary"):
        add_new_tokens(tok, ("<v1>",))


def test_new_rows_start_from_a_word_or_at_random():
    tok = WordTokenizer(caption_vocabulary(), 12)
    table = np.random.RandomState(0).randn(tok.vocab_size, 8).astype(np.float32)
    rows = initial_rows(table, tok, ("seven", ""), 2, seed=0)
    np.testing.assert_array_equal(rows[0], table[tok.tokenize("seven")[0]])
    assert rows.shape == (2, 8) and 0.3 < rows[1].std() < 3 and not np.allclose(rows[1], rows[0])
    np.testing.assert_array_equal(initial_rows(table, tok, (), 2, seed=0)[1], rows[1])   # () = all random
    with pytest.raises(ValueError, match="'zebra' is not made of known tokens"):
        initial_rows(table, tok, ("zebra",), 1, seed=0)


# ------------------------------------------------------------------------------------- prior preservation
def test_prior_weighted_loss_is_instance_mean_plus_weight_times_class_mean():
    from jaxdiff.train_lib.lora_text import prior_weighted
    x0 = np.random.RandomState(0).randn(6, 4, 4, 1).astype(np.float32)
    per_example = lambda apply_fn, x, key: jnp.mean((apply_fn(x, None) - x) ** 2, axis=(1, 2, 3))  # noqa: E731
    apply_fn = lambda x, t: 0.3 * x          # noqa: E731
    per = np.asarray(per_example(apply_fn, x0, None))
    weighted = np.asarray(prior_weighted(per_example, 0.25)(apply_fn, x0, None))
    np.testing.assert_allclose(weighted.mean(), per[:3].mean() + 0.25 * per[3:].mean(), rtol=1e-6)
    assert not np.isclose(per.mean(), weighted.mean())


def _image_iterator(n=10, batch=4):
    from jaxdiff.data.pipeline import ImageIterator
    r = np.random.RandomState(0)
    source = [{"image": r.randint(0, 255, (8, 8, 1), np.uint8)} for _ in range(n)]
    return ImageIterator(source, global_batch_size=batch, image_size=8, seed=3, label_key=None, crop="resize",
                         random_flip=False, num_threads=0, prefetch=0)


def test_class_rows_cover_the_class_images_each_epoch_and_resume_exactly():
    images = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((6, 8, 8, 1), np.float32)
    it = PriorBatches(_image_iterator(), images, seed=4)
    batches = [next(it) for _ in range(6)]                      # 24 class rows = 4 epochs of the 6 images
    drawn = np.concatenate([b["class_image"][:, 0, 0, 0] for b in batches])
    for e in range(4):
        assert sorted(drawn[6 * e:6 * e + 6]) == list(range(6))
    assert not np.array_equal(drawn[:6], drawn[6:12])           # a new order each epoch
    again = PriorBatches(_image_iterator(), images, seed=4)
    again.set_state({**it.get_state(), "next_batch": 3})
    b3 = next(again)
    np.testing.assert_array_equal(b3["class_image"], batches[3]["class_image"])
    np.testing.assert_array_equal(b3["image"], batches[3]["image"])


def test_instance_filter_keeps_the_first_matching_examples():
    from jaxdiff.train_lib.lora_data import instance_indices
    source = [{"label": i % 3, "thickness": i % 2} for i in range(12)]
    assert instance_indices(source, ("label=1", "thickness=0"), 0) == [4, 10]
    assert instance_indices(source, ("label=1",), 2) == [1, 4] and len(instance_indices(source, (), 0)) == 12
    with pytest.raises(ValueError, match=r"features \['slant'\] the examples lack"):
        instance_indices(source, ("slant=1",), 0)
    with pytest.raises(ValueError, match="no example matches"):
        instance_indices(source, ("label=5",), 0)


def test_class_images_are_drawn_once_and_reused(tmp_path):
    calls = []

    def draw():
        calls.append(1)
        return np.linspace(-2, 2, 3 * 8 * 8).reshape(3, 8, 8, 1)
    meta = {"class_prompt": "a seven", "num_class_images": 3, "seed": 0, "base": "b"}
    first = class_images(str(tmp_path), meta, draw)
    assert first.min() == -1 and first.max() == 1 and first.dtype == np.float32   # clipped to the image range
    again = class_images(str(tmp_path), meta, draw)
    np.testing.assert_array_equal(again, first)
    assert len(calls) == 1 and os.path.isfile(tmp_path / "class_images" / "grid.png")
    with pytest.raises(ValueError, match=r"class_prompt: \('a seven', 'a two'\).*new workdir"):
        class_images(str(tmp_path), {**meta, "class_prompt": "a two"}, draw)


# ----------------------------------------------------------------------------------------- bases, errors
def _tiny_text_base_config(data_dir):
    from test_text_training import tiny_text_config
    return tiny_text_config(data_dir, **{"train.sample_every": 0})


def _save_untrained(config, workdir):
    """A base run's step-0 checkpoint (its initial parameters), written without training."""
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.checkpoint import Checkpointer
    from jaxdiff.train_lib.experiment import build_experiment
    exp = build_experiment(config, make_mesh())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    state = exp.init_state()
    ckpt.save(0, state, {"next_batch": 0}, config_lib.to_dict(config))
    ckpt.close()
    return workdir, jax.device_get(state.ema_params)


@pytest.fixture(scope="module")
def captioned_dir(tmp_path_factory):
    from jaxdiff.data.captioned_digits import build_captioned_digits
    d = str(tmp_path_factory.mktemp("tfds"))
    build_captioned_digits(d, 16)
    return d


@pytest.fixture(scope="module")
def text_base(tmp_path_factory):
    """An untrained tiny text run (nothing here reads its data)."""
    return _save_untrained(_tiny_text_base_config(str(tmp_path_factory.mktemp("no_data"))),
                           str(tmp_path_factory.mktemp("text_base")))[0]


@pytest.fixture(scope="module")
def text_base_params(text_base):
    from jaxdiff.train_lib.experiment import restore_run
    return jax.device_get(restore_run(text_base)[1].ema_params)


def lora_config(base, data_dir, **over):
    c = config_lib.default_config()
    values = {"task": "lora", "lora.base": base, "lora.rank": 2, "lora.targets": ("cross_attention",),
              "lora.instance_prompt": "a <v1> seven", "lora.new_tokens": ("<v1>",), "lora.token_init": ("seven",),
              "lora.instance_filter": ("label=7",), "lora.num_instance_images": 4, "lora.class_prompt": "a seven",
              "lora.num_class_images": 6, "data.name": "captioned_digits/16", "data.data_dir": data_dir,
              "data.image_size": 8, "process.name": "vp_cosine", "loss.target": "v", "train.steps": 4,
              "train.batch_size": 8, "train.log_every": 1, "train.sample_every": 0, "checkpoint.every": 2,
              "checkpoint.keep": 3, "checkpoint.async_save": False, "sample.steps": 2, "optim.lr": 1e-2,
              "optim.warmup_steps": 0, "optim.schedule": "constant", "train.ema_decay": 0.5}
    values.update(over)
    config_lib.apply_overrides(c, [f"{k}={v!r}" for k, v in values.items()])
    return c


def test_text_lora_experiment_trains_adapters_and_new_rows_only(text_base, text_base_params):
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    from jaxdiff.train_lib.lora_text import TABLE, _table
    exp = build_experiment(lora_config(text_base, "unused"), make_mesh())
    base_table = np.asarray(_table(text_base_params))
    assert set(exp.init_params) == {"lora", "new_tokens"} and exp.new_token_ids == (base_table.shape[0],)
    # the new row starts at "seven"'s embedding; the frozen base holds the old rows only, bitwise
    seven = exp.tokenizer.tokenize("seven")[0]
    np.testing.assert_array_equal(exp.init_params["new_tokens"][0], base_table[seven])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exp.base_params), text_base_params)
    assert exp.memory["new_token_bytes"] == base_table.shape[1] * 4 and TABLE[0] == "text_encoder"
    assert exp.memory["optimizer_state_bytes"] < 3 * (exp.memory["adapter_bytes"] + exp.memory["new_token_bytes"])
    # at the start (adapters zero) the LoRA model encodes a known prompt exactly as the base
    assert list(exp.instance_tokens[:4]) == [1, *exp.tokenizer.tokenize("a <v1> seven")]


@pytest.mark.parametrize("over, match", [
    ({"lora.instance_prompt": "a seven"}, r"does not contain the new token\(s\) \['<v1>'\]"),
    ({"lora.instance_prompt": None}, "needs config key 'lora.instance_prompt'"),
    ({"lora.class_prompt": "a <v1>"}, "'lora.class_prompt' = 'a <v1>' contains a new token"),
    ({"data.image_size": 16}, "'data.image_size' is 16 but the base .* has 8"),
])
def test_text_lora_errors_come_before_the_base_is_read(text_base, over, match):
    from jaxdiff.train_lib.experiment import build_experiment
    with pytest.raises(ValueError, match=match):
        build_experiment(lora_config(text_base, "unused", **over), None)


def test_prior_and_token_config_errors_come_first(tmp_path):
    for over, match in [({"lora.num_class_images": 0}, "needs both config keys 'lora.class_prompt' and"),
                        ({"lora.class_prompt": None}, "needs both"),
                        ({"lora.token_init": ("seven", "one")}, "has 2 entries for 1 new tokens"),
                        ({"lora.prior_loss_weight": -1.0}, "'lora.prior_loss_weight' must be >= 0"),
                        ({"lora.instance_filter": ("label:7",)}, "'label:7' must read 'feature=integer'")]:
        with pytest.raises(ValueError, match=match):
            config_lib.validate(lora_config(str(tmp_path), "unused", **over))
    pipe = tmp_path / "pipe"        # a text-to-image folder whose parts are missing: named before any loading
    (pipe / "text_encoder").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({p: ["x", "y"] for p in ("text_encoder", "tokenizer", "unet",
                                                                                "vae", "scheduler")}))
    from jaxdiff.train_lib.experiment import build_experiment
    with pytest.raises(ValueError, match="the 'tokenizer' part is listed in model_index.json but the folder"):
        build_experiment(lora_config(str(pipe), "unused"), None)
    with pytest.raises(ValueError, match="does not contain the new token"):     # prompts first
        build_experiment(lora_config(str(pipe), "unused", **{"lora.instance_prompt": "a cat"}), None)


def test_text_options_on_a_base_without_text_are_refused(tmp_path):
    from test_train_lora import _config

    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    base, _ = _save_untrained(_config(tmp_path), str(tmp_path / "class_base"))
    c = lora_config(base, "unused", **{"data.name": "digits/16", "data.image_size": 16})
    defaults = config_lib.default_config()
    c.process.name, c.loss.target = defaults.process.name, defaults.loss.target
    with pytest.raises(ValueError, match=r"\['lora.instance_prompt', 'lora.new_tokens', 'lora.class_prompt'\].*"
                                         "no text conditioning"):
        build_experiment(c, make_mesh())


# ---------------------------------------------------------------------------------- through the loop
@pytest.mark.slow   # two LoRA runs (one resumed) + sampling through the CLI: ~1-3 min on the shared 2-core machine
def test_text_lora_run_freezes_the_base_resumes_exactly_and_samples_its_token(text_base, text_base_params,
                                                                               captioned_dir, tmp_path):
    from jaxdiff.cli.sample import main
    from jaxdiff.train_lib.experiment import restore_run
    from jaxdiff.train_lib.lora_text import _table
    from jaxdiff.train_lib.loop import train
    workdir = str(tmp_path / "lora")
    out = train(lora_config(text_base, captioned_dir), workdir)
    assert out["step"] == 4 and set(out["params"]) == {"lora", "new_tokens"}
    exp, state, _ = restore_run(workdir, task="lora")
    base = text_base_params
    # only the adapters and the new row moved; the base (old token rows included) is bitwise the base run's
    assert not np.array_equal(out["params"]["new_tokens"], exp.init_params["new_tokens"])
    flat = jax.tree_util.tree_flatten_with_path(out["params"]["lora"])[0]
    assert all(np.abs(v).max() > 0 for p, v in flat if "lora_b" in str(p[-1]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exp.base_params), base)
    assert _table(jax.device_get(exp.base_params)).shape[0] == exp.new_token_ids[0]
    # the optimizer state holds moments of the adapters and the new row only
    trained = sum(np.asarray(v).nbytes for v in jax.tree.leaves(out["params"]))
    assert sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0) == 2 * trained
    # the class images were drawn once; a resumed copy (from step 2) reads them and ends bitwise equal
    class_file = os.path.join(workdir, "class_images", "images.npz")
    meta = json.load(open(os.path.join(workdir, "class_images", "meta.json")))
    assert meta["class_prompt"] == "a seven" and np.load(class_file)["images"].shape == (6, 8, 8, 1)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    copied = os.path.join(resumed, "class_images", "images.npz")
    stamp = os.stat(copied).st_mtime_ns
    again = train(lora_config(text_base, captioned_dir), resumed)
    assert again["step"] == 4 and os.stat(copied).st_mtime_ns == stamp
    jax.tree.map(np.testing.assert_array_equal, again["params"], out["params"])
    # the trained row is exported for diffusers' load_textual_inversion
    from jaxdiff.convert.textual_inversion import load_textual_inversion
    token, row = load_textual_inversion(os.path.join(workdir, "textual_inversion", "learned_embeds_0.safetensors"))
    assert token == "<v1>"
    np.testing.assert_array_equal(row, np.asarray(jax.device_get(state.ema_params["new_tokens"]))[0])
    # the run samples with its new token (jaxdiff-sample --workdir --prompt)
    a, b = exp.encode_prompts(state.ema_params, ["a <v1> seven", "a seven"])
    assert np.abs(a - b).max() > 1e-4
    dest = str(tmp_path / "samples")
    assert main(["--workdir", workdir, "--prompt", "a <v1> seven", "--num", "2", "--steps", "2", "--out", dest]) == 0
    images = np.load(os.path.join(dest, "samples.npz"))["images"]
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.slow   # builds a CLIP folder base and compiles its text encoder: ~10-20 s on the shared 2-core machine
def test_a_frozen_clip_folder_base_learns_a_bpe_token(tmp_path):
    pytest.importorskip("tokenizers")
    from flax import nnx
    from test_text_to_image import write_tokenizer_files

    from jaxdiff.convert.clip import save_clip_text_model
    from jaxdiff.nn.clip_text import CLIPTextConfig, CLIPTextModel
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    from jaxdiff.train_lib.lora_text import _table
    n = write_tokenizer_files(str(tmp_path / "tokenizer"), max_length=12)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                       max_position_embeddings=12, bos_token_id=n - 2, eos_token_id=n - 1,
                                       pad_token_id=n - 1), rngs=nnx.Rngs(5))
    save_clip_text_model(enc, str(tmp_path / "text_encoder"))
    from test_text_training import tiny_text_config
    base_config = tiny_text_config(str(tmp_path), **{"text.encoder": str(tmp_path / "text_encoder"),
                                                     "text.tokenizer": str(tmp_path / "tokenizer"),
                                                     "train.sample_every": 0, "text.word_dropout": 0.0,
                                                     "text.unknown_words": 0.0})
    base, _ = _save_untrained(base_config, str(tmp_path / "base"))
    exp = build_experiment(lora_config(base, "unused", **{"lora.instance_prompt": "a photo of <v1>",
                                                          "lora.token_init": ("",), "lora.class_prompt": None,
                                                          "lora.num_class_images": 0}), make_mesh())
    assert exp.new_token_ids == (n,) and n in exp.instance_tokens
    table = np.asarray(_table(jax.device_get(exp.base_params)))
    np.testing.assert_array_equal(table, np.asarray(enc.embeddings.token_embedding.embedding.get_value()))
    # the prompt with the new token reads the trained row; a prompt without it does not
    shift = np.random.RandomState(1).randn(*exp.init_params["new_tokens"].shape).astype(np.float32)  # not constant:
    moved = {**exp.init_params, "new_tokens": exp.init_params["new_tokens"] + shift}  # LayerNorm removes one
    a0, b0 = exp.encode_prompts(exp.init_params, ["a photo of <v1>", "a photo of a cat"])
    a1, b1 = exp.encode_prompts(moved, ["a photo of <v1>", "a photo of a cat"])
    assert np.abs(a1 - a0).max() > 1e-3
    np.testing.assert_array_equal(b1, b0)
    np.testing.assert_allclose(b0, np.asarray(enc.encode(jnp.asarray(exp.tokenize(["a photo of a cat"]))))[0],
                               atol=1e-6)


@pytest.mark.slow   # an autoencoder + latent text base (untrained) and a 2-step LoRA run: ~1-2 min on 2 cores
def test_a_latent_text_base_trains_on_latents_and_draws_pixel_class_images(tmp_path, captioned_dir):
    from test_train_autoencoder import ae_config

    from jaxdiff.train_lib.ae_experiment import SCALE_FILE
    from jaxdiff.train_lib.experiment import restore_run
    from jaxdiff.train_lib.loop import train
    ae, _ = _save_untrained(ae_config(captioned_dir, 2), str(tmp_path / "ae"))    # f2: 16x16x1 -> 8x8x2
    with open(os.path.join(ae, SCALE_FILE), "w") as f:
        json.dump({"scale_factor": 0.5}, f)
    from test_text_training import tiny_text_config
    base, _ = _save_untrained(tiny_text_config(captioned_dir, **{
        "data.image_size": 16, "latent.autoencoder": ae, "latent.size": 8, "latent.channels": 2,
        "train.sample_every": 0}), str(tmp_path / "base"))
    workdir = str(tmp_path / "lora")
    c = lora_config(base, captioned_dir, **{"data.image_size": 16, "train.steps": 2, "lora.num_class_images": 4})
    out = train(c, workdir)
    assert out["step"] == 2 and np.isfinite(out["final_loss"]) and set(out["params"]) == {"lora", "new_tokens"}
    assert np.load(os.path.join(workdir, "class_images", "images.npz"))["images"].shape == (4, 16, 16, 1)
    exp, state, _ = restore_run(workdir, task="lora")
    assert exp.model_shape == (8, 8, 2) and exp.autoencoder.scale == 0.5
    model = exp.sampling_model(state.ema_params)
    from jaxdiff.sampling import Sampler, SamplerSettings
    images = Sampler(model, SamplerSettings.resolve(exp.config.sample), exp.mesh)(
        state.ema_params, None, jax.random.key(0), context=model.encode_prompts(["a <v1> seven"] * 2))
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


@pytest.mark.slow
@pytest.mark.parity  # a tiny StableDiffusionPipeline saved by diffusers as the base: ~1-3 min on 2 cores
def test_a_diffusers_text_to_image_folder_as_base(tmp_path):
    from test_text_to_image import _reference_pipeline

    from jaxdiff.convert.text_to_image import load_text_to_image
    from jaxdiff.train_lib.experiment import restore_run
    from jaxdiff.train_lib.lora_text import _table
    from jaxdiff.train_lib.loop import train
    torch, _, torch_pipe, folder = _reference_pipeline(str(tmp_path))   # DDIM (eps), 8x8x4 latents of 16x16x3
    workdir = str(tmp_path / "lora")
    c = lora_config(folder, None, **{
        "data.name": "photo_crops/32", "data.image_size": 16, "data.channels": 3, "data.label_key": None,
        "lora.instance_filter": (), "lora.num_instance_images": 8, "lora.instance_prompt": "a photo of <v1>",
        "lora.token_init": ("cat",), "lora.class_prompt": "a photo of a cat", "lora.num_class_images": 4,
        "loss.target": "eps", "train.steps": 2})
    out = train(c, workdir)
    assert out["step"] == 2 and set(out["params"]) == {"lora", "new_tokens"}
    assert np.load(os.path.join(workdir, "class_images", "images.npz"))["images"].shape == (4, 16, 16, 3)
    exp, state, _ = restore_run(workdir, task="lora")
    pipe = load_text_to_image(folder)
    table = np.asarray(pipe.text_encoder.embeddings.token_embedding.embedding.get_value())
    np.testing.assert_array_equal(np.asarray(_table(jax.device_get(exp.base_params))), table)
    assert exp.new_token_ids == (table.shape[0],) and exp.model_shape == (8, 8, 4)
    # the frozen UNet is bitwise the folder's
    from flax import nnx
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exp.base_params)["unet"],
                 nnx.to_pure_dict(nnx.state(pipe.unet, nnx.Param)))
    # diffusers reads the run's exports (load_lora_weights, load_textual_inversion) and computes what jaxdiff does
    torch_pipe.load_lora_weights(os.path.join(workdir, "lora"))
    torch_pipe.load_textual_inversion(os.path.join(workdir, "textual_inversion", "learned_embeds_0.safetensors"))
    prompt = ["a photo of <v1>"]
    ids = torch_pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == exp.tokenize(prompt).tolist()
    x = np.random.RandomState(0).randn(1, 8, 8, 4).astype(np.float32)
    with torch.no_grad():
        ctx_t = torch_pipe.text_encoder(torch.tensor(ids))[0]
        eps_t = torch_pipe.unet(torch.tensor(x).permute(0, 3, 1, 2), 500, encoder_hidden_states=ctx_t).sample
    ctx = exp.encode_prompts(state.ema_params, prompt)
    np.testing.assert_allclose(ctx, ctx_t.numpy(), atol=1e-4)
    eps = np.asarray(exp.network(state.ema_params).unet(jnp.asarray(x), jnp.array([500.0]), jnp.asarray(ctx)))
    np.testing.assert_allclose(eps, eps_t.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    base_eps = np.asarray(pipe.unet(jnp.asarray(x), jnp.array([500.0]), jnp.asarray(ctx)))
    assert np.abs(eps - base_eps).max() > 1e-5          # the adapters changed the UNet
