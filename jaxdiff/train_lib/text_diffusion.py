"""Text-conditioned diffusion training (``config.text.encoder`` set): the UNet's cross-attention reads the hidden
states of a CLIP text transformer that is either trained jointly with the UNet from scratch (``"train"``, sized
by ``text.width/layers/heads/mlp_dim``, as LDM trained its text-to-image model) or loaded from a transformers
``CLIPTextModel`` folder and kept frozen (its parameters are not in the train state: the folder is reloaded
on resume, as a latent run reloads its autoencoder).

Tokenizers need no download: ``"digits_words"`` (:class:`~jaxdiff.data.words.WordTokenizer` over the words of
the captioned digits' training phrasings) or a folder with CLIP's BPE files (:mod:`jaxdiff.convert.tokenizer`).
Captions come from ``data.caption_key`` as ``"tokens" (B, S)``; ``text.caption_dropout`` of them are replaced by
the empty caption, the unconditional branch of classifier-free guidance. The network is
:class:`~jaxdiff.nn.text_unet.TextConditionedUNet`; its parameters (``{"unet", "text_encoder"}``, the encoder's
only when trained) and their EMA are the train state's, so checkpoints and resumption are those of every run.
A sampled checkpoint is a context-conditioned :class:`~jaxdiff.sampling.SamplingModel` whose
``encode_prompts`` turns prompts into contexts with the run's tokenizer and (EMA) encoder.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdiff.data.words import SPECIAL
from jaxdiff.nn import UNet
from jaxdiff.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxdiff.nn.functional import make_apply
from jaxdiff.nn.sharding import batch_sharding
from jaxdiff.nn.text_unet import TextConditionedUNet
from jaxdiff.sampling import Sampler, SamplingModel
from jaxdiff.train_lib.diffusion import DiffusionExperiment, build_diffusion_experiment
from jaxdiff.train_lib.images import save_grid
from jaxdiff.train_lib.model import DTYPES, unet_config
from jaxdiff.train_lib.step import make_train_step
from jaxdiff.train_lib.word_noise import add_word_noise

log = logging.getLogger("jaxdiff.train")
TRAINED = "train"
WORD_TOKENIZERS = ("digits_words",)
WORD_NOISE_KEY_TAG = 11    # fold_in tag of the word-noise key (the step's other keys are unchanged)


class TextConfigError(ValueError):
    """A text-conditioned config whose parts do not fit together: the message names the part."""


def make_tokenizer(text_config):
    """The tokenizer of ``config.text``: ``tok(list[str]) -> (B, S)`` int32 with ``vocab_size``,
    ``model_max_length``, ``eos_token_id`` / ``bos_token_id`` / ``pad_token_id``."""
    name = text_config.tokenizer
    if name == "digits_words":
        from jaxdiff.data.captions import caption_vocabulary
        from jaxdiff.data.words import WordTokenizer
        return WordTokenizer(caption_vocabulary(), text_config.max_length)
    if not os.path.isdir(os.path.expanduser(name)):
        raise TextConfigError(f"config key 'text.tokenizer' must be one of {list(WORD_TOKENIZERS)} or a folder with "
                              f"CLIP's vocab.json and merges.txt, got {name!r} (no such folder)")
    from jaxdiff.convert.tokenizer import load_clip_tokenizer
    tok = load_clip_tokenizer(os.path.expanduser(name), what="tokenizer of config key 'text.tokenizer'")
    if text_config.encoder == TRAINED:
        tok.model_max_length = int(text_config.max_length)
    return tok


def build_text_encoder(text_config, tokenizer, seed: int) -> CLIPTextModel:
    """A fresh small CLIP text transformer (``text.encoder="train"``) or the frozen one of a folder."""
    t = text_config
    if t.encoder == TRAINED:
        cfg = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                             num_layers=t.layers, num_heads=t.heads, max_position_embeddings=tokenizer.model_max_length,
                             hidden_act=t.activation, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
        return CLIPTextModel(cfg, rngs=nnx.Rngs(seed + 1))
    folder = os.path.expanduser(t.encoder)
    if not os.path.isdir(folder):
        raise TextConfigError(f"config key 'text.encoder' must be {TRAINED!r} or a transformers CLIPTextModel "
                              f"folder, got {t.encoder!r} (no such folder)")
    from jaxdiff.convert.clip import load_clip_text_model
    encoder = load_clip_text_model(folder)
    c = encoder.config
    if tokenizer.vocab_size > c.vocab_size:
        raise TextConfigError(f"the tokenizer ({t.tokenizer}) has {tokenizer.vocab_size} tokens, the text encoder "
                              f"{t.encoder} only {c.vocab_size}")
    if tokenizer.model_max_length > c.max_position_embeddings:
        raise TextConfigError(f"the tokenizer's window ({tokenizer.model_max_length}) exceeds the text encoder's "
                              f"{c.max_position_embeddings} positions ({t.encoder})")
    return encoder


def check_text_config(config) -> None:
    """TextConfigError for a text config that cannot train, before anything is built."""
    t, m = config.text, config.model
    if config.data.caption_key is None:
        raise TextConfigError("config key 'text.encoder' is set but 'data.caption_key' is None: a text-conditioned "
                              "run needs captions (e.g. data.name='captioned_digits/16', data.caption_key='captions')")
    if m.num_classes is not None:
        raise TextConfigError("a text-conditioned run conditions on captions, not classes: set model.num_classes=None")
    attention = tuple(m.down_attention) + (m.mid_attention,)
    if "cross" not in attention:
        raise TextConfigError("a text-conditioned UNet needs cross-attention: put 'cross' in model.down_attention "
                              f"or model.mid_attention (got {tuple(m.down_attention)}, {m.mid_attention!r})")
    if t.encoder == TRAINED and t.width % t.heads:
        raise TextConfigError(f"config key 'text.width' ({t.width}) must divide by 'text.heads' ({t.heads})")
    if (t.word_dropout > 0 or t.unknown_words > 0) and t.tokenizer not in WORD_TOKENIZERS:
        raise TextConfigError(f"config keys 'text.word_dropout' / 'text.unknown_words' need a word tokenizer "
                              f"({list(WORD_TOKENIZERS)}), got text.tokenizer={t.tokenizer!r}")
    if config.sample.guidance_scale is not None and t.caption_dropout <= 0:
        raise TextConfigError("config key 'sample.guidance_scale' needs a model trained with caption dropout (the "
                              "empty caption): set text.caption_dropout > 0 or sample.guidance_scale=None")


def text_unet_config(config, width: int):
    """The UNet config of a text run: ``model.cross_attention_dim`` (None: ``width``), checked against ``width``."""
    cross = config.model.cross_attention_dim
    if cross is not None and cross != width:
        raise TextConfigError(f"the text encoder's width ({width}: text.width or the folder's hidden_size) does not "
                              f"match config key 'model.cross_attention_dim' ({cross}): they must be equal")
    return unet_config(config).replace(cross_attention_dim=width)


@dataclasses.dataclass
class TextDiffusionExperiment(DiffusionExperiment):
    """A diffusion run whose UNet is conditioned on captions through a text encoder (see the module docstring)."""

    tokenizer: Any = None
    null_tokens: np.ndarray | None = None     # (S,) the empty caption's tokens
    encode_text: Callable | None = None       # jitted (params, tokens (B, S)) -> context (B, S, D)
    context_shape: tuple | None = None         # (S, D)

    @property
    def conditional(self) -> bool:
        return True

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> ``(B, S)`` int32 tokens (the data pipeline's ``tokenize``)."""
        return np.asarray(self.tokenizer(list(texts)), np.int32)

    def batch_shardings(self) -> dict:
        return {**super().batch_shardings(), "tokens": batch_sharding(self.mesh, 2)}

    def make_train_step(self):
        """``train_lib.step`` with the caption tokens as the condition and the empty caption as its null."""
        c = self.config
        step = make_train_step(self.apply, self.loss_fn, self.optimizer, self.schedule, grad_accum=c.train.grad_accum,
                               label_dropout=c.text.caption_dropout, null_class=self.null_tokens,
                               ema_decay=c.train.ema_decay, conditional=True)
        encode = self.autoencoder.encode if self.autoencoder is not None else None
        t, tok = c.text, self.tokenizer
        noisy = t.word_dropout > 0 or t.unknown_words > 0

        def text_step(state, batch):
            image = batch["image"] if encode is None else jax.lax.stop_gradient(encode(batch["image"]))
            tokens = batch["tokens"]
            if noisy:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
                                         WORD_NOISE_KEY_TAG)
                tokens = add_word_noise(key, tokens, drop=t.word_dropout, insert=t.unknown_words,
                                        unk_id=tok.unk_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                        first_word_id=len(SPECIAL))
            return step(state, {"image": image, "label": tokens})
        return text_step

    def encode_prompts(self, params: Any, prompts: Sequence[str] | str) -> np.ndarray:
        """Prompts -> contexts ``(N, S, D)`` float32 with ``params`` (the train state's, or its EMA)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return np.asarray(self.encode_text(params, jnp.asarray(self.tokenize(prompts))), np.float32)

    def sampling_model(self, params: Any = None, step: int | None = None, source: str = "") -> SamplingModel:
        c = self.config
        encode = (lambda prompts: self.encode_prompts(params, prompts)) if params is not None else None
        return SamplingModel(apply=self.apply, params=params, process=self.process, prediction=c.loss.target,
                             shape=self.model_shape, context_shape=self.context_shape,
                             decode=self.autoencoder.decode if self.autoencoder is not None else None,
                             defaults=self.sample_settings.as_dict(), step=step, source=source,
                             encode_prompts=encode)

    def write_samples(self, state, batch_images, workdir: str, step: int) -> None:
        """``<workdir>/samples/step_*.png``: ``sample.num`` samples of ``text.sample_prompts`` (cycled)."""
        c = self.config
        if self._sampler is None:
            self._sampler = Sampler(self.sampling_model(), self.sample_settings, self.mesh)
        params = state.ema_params if c.sample.use_ema else state.params
        prompts = list(c.text.sample_prompts) or [""]
        n = c.sample.num
        context = self.encode_prompts(params, [prompts[i % len(prompts)] for i in range(n)])
        negative = self.encode_prompts(params, [""]) if self.sample_settings.guidance_scale is not None else None
        images = self._sampler(params, None, jax.random.key(c.sample.seed), context=context,
                               negative_context=negative)
        if jax.process_index() == 0:
            nrow = len(prompts) if n % len(prompts) == 0 and len(prompts) > 1 else None
            save_grid(images, os.path.join(workdir, "samples", f"step_{step:07d}.png"), nrow=nrow, scale=2)


def build_text_model(config, tokenizer=None) -> TextConditionedUNet:
    """The :class:`~jaxdiff.nn.text_unet.TextConditionedUNet` of a text config (checked first; ``tokenizer``:
    default :func:`make_tokenizer`), parameters initialised from ``config.seed``."""
    check_text_config(config)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(config.text)
    encoder = build_text_encoder(config.text, tokenizer, config.seed)
    unet_cfg = text_unet_config(config, encoder.config.hidden_size)
    latent = config.latent.autoencoder is not None
    size = config.latent.size if latent else config.data.image_size
    levels = len(unet_cfg.block_out_channels)
    if not size or size % (2 ** (levels - 1)):
        raise TextConfigError(f"the UNet's input size {size} is not divisible by 2^{levels - 1}")
    unet = UNet(unet_cfg, dtype=DTYPES[config.model.dtype], remat=config.model.remat, rngs=nnx.Rngs(config.seed))
    return TextConditionedUNet(unet, encoder, clip_skip=config.text.clip_skip)


def build_text_diffusion_experiment(config, mesh: Mesh) -> TextDiffusionExperiment:
    """The :class:`TextDiffusionExperiment` of a validated config with ``text.encoder`` set."""
    tokenizer = make_tokenizer(config.text) if config.data.caption_key is not None else None
    model = build_text_model(config, tokenizer)
    unet_cfg, width = model.unet.config, model.text_encoder.config.hidden_size
    trainable = nnx.Param if config.text.encoder == TRAINED else nnx.All(nnx.Param, nnx.PathContains("unet"))
    graphdef, params, rest = nnx.split(model, trainable, ...)
    rest_values = nnx.to_pure_dict(rest)

    def encode_text(p, tokens):
        return nnx.merge(graphdef, nnx.State(p), nnx.State(rest_values)).encode_text(tokens).astype(jnp.float32)

    null_tokens = np.asarray(tokenizer([""]), np.int32)[0]
    return build_diffusion_experiment(
        config, mesh, parts=(graphdef, params, rest), unet=unet_cfg, condition="context",
        experiment_cls=TextDiffusionExperiment, tokenizer=tokenizer, null_tokens=null_tokens,
        encode_text=jax.jit(encode_text), context_shape=(tokenizer.model_max_length, width))


__all__ = ["TRAINED", "TextConfigError", "TextDiffusionExperiment", "build_text_diffusion_experiment",
           "build_text_encoder", "build_text_model", "check_text_config", "make_tokenizer", "text_unet_config"]
