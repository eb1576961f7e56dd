"""Text-to-image (issue 14): the CLIP text encoder, the CLIP tokenizer and whole Stable-Diffusion-layout folders.

Parity tests build a tiny random pipeline with transformers/diffusers (CLIPTextModel, a CLIP tokenizer from
vocab.json + merges.txt written here, UNet2DConditionModel, AutoencoderKL, a scheduler), perturb every
parameter away from its initial value, save it with ``save_pretrained`` and compare jaxdiff with diffusers'
``StableDiffusionPipeline`` from the same latents, prompts and scheduler (float32, max abs error <= 1e-4).
The bad-input tests need only jaxdiff and ``tokenizers``.
"""
import functools
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("tokenizers")

IMAGE_ATOL = 1e-4
TEXT_ATOL = 1e-5
CORPUS = ["a photo of a cat sitting on the mat", "an astronaut riding a horse on the moon",
          "the quick brown fox jumps over the lazy dog's back", "digit three, thick strokes, slanted left",
          "a thin seven, upright and small", "oil painting of a lighthouse at dusk"] * 10
TRICKY = ["", " ", "A photo of a CAT", "an  astronaut\triding\na horse", "don't you're we'll I'd",
          "café naïve Ünïcödé", "e\u0301", "日本語のテキスト", "emoji 🐱🚀!!", "3.14159 and 42",
          "<|startoftext|>hi<|endoftext|>", "hello<|endoftext|>world", "a,b;c:d", "wow!!! yes!", "x" * 50,
          "the quick brown fox jumps over the lazy dog's back again and again and again"]
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_tokenizer_files(folder, corpus=CORPUS, vocab_size=300, max_length=77, pad_token=EOS):
    """CLIP-style vocab.json + merges.txt (a BPE learned on ``corpus`` with CLIP's pre-tokenisation) and a
    tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.train_from_iterator(corpus, BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                               end_of_word_suffix="</w>", show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    vocab = {}
    for t in alphabet + [a + "</w>" for a in alphabet] + list(model["vocab"]) + ["".join(m.split()) for m in merges]:
        vocab.setdefault(t, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(model_max_length=max_length, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token,
                       tokenizer_class="CLIPTokenizer"), f)
    return len(vocab)


def _perturb(module, torch, seed, scale=0.05):
    """Move every parameter (norm scales and biases included) away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _text_config(transformers, vocab_size, **kw):
    return transformers.CLIPTextConfig(**{**dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1), **kw})


UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
           sample_size=16)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _ddim(diffusers):
    """Stable Diffusion's scheduler settings, with DDIM."""
    return diffusers.DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _tiny_encoder(**kw):
    from flax import nnx

    from jaxdiff.nn.clip_text import CLIPTextConfig, CLIPTextModel
    c = CLIPTextConfig(**{**dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                                 max_position_embeddings=10, eos_token_id=49), **kw})
    return CLIPTextModel(c, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def _reference_pipeline(root):
    """A tiny random StableDiffusionPipeline saved under ``root``/pipe (vocab.json + merges.txt kept in
    tokenizer/); returns (torch, diffusers, pipe, folder)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tok_dir = os.path.join(root, "tokenizer_files")
    n_vocab = write_tokenizer_files(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    text_encoder = _perturb(transformers.CLIPTextModel(_text_config(transformers, n_vocab)).eval(), torch, 1)
    unet = _perturb(diffusers.UNet2DConditionModel(**UNET).eval(), torch, 2)
    vae = _perturb(diffusers.AutoencoderKL(**VAE).eval(), torch, 3)
    scheduler = _ddim(diffusers)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = os.path.join(root, "pipe")
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(folder, "tokenizer", name))
    return torch, diffusers, pipe, folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference_pipeline(str(tmp_path_factory.mktemp("t2i")))


@pytest.fixture(scope="module")
def ours(reference):
    from jaxdiff.convert.text_to_image import load_text_to_image
    return load_text_to_image(reference[3])


# ------------------------------------------------------------------------------------------ whole pipeline

PROMPTS = ["a photo of a cat sitting on the mat", "an astronaut riding a horse"]
NEGATIVE = ["blurry", ""]


def _latents(n=2, seed=5):
    return np.random.RandomState(seed).randn(n, 4, 8, 8).astype(np.float32)


def _diffusers_images(reference, scheduler, steps, guidance, output_type="np"):
    torch, diffusers, pipe, _ = reference
    pipe.scheduler = scheduler
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(_latents()), output_type=output_type).images
    return out if output_type == "np" else out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parity
def test_prompt_embeddings_equal_diffusers(reference, ours):
    torch, _, pipe, _ = reference
    with torch.no_grad():
        want, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    assert np.abs(ours.encode_prompt(PROMPTS) - want.numpy()).max() <= TEXT_ATOL
    assert np.abs(ours.encode_prompt(NEGATIVE) - neg.numpy()).max() <= TEXT_ATOL


@pytest.mark.parity
def test_ddim_pipeline_equals_diffusers(reference, ours):
    diffusers = reference[1]
    steps, guidance = 4, 7.5
    sched = _ddim(diffusers)            # the folder's scheduler (pipe.scheduler may have been replaced)
    want = _diffusers_images(reference, sched, steps, guidance)
    got = ours(PROMPTS, NEGATIVE, solver="ddim", grid="scheduler", steps=steps, guidance_scale=guidance,
               latents=_latents().transpose(0, 2, 3, 1))
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert 0.05 < want.std() and ((want > 0) & (want < 1)).mean() > 0.9     # not saturated: the test can see errors
    err = np.abs(got - want).max()
    assert err <= IMAGE_ATOL, f"max abs error {err}"


def _dpm_case(reference, ours, steps, guidance, output_type="np"):
    from jaxdiff.convert.text_to_image import scheduler_grid
    diffusers = reference[1]
    sched = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                  steps_offset=1)
    want = _diffusers_images(reference, sched, steps, guidance, output_type=output_type)
    grid = scheduler_grid(dict(sched.config, _class_name="DPMSolverMultistepScheduler"), ours.process, steps)
    got = ours(PROMPTS, NEGATIVE, solver="dpm_solver++", solver_kwargs=dict(order=2, lower_final_below=15),
               grid=grid, guidance_scale=guidance, latents=_latents().transpose(0, 2, 3, 1), output_type=output_type)
    return got, want


@pytest.mark.parity
def test_dpm_solver_pipeline_equals_diffusers(reference, ours):
    got, want = _dpm_case(reference, ours, steps=5, guidance=5.0)
    assert got.shape == want.shape == (2, 16, 16, 3)
    err = np.abs(got - want).max()
    assert err <= IMAGE_ATOL, f"max abs error {err}"


@pytest.mark.parity
@pytest.mark.slow
def test_dpm_solver_latents_equal_diffusers(reference, ours):
    """Before decoding: this random UNet's x0 predictions reach |z| ~ 30 (1/alpha at the first step), so the
    float32 bound is relative: max abs error <= 1e-4 * max |z|."""
    got, want = _dpm_case(reference, ours, steps=8, guidance=7.5, output_type="latent")
    err = np.abs(got - want).max()
    assert err <= IMAGE_ATOL * max(1.0, np.abs(want).max()), f"max abs error {err} at max |z| {np.abs(want).max()}"


@pytest.mark.parity
def test_pipeline_seed_draws_the_samplers_start_noise(ours):
    """Any solver and named grid run; ``seed`` draws the start latents as jaxdiff.sampling.Sampler does."""
    a = ours(PROMPTS, solver="unipc", grid="uniform_logsnr", steps=4, seed=3)
    b = ours(PROMPTS, solver="unipc", grid="uniform_logsnr", steps=4, latents=_start(ours, 3))
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parity
@pytest.mark.slow
def test_pipeline_without_guidance_and_per_prompt_images(ours):
    a = ours(PROMPTS, solver="unipc", steps=4, seed=3)
    c = ours(PROMPTS, solver="unipc", steps=4, seed=3, guidance_scale=None)
    assert np.abs(a - c).max() > 1e-3
    d = ours(PROMPTS[1], solver="unipc", steps=4, latents=_start(ours, 3)[1:])   # batch 1, same sample
    np.testing.assert_allclose(a[1], d[0], atol=1e-5)
    e = ours(PROMPTS, solver="unipc", steps=4, seed=3, num_images_per_prompt=2)
    assert e.shape == (4, 16, 16, 3)


def _start(pipe, seed, n=2):
    """The start latents the sampler draws for ``seed`` (as jaxdiff.sampling.Sampler draws them)."""
    import jax
    import jax.numpy as jnp
    k_start, _ = jax.random.split(jax.random.key(seed))
    shape = (8, 8, 4)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k_start, i), shape, jnp.float32))
                     for i in range(n)]) * float(pipe.process.prior_std)


# ---------------------------------------------------------------------------------------------- bad input

def _fake_folder(root, parts, index=True):
    os.makedirs(root, exist_ok=True)
    if index:
        with open(os.path.join(root, "model_index.json"), "w") as f:
            json.dump({p: ["x", "y"] for p in parts}, f)
    for p in parts:
        os.makedirs(os.path.join(root, p), exist_ok=True)
    return str(root)


def test_is_text_to_image_folder(tmp_path):
    from jaxdiff.convert.text_to_image import is_text_to_image_folder
    assert is_text_to_image_folder(_fake_folder(tmp_path / "a", ["tokenizer", "text_encoder", "unet", "vae",
                                                                 "scheduler"]))
    assert not is_text_to_image_folder(_fake_folder(tmp_path / "b", ["unet", "scheduler"]))
    assert not is_text_to_image_folder(str(tmp_path / "nothing"))


def test_missing_part_is_named(tmp_path):
    from jaxdiff.convert.text_to_image import PipelineError, load_text_to_image
    with pytest.raises(PipelineError, match="no model_index.json"):
        load_text_to_image(_fake_folder(tmp_path / "a", ["unet"], index=False))
    with pytest.raises(PipelineError, match="model_index.json has no 'vae' part"):
        load_text_to_image(_fake_folder(tmp_path / "b", ["tokenizer", "text_encoder", "unet", "scheduler"]))
    root = _fake_folder(tmp_path / "c", ["tokenizer", "text_encoder", "unet", "vae", "scheduler"])
    shutil.rmtree(os.path.join(root, "scheduler"))
    with pytest.raises(PipelineError, match=r"'scheduler' part is listed .* folder scheduler/ is missing"):
        load_text_to_image(root)
    root = _fake_folder(tmp_path / "d", ["tokenizer", "text_encoder", "unet", "vae", "scheduler"])
    with pytest.raises(PipelineError, match="tokenizer part of .*needs vocab.json and merges.txt"):
        load_text_to_image(root)


def test_width_mismatch_is_named():
    from flax import nnx

    from jaxdiff.convert.text_to_image import PipelineError, check_parts
    from jaxdiff.nn.autoencoder import AutoencoderConfig, AutoencoderKL
    from jaxdiff.nn.unet import UNetConfig, UNet
    enc = _tiny_encoder()
    unet = nnx.eval_shape(lambda: UNet(UNetConfig(in_channels=4, out_channels=4, block_out_channels=(8,),
                                                  layers_per_block=1, down_attention=("cross",), down_heads=2,
                                                  cross_attention_dim=24, norm_num_groups=4, mid_block=False),
                                       rngs=nnx.Rngs(0)))
    vae = nnx.eval_shape(lambda: AutoencoderKL(AutoencoderConfig(block_out_channels=(8,), norm_num_groups=4,
                                                                 latent_channels=4), rngs=nnx.Rngs(0)))

    class Tok:
        vocab_size, model_max_length = 50, 10
    with pytest.raises(PipelineError, match=r"text_encoder's width \(hidden_size=16\) does not match the unet's "
                                            r"cross_attention_dim=24"):
        check_parts(Tok(), enc, unet, vae)


# ------------------------------------------------------------------------ context sampling (no torch)

def _context_model():
    """A cheap context-conditioned eps model: eps = x * mean(context) + 0.1 * mean(context)."""
    import jax.numpy as jnp

    from jaxdiff.noise import make_process
    from jaxdiff.sampling import SamplingModel

    def apply(params, x, model_time, context):
        c = jnp.mean(context, axis=(1, 2))[:, None, None, None] * params["w"]
        return 0.5 * x * jnp.tanh(c) + 0.1 * c
    return SamplingModel(apply=apply, params={"w": jnp.float32(1.0)}, process=make_process("vp_linear"),
                         prediction="eps", shape=(4, 4, 2), context_shape=(5, 3))


def test_context_sampler_guidance_chunking_and_devices():
    import jax

    from jaxdiff.parallel import make_mesh
    from jaxdiff.sampling import Sampler, SamplerSettings, sample_images
    model = _context_model()
    rng = np.random.RandomState(0)
    ctx, neg = rng.randn(6, 5, 3).astype(np.float32), rng.randn(5, 3).astype(np.float32)
    settings = SamplerSettings(solver="dpm_solver++", steps=4, guidance_scale=3.0)
    one = Sampler(model, settings)
    whole = sample_images(one, None, 6, seed=1, batch=6, context=ctx, negative_context=neg)
    chunked = sample_images(one, None, 6, seed=1, batch=4, context=ctx, negative_context=neg)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    eight = sample_images(Sampler(model, settings, make_mesh(4, 2)), None, 6, seed=1, batch=6, context=ctx,
                          negative_context=np.broadcast_to(neg, ctx.shape))
    np.testing.assert_allclose(eight, whole, atol=1e-5)
    plain = sample_images(Sampler(model, SamplerSettings(solver="dpm_solver++", steps=4)), None, 6, seed=1,
                          batch=6, context=ctx)
    assert np.abs(plain - whole).max() > 1e-3
    with pytest.raises(ValueError, match="needs negative_context"):
        one(model.params, None, jax.random.key(0), context=ctx)
    with pytest.raises(ValueError, match=r"context must have shape \(N, 5, 3\)"):
        one(model.params, None, jax.random.key(0), context=ctx[:, :4], negative_context=neg)
    with pytest.raises(ValueError, match="not on labels"):
        one(model.params, np.zeros(6, np.int32), jax.random.key(0))


@pytest.mark.parity
def test_tokenizer_json_only_folder(reference, tmp_path):
    """transformers 5 saves tokenizer.json without vocab.json / merges.txt: read as it is."""
    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    pipe = reference[2]
    pipe.tokenizer.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    tok = load_clip_tokenizer(str(tmp_path))
    strings = [s for s in TRICKY if len(s) < 40]
    want = pipe.tokenizer(strings, padding="max_length", max_length=77, truncation=True).input_ids
    assert tok(strings).tolist() == want


@pytest.mark.parity
@pytest.mark.parametrize("cls,extra", [
    ("DDIMScheduler", dict(set_alpha_to_one=False, steps_offset=1)),
    ("DDIMScheduler", dict(timestep_spacing="trailing")),
    ("DDIMScheduler", dict(timestep_spacing="linspace", set_alpha_to_one=True)),
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict(steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
])
@pytest.mark.parametrize("steps", [7, 25])
def test_scheduler_grid_visits_the_schedulers_timesteps(cls, extra, steps):
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.convert.scheduler import process_from_scheduler_config
    from jaxdiff.convert.text_to_image import scheduler_grid
    sched = getattr(diffusers, cls)(**SD_SCHEDULE, **extra)
    sched.set_timesteps(steps)
    cfg = dict(sched.config, _class_name=cls)
    process, _ = process_from_scheduler_config(cfg)
    grid = scheduler_grid(cfg, process, steps)
    want = np.unique(np.asarray(sched.timesteps, np.float64))[::-1]
    np.testing.assert_allclose(grid[:-1] * 1000 - 1, want, atol=1e-9)
    to_one = cfg.get("set_alpha_to_one", cls != "PNDMScheduler") if cls in ("DDIMScheduler", "PNDMScheduler") else \
        cfg.get("final_sigmas_type", "zero") == "zero"
    assert float(process.sigma(grid[-1])) == (0.0 if to_one else pytest.approx(float(process.sigma(1e-3))))


@pytest.mark.parity
def test_textual_inversion_tokens_equal_transformers(reference):
    """A new token and its embedding (textual inversion): the same prompt embeddings as transformers with
    ``tokenizer.add_tokens`` + ``resize_token_embeddings`` + the row set."""
    import copy
    torch, _, pipe, folder = reference
    transformers = pytest.importorskip("transformers")
    from jaxdiff.convert.text_to_image import load_text_to_image
    vec = np.random.RandomState(7).randn(2, 32).astype(np.float32)
    tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    enc = copy.deepcopy(pipe.text_encoder)
    tok.add_tokens(["<cat-toy>", "<Style>"])
    enc.resize_token_embeddings(len(tok))
    ids_new = tok.convert_tokens_to_ids(["<cat-toy>", "<Style>"])
    with torch.no_grad():
        enc.get_input_embeddings().weight[ids_new] = torch.from_numpy(vec)
    prompts = ["a <cat-toy> on the mat in <Style>", "a cat"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = enc(ids).last_hidden_state.numpy()
    ours = load_text_to_image(folder)
    assert ours.add_tokens({"<cat-toy>": vec[0], "<Style>": vec[1]}) == ids_new
    np.testing.assert_array_equal(ours.tokenize(prompts), ids.numpy())
    assert np.abs(ours.encode_prompt(prompts) - want).max() <= TEXT_ATOL


@pytest.mark.parity
@pytest.mark.slow
def test_pipeline_sharded_and_bfloat16(reference, ours):
    """The batch sharded over 8 devices gives the same images; bfloat16 compute runs and stays close."""
    import jax.numpy as jnp

    from jaxdiff.convert.text_to_image import load_text_to_image
    from jaxdiff.parallel import make_mesh
    prompts = PROMPTS * 3                                       # 6 samples on a 4 x 2 mesh: padded to 8
    whole = ours(prompts, solver="dpm_solver++", steps=4, seed=2)
    sharded = ours(prompts, solver="dpm_solver++", steps=4, seed=2, mesh=make_mesh(4, 2))
    np.testing.assert_allclose(sharded, whole, atol=1e-5)
    half = load_text_to_image(reference[3], dtype=jnp.bfloat16)
    low = half(prompts[:2], solver="dpm_solver++", steps=4, seed=2)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert np.abs(low - whole[:2]).mean() < 0.05


@pytest.mark.parity
def test_sample_cli_prompts_a_text_to_image_folder(reference, ours, tmp_path, capsys):
    """jaxdiff-sample --diffusers FOLDER --prompt ...: the Python API's images (in [-1, 1]), prompts cycled."""
    from jaxdiff.cli import sample as sample_cli
    folder, out = reference[3], tmp_path / "out"
    args = ["--diffusers", folder, "--prompt", "a red cat", "--prompt", "a tree", "--negative_prompt", "blurry",
            "--num", "4", "--steps", "3", "--solver", "ddim", "--guidance_scale", "5", "--seed", "7"]
    assert sample_cli.main(args + ["--out", str(out)]) == 0
    saved = np.load(out / "samples.npz")
    want = ours(["a red cat", "a tree"], "blurry", solver="ddim", steps=3, guidance_scale=5.0, seed=7,
                num_images_per_prompt=2)
    np.testing.assert_allclose(saved["images"], want * 2 - 1, atol=1e-5)
    np.testing.assert_array_equal(saved["labels"], [0, 0, 1, 1])
    assert json.loads((out / "sample.json").read_text())["prompt"] == ["a red cat", "a tree"]
    assert sample_cli.main(["--diffusers", folder, "--num", "2"]) == 2
    assert "text-to-image folder: give --prompt" in capsys.readouterr().err
