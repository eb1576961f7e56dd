"""A diffusers text-to-image (Stable Diffusion 1.x / 2.x) pipeline folder as jaxdiff parts, sampled with any
jaxdiff solver and time grid.

    pipe = load_text_to_image("path/to/sd-folder")
    images = pipe(["a photo of a cat"], negative_prompt=["blurry"], solver="dpm_solver++", steps=20,
                  guidance_scale=7.5, seed=0)           # (1, H, W, 3) float32 in [0, 1]

The folder holds ``model_index.json`` and the parts ``tokenizer/`` (CLIP BPE files), ``text_encoder/``
(transformers ``CLIPTextModel``), ``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``) and
``scheduler/`` (its config gives the noise process and prediction kind; sampling options are jaxdiff's).
Prompts are encoded as diffusers does (padded / truncated to the tokenizer's ``model_max_length``, prompt
embeddings from the last or, with ``clip_skip``, an earlier layer); classifier-free guidance runs the UNet
once on the doubled batch; latents are decoded with ``vae.decode(z / scaling_factor)`` in the same compiled
program, and images are mapped to ``[0, 1]`` as diffusers' ``output_type="np"``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.clip import load_clip_text_model
from jaxdiff.convert.diffusers_io import load_autoencoder_kl, load_unet, read_config
from jaxdiff.convert.scheduler import process_from_scheduler_config
from jaxdiff.convert.tokenizer import CLIPTokenizer, load_clip_tokenizer
from jaxdiff.nn.autoencoder import AutoencoderKL
from jaxdiff.nn.clip_text import CLIPTextModel
from jaxdiff.nn.functional import make_apply, split_model
from jaxdiff.nn.unet import UNet
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel
from jaxdiff.timesteps import diffusers_indices, grid_from_indices

PARTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
OUTPUT_TYPES = ("np", "latent")
# diffusers schedulers whose timesteps follow DDIM's spacing rule (the others: the multistep rule)
_DDIM_STYLE = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")
_DEFAULT_SPACING = {"DDIMScheduler": "leading", "DDPMScheduler": "leading", "PNDMScheduler": "leading"}


class PipelineError(ValueError):
    """A text-to-image folder that cannot be used: the message names the part."""


def scheduler_grid(scheduler_config: dict, process, steps: int) -> np.ndarray:
    """``(steps+1,)`` process times at the training indices a diffusers scheduler with ``scheduler_config`` visits
    in ``steps`` steps (``timestep_spacing``, ``steps_offset``), then its final point (``set_alpha_to_one`` /
    ``final_sigmas_type``: t = 0, or index 0's time). With the matching jaxdiff solver this reproduces the
    scheduler (docs/solvers.md); any jaxdiff solver may use it. Euler/Heun with ``"linspace"`` spacing visit
    fractional timesteps, which are rounded here."""
    cls = scheduler_config.get("_class_name", "DDIMScheduler")
    style = "ddim" if cls in _DDIM_STYLE else "multistep"
    spacing = scheduler_config.get("timestep_spacing") or _DEFAULT_SPACING.get(cls, "linspace")
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    idx = diffusers_indices(int(steps), spacing, num_train_steps=n,
                            steps_offset=int(scheduler_config.get("steps_offset", 0)), style=style)
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        final = "zero" if scheduler_config.get("set_alpha_to_one", cls == "DDIMScheduler") else "t_min"
    else:
        final = "t_min" if scheduler_config.get("final_sigmas_type", "zero") == "sigma_min" else "zero"
    return np.asarray(grid_from_indices(process, idx, final=final), np.float64)


@dataclasses.dataclass
class TextToImagePipeline:
    """The parts of a text-to-image folder in jaxdiff form. Call it with prompts to get images; its pieces
    (:meth:`encode_prompt`, :meth:`sampling_model`, :meth:`sampler`) serve custom loops.

    Attributes: ``tokenizer``, ``text_encoder`` (:class:`~jaxdiff.nn.clip_text.CLIPTextModel`), ``unet``
    (:class:`~jaxdiff.nn.unet.UNet`), ``vae`` (:class:`~jaxdiff.nn.autoencoder.AutoencoderKL`), ``process`` and
    ``prediction`` (from ``scheduler_config``), ``sample_size`` (the UNet's latent size), ``source``.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    process: Any
    prediction: str
    scheduler_config: dict
    sample_size: int
    source: str = ""

    def __post_init__(self):
        check_parts(self.tokenizer, self.text_encoder, self.unet, self.vae, self.source)
        self._encoder = nnx.jit(lambda m, ids, skip: m.encode(ids, clip_skip=skip), static_argnums=2)
        graphdef, params, rest = split_model(self.unet)
        self._unet_apply, self._unet_params = make_apply(graphdef, rest, condition="context"), nnx.to_pure_dict(params)
        vgraph, vparams = nnx.split(self.vae)
        self._vae_graph, self._vae_params = vgraph, vparams
        self._samplers: dict = {}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def params(self) -> dict:
        """The parameters the sampler takes: ``{"unet": ..., "vae": ...}`` (pure dicts / states)."""
        return {"unet": self._unet_params, "vae": self._vae_params}

    def add_tokens(self, embeddings: dict) -> list[int]:
        """Textual inversion: add each ``{token: vector (D,)}`` to the tokenizer (matched before BPE, case kept)
        and its vector to the text encoder's token table at the token's id; returns the ids. Compiled samplers
        stay valid (the UNet does not change)."""
        d = self.text_encoder.config.hidden_size
        vectors = {t: np.asarray(v, np.float32).reshape(-1) for t, v in embeddings.items()}
        for t, v in vectors.items():
            if v.shape != (d,):
                raise ValueError(f"the embedding of {t!r} has {v.size} values; the text_encoder's width is {d}")
        ids = self.tokenizer.add_tokens(list(vectors))
        table = self.text_encoder.embeddings.token_embedding.embedding
        size = max(self.text_encoder.config.vocab_size, max(ids, default=-1) + 1)
        if size > self.text_encoder.config.vocab_size:
            self.text_encoder.resize_token_embeddings(size)
            table = self.text_encoder.embeddings.token_embedding.embedding
        value = table.get_value().at[jnp.asarray(ids, jnp.int32)].set(
            jnp.asarray(np.stack(list(vectors.values())), table.get_value().dtype))
        table.set_value(value)
        return ids

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """``(B, model_max_length)`` int32 ids, as diffusers pads and truncates prompts (with a warning)."""
        return self.tokenizer(list([prompts] if isinstance(prompts, str) else prompts))

    def encode_prompt(self, prompts: str | Sequence[str], *, clip_skip: int = 0) -> np.ndarray:
        """Prompt embeddings ``(B, model_max_length, D)`` float32 (the UNet's cross-attention context)."""
        ids = self.tokenize(prompts)
        return np.asarray(self._encoder(self.text_encoder, jnp.asarray(ids), int(clip_skip)), np.float32)

    def sampling_model(self, height: int | None = None, width: int | None = None, *,
                       output_type: str = "np") -> SamplingModel:
        """The UNet as a context-conditioned :class:`~jaxdiff.sampling.SamplingModel` (params ``{"unet",
        "vae"}``), decoding to ``[0, 1]`` images (``output_type="np"``) or returning latents (``"latent"``)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        f = self.vae_scale_factor
        height = height or self.sample_size * f
        width = width or self.sample_size * f
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of the VAE's downsampling factor {f}, got {v!r}")
        unet_apply, vae_graph = self._unet_apply, self._vae_graph

        def apply(params, x, model_time, context):
            return unet_apply(params["unet"], x, model_time, context)

        def decode_to_unit_range(z, params):
            vae = nnx.merge(vae_graph, params["vae"])
            img = vae.decode(z / vae.config.scaling_factor)
            return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        decode = decode_to_unit_range if output_type == "np" else None
        return SamplingModel(apply=apply, params=self.params, process=self.process, prediction=self.prediction,
                             shape=(height // f, width // f, self.unet.config.in_channels), decode=decode,
                             decode_params=True,
                             context_shape=(self.tokenizer.model_max_length, self.text_encoder.config.hidden_size),
                             source=self.source)

    def sampler(self, settings: SamplerSettings, *, grid: Any = None, height: int | None = None,
                width: int | None = None, output_type: str = "np", mesh=None) -> Sampler:
        """A compiled :class:`~jaxdiff.sampling.Sampler` (cached per settings, grid, size, output type and
        mesh). ``grid``: explicit times, or ``"scheduler"`` for the folder's scheduler's timesteps
        (:func:`scheduler_grid`)."""
        if isinstance(grid, str):
            if grid != "scheduler":
                raise ValueError(f"grid must be 'scheduler', an array of times or None, got {grid!r}")
            grid = scheduler_grid(self.scheduler_config, self.process, settings.steps)
        key = (repr(settings.as_dict()), None if grid is None else tuple(np.asarray(grid).tolist()), height, width,
               output_type, id(mesh))
        if key not in self._samplers:
            model = self.sampling_model(height, width, output_type=output_type)
            self._samplers[key] = Sampler(model, settings, mesh, grid=grid)
        return self._samplers[key]

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 solver: str = "dpm_solver++", solver_kwargs: dict | None = None, grid: Any = "uniform_logsnr",
                 steps: int = 20, guidance_scale: float | None = 7.5, seed: int = 0, latents: Any = None,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 clip_skip: int = 0, output_type: str = "np", mesh=None) -> np.ndarray:
        """Images ``(B * num_images_per_prompt, H, W, 3)`` float32 in ``[0, 1]`` (or latents
        ``(B.., h, w, c)`` with ``output_type="latent"``) for ``prompt`` (a string or a list).

        Args:
          negative_prompt: the unconditional branch of guidance (a string for all, or one per prompt);
            default the empty prompt, as diffusers. Ignored without guidance (``guidance_scale=None``; diffusers'
            ``guidance_scale <= 1`` is the same as None here).
          solver, solver_kwargs: any ``jaxdiff.solvers.SOLVERS`` name and its options.
          grid: a time-grid name of ``jaxdiff.sampling.GRID_NAMES``, ``"scheduler"`` (the folder's scheduler's
            timesteps for ``steps``), or an explicit decreasing array of process times.
          latents: start noise ``(N, h, w, c)`` NHWC (diffusers' ``latents`` transposed); default drawn from
            ``seed`` as :class:`~jaxdiff.sampling.Sampler` draws it.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or \
                num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if guidance_scale is not None and guidance_scale <= 1.0:
            guidance_scale = None          # diffusers: no guidance unless guidance_scale > 1
        named = grid if isinstance(grid, str) and grid != "scheduler" else SamplerSettings.grid
        explicit = None if isinstance(grid, str) and grid != "scheduler" else grid
        if explicit is not None and not isinstance(explicit, str):
            steps = int(np.shape(explicit)[0]) - 1 if np.ndim(explicit) == 1 else steps
        settings = SamplerSettings(solver=solver, solver_kwargs=solver_kwargs or {}, grid=named, steps=steps,
                                   guidance_scale=guidance_scale)
        sampler = self.sampler(settings, grid=explicit, height=height, width=width, output_type=output_type,
                               mesh=mesh)
        context = np.repeat(self.encode_prompt(prompts, clip_skip=clip_skip), num_images_per_prompt, axis=0)
        negative = None
        if guidance_scale is not None:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg) != len(prompts):
                raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
            negative = np.repeat(self.encode_prompt(neg, clip_skip=clip_skip), num_images_per_prompt, axis=0)
        return sampler(self.params, None, jax.random.key(seed), context=context, negative_context=negative,
                       x_T=latents)


def check_parts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet, vae: AutoencoderKL,
                source: str = "") -> None:
    """Raise :class:`PipelineError` naming the parts that do not fit together (text width vs the UNet's
    cross-attention width, token ids vs the encoder's table, the window vs its positions, latent channels)."""
    where = f"text-to-image pipeline {source!r}: " if source else "text-to-image pipeline: "
    c = unet.config
    if c.cross_attention_dim is None:
        raise PipelineError(where + "the unet has no cross-attention (cross_attention_dim is None): not a "
                            "text-conditioned UNet")
    width = text_encoder.config.hidden_size
    if width != c.cross_attention_dim:
        raise PipelineError(where + f"the text_encoder's width (hidden_size={width}) does not match the unet's "
                            f"cross_attention_dim={c.cross_attention_dim}")
    if tokenizer.vocab_size > text_encoder.config.vocab_size:
        raise PipelineError(where + f"the tokenizer has {tokenizer.vocab_size} tokens but the text_encoder's "
                            f"embedding table only {text_encoder.config.vocab_size} (resize it for added tokens)")
    if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
        raise PipelineError(where + f"the tokenizer's model_max_length={tokenizer.model_max_length} exceeds the "
                            f"text_encoder's max_position_embeddings={text_encoder.config.max_position_embeddings}")
    if vae.config.latent_channels != c.in_channels:
        raise PipelineError(where + f"the vae's latent_channels={vae.config.latent_channels} differ from the unet's "
                            f"in_channels={c.in_channels}")


def _read_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise PipelineError(f"text-to-image pipeline {folder!r}: no model_index.json (not a diffusers pipeline "
                            f"folder); it needs the parts {list(PARTS)}")
    with open(path) as f:
        return json.load(f)


def is_text_to_image_folder(folder: str) -> bool:
    """Whether ``folder`` is a diffusers pipeline with a text encoder and a tokenizer (``model_index.json``
    naming both): what a CLI can use to route ``--diffusers DIR`` to :func:`load_text_to_image`."""
    path = os.path.join(os.fspath(folder), "model_index.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return False
    present = lambda k: isinstance(index.get(k), list) and index[k][-1] is not None  # noqa: E731
    return present("text_encoder") and present("tokenizer")


def load_text_to_image(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> TextToImagePipeline:
    """Load a diffusers text-to-image folder (``StableDiffusionPipeline`` layout) into a
    :class:`TextToImagePipeline`. :class:`PipelineError` names a missing part (in ``model_index.json`` or on
    disk), a part of an unsupported class, or parts that do not fit together."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise PipelineError(f"text-to-image pipeline {folder!r}: no such folder")
    index = _read_index(folder)
    for part in PARTS:
        entry = index.get(part)
        if entry is None or (isinstance(entry, list) and entry[-1] is None):
            raise PipelineError(f"text-to-image pipeline {folder!r}: model_index.json has no {part!r} part "
                                f"(needs {list(PARTS)})")
        if not os.path.isdir(os.path.join(folder, part)):
            raise PipelineError(f"text-to-image pipeline {folder!r}: the {part!r} part is listed in "
                                f"model_index.json but the folder {part}/ is missing")
    path = lambda part: os.path.join(folder, part)  # noqa: E731
    try:
        tokenizer = load_clip_tokenizer(path("tokenizer"), what=f"tokenizer part of {folder!r}")
    except FileNotFoundError as e:
        raise PipelineError(str(e)) from None
    text_encoder = load_clip_text_model(path("text_encoder"), dtype=dtype, param_dtype=param_dtype)
    unet_cfg = read_config(path("unet"))
    if unet_cfg.get("_class_name") != "UNet2DConditionModel":
        raise PipelineError(f"text-to-image pipeline {folder!r}: the unet part is a "
                            f"{unet_cfg.get('_class_name')!r}, expected a UNet2DConditionModel")
    size = unet_cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int):
        raise PipelineError(f"text-to-image pipeline {folder!r}: the unet config has no integer sample_size")
    unet = load_unet(path("unet"), dtype=dtype, param_dtype=param_dtype)
    vae_cfg = read_config(path("vae"))
    if vae_cfg.get("_class_name") != "AutoencoderKL":
        raise PipelineError(f"text-to-image pipeline {folder!r}: the vae part is a {vae_cfg.get('_class_name')!r}, "
                            "expected an AutoencoderKL")
    vae = load_autoencoder_kl(path("vae"), dtype=dtype, param_dtype=param_dtype)
    sched_path = os.path.join(path("scheduler"), "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise PipelineError(f"text-to-image pipeline {folder!r}: the scheduler part has no scheduler_config.json")
    with open(sched_path) as f:
        scheduler_config = json.load(f)
    try:
        process, prediction = process_from_scheduler_config(scheduler_config)
    except ValueError as e:
        raise PipelineError(f"text-to-image pipeline {folder!r}: scheduler part: {e}") from None
    return TextToImagePipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, process=process,
                               prediction=prediction, scheduler_config=scheduler_config, sample_size=size,
                               source=folder)


__all__ = ["OUTPUT_TYPES", "PARTS", "PipelineError", "TextToImagePipeline", "check_parts", "is_text_to_image_folder",
           "load_text_to_image", "scheduler_grid"]
