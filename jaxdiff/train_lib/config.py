"""Training configuration: the schema every config starts from, loading and command-line overrides.

A config file is a Python module with ``get_config(arg=None) -> ConfigDict`` that starts from
:func:`default_config` and changes values. The default is locked, so a config that sets a key the
schema lacks fails at once; :func:`validate` and :func:`apply_overrides` report such keys with the
valid ones listed.
"""
from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import ConfigDict


def default_config() -> ConfigDict:
    """Every key a training config may have, with defaults (a small class-conditional pixel model)."""
    c = ConfigDict()
    c.seed = 0
    c.task = "diffusion"         # "diffusion" | "autoencoder" (the first stage of latent diffusion) | "lora" | "sadm"

    c.data = ConfigDict(dict(
        name="digits/16",        # any TFDS image dataset prepared as array_record, or the embedded digits
        split="train",
        data_dir=None,           # None: ~/tensorflow_datasets (digits: ~/.cache/jaxdiff/tensorflow_datasets)
        image_size=16,
        channels=1,
        random_flip=False,
        crop="resize",           # "center" | "random" | "resize"
        label_key="label",       # None for unconditional data
        caption_key=None,        # text-conditioned runs: the feature holding captions ("captions" of captioned_digits)
        synthetic=False,         # random data of the right shape (throughput benchmarks)
    ))
    c.process = ConfigDict(dict(name="vp_cosine", kwargs=ConfigDict()))
    c.loss = ConfigDict(dict(target="v", time_sampling="uniform", weighting="simple",
                             time_params=ConfigDict(), weight_params=ConfigDict()))
    c.model = ConfigDict(dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_attention=(None, None, "self"),
        down_heads=1,
        mid_attention="self",
        norm_num_groups=8,
        resnet_time_scale_shift="default",
        dropout=0.0,
        num_classes=10,          # None: unconditional
        cross_attention_dim=None,  # text-conditioned runs: None = the text encoder's width (else must equal it)
        dtype="float32",         # compute dtype: "float32" or "bfloat16"; parameters stay float32
        remat=False,
    ))
    c.autoencoder = ConfigDict(dict(       # task="autoencoder" only (train_lib/ae_experiment.py)
        kind="kl",               # "kl" (AutoencoderKL) | "vq" (VQModel)
        block_out_channels=(32, 64, 64),   # len - 1 downsamplings: f4 here
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=8,
        mid_attention=True,
        num_vq_embeddings=256,
        rec_loss="l1",           # "l1" | "l2"
        kl_weight=1e-6,
        codebook_weight=1.0,
        perceptual_weight=0.0,   # LPIPS; needs its weights on disk (lpips_weights or $JAXDIFF_LPIPS_WEIGHTS)
        lpips_weights=None,
        disc_start=50001,        # first step with the patch-GAN terms (CompVis KL-f8: 50001)
        disc_weight=0.5,
        disc_factor=1.0,
        disc_channels=32,
        disc_layers=2,
        disc_lr=None,            # None: optim.lr
        scale_images=1024,       # training images encoded to measure the latent scale factor
    ))
    c.sadm = ConfigDict(dict(            # task="sadm" only (jaxdiff/research/sadm, docs/sadm.md)
        weight=0.1,              # weight of the structural distance in the denoiser's loss (0: DSM only)
        temperature=0.1,         # temperature of the cosine affinities
        start=0,                 # first step with the structural term and discriminator updates
        disc_lr=None,            # None: optim.lr
        disc_channels=16,        # the structure discriminator's encoder (a PatchGAN, flattened)
        disc_layers=1,
    ))
    c.latent = ConfigDict(dict(          # latent diffusion: train on a frozen autoencoder's latents
        autoencoder=None,        # workdir of a finished task="autoencoder" run; None = pixel diffusion
        size=None,               # latent height/width (image_size / f), checked against the autoencoder
        channels=None,           # latent channels, checked against the autoencoder
    ))
    c.text = ConfigDict(dict(            # text-conditioned diffusion (train_lib/text_diffusion.py)
        encoder=None,            # None: not text-conditioned; "train": a small CLIP text transformer trained with
                                 # the UNet (as LDM); else a transformers CLIPTextModel folder, kept frozen
        tokenizer="digits_words",  # "digits_words": the words of the captioned digits' training phrasings; or a
                                 # folder with CLIP's vocab.json + merges.txt
        max_length=16,           # tokens per caption ("train" encoders; a folder's tokenizer sets its own)
        width=64,                # "train" encoder: hidden size, layers, heads, MLP size, activation
        layers=2,
        heads=4,
        mlp_dim=128,
        activation="quick_gelu",
        clip_skip=0,             # condition on the output of layer L - clip_skip (through the final LayerNorm)
        caption_dropout=0.1,     # share of captions replaced by the empty caption (classifier-free guidance)
        word_dropout=0.0,        # word tokenizers: share of caption words replaced by the unknown word, and
        unknown_words=0.0,       # rate of unknown words inserted between them (train_lib/word_noise.py)
        sample_prompts=(),       # prompts of the training sample grids (cycled); () = the empty prompt
    ))
    c.lora = ConfigDict(dict(            # task="lora" only (train_lib/lora_experiment.py)
        base=None,               # the frozen base: a jaxdiff training workdir or a diffusers UNet/pipeline folder
        targets=("attention",),  # jaxdiff.nn.lora.TARGET_PRESETS names or regexes on dotted layer paths
        rank=4,
        alpha=None,              # delta scale alpha / rank; None: alpha = rank
        dropout=0.0,
        # text-conditioned bases (train_lib/lora_text.py, docs/lora.md):
        instance_prompt=None,    # the caption of every fine-tuning image, e.g. "a photo of <v1>"
        instance_filter=(),      # keep the examples with these integer features, e.g. ("label=7", "thickness=2")
        num_instance_images=0,   # ... and only the first this many of them (0: all)
        new_tokens=(),           # new tokens (textual inversion): tokenizer entries + trained token-table rows
        token_init=(),           # per new token: a word whose embedding starts its row, or "" (random); (): random
        class_prompt=None,       # DreamBooth prior preservation: images the frozen base draws from this prompt
        num_class_images=0,      # ... this many, at the start of the run (kept in <workdir>/class_images)
        prior_loss_weight=1.0,   # loss = instance loss + this * class (prior) loss
    ))
    c.cascade = ConfigDict(dict(         # super-resolution stage of a cascade (jaxdiff/cascade.py, docs/cascade.md)
        low_res_size=None,       # size of the low-res image it is conditioned on (the batch downsampled in the
                                 # step, upsampled and concatenated to the input); None = not super-resolution
        aug_min=0.0,             # Gaussian conditioning augmentation: level s ~ U[aug_min, aug_max] per example
        aug_max=0.0,             # (times of config.process; 0 = clean), fed to the UNet like the time
    ))
    c.optim = ConfigDict(dict(lr=1e-3, warmup_steps=200, schedule="cosine",   # "cosine" | "constant"
                              end_lr_factor=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                              clip_norm=1.0))
    c.train = ConfigDict(dict(
        steps=2000,
        batch_size=128,          # global batch (all hosts)
        grad_accum=1,            # micro-batches per step; batch_size must divide by it
        label_dropout=0.1,       # classifier-free guidance: share of labels replaced by the null class
        ema_decay=0.999,
        log_every=50,
        sample_every=1000,       # a PNG sample grid (EMA model) every this many steps; 0 = never
        peak_tflops=None,        # per-device peak for MFU; None = from the device kind (when known)
    ))
    c.checkpoint = ConfigDict(dict(every=500, keep=3, async_save=True, verify=True))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1))
    c.sample = ConfigDict(dict(solver="dpm_solver++", solver_kwargs=ConfigDict(), grid="uniform_logsnr",
                               steps=20, guidance_scale=None, num=100, seed=0, use_ema=True))
    c.lock()
    return c


def _keys(cfg: ConfigDict) -> list[str]:
    return sorted(cfg.keys())


TASKS = ("diffusion", "autoencoder", "lora", "sadm")   # "sadm" is built by jaxdiff.research.sadm


def check_keys(config: ConfigDict, schema: ConfigDict | None = None, prefix: str = "") -> None:
    """Raise ValueError naming any key of ``config`` that the schema (default: :func:`default_config`)
    lacks, with the valid keys at that level; free-form dicts (``*kwargs``, ``*_params``) are not checked."""
    if schema is None and config.get("task", "diffusion") not in TASKS:
        raise ValueError(f"config key 'task' must be one of {TASKS}, got {config.get('task')!r}")
    schema = default_config() if schema is None else schema
    for key in config.keys():
        if key not in schema:
            raise ValueError(f"unknown config key {prefix + key!r}; valid keys"
                             f"{' of ' + prefix.rstrip('.') if prefix else ''}: {_keys(schema)}")
        value, ref = config[key], schema[key]
        free = key.endswith("kwargs") or key.endswith("_params")
        if isinstance(ref, ConfigDict) and not free:
            if not isinstance(value, (ConfigDict, dict)):
                raise ValueError(f"config key {prefix + key!r} must be a group of keys {_keys(ref)}, got {value!r}")
            check_keys(ConfigDict(value) if isinstance(value, dict) else value, ref, prefix + key + ".")


def validate(config: ConfigDict) -> None:
    """Check a whole config before any work: every key is in the schema (:func:`check_keys`), every value
    has its key's type (:func:`check_types`), names name something that exists and numbers lie in range
    (:func:`check_values`). Raises ValueError naming the key, the value and what is accepted."""
    check_keys(config)
    check_types(config)
    check_values(config)


# keys whose default is a value but that also accept None (and what None means)
NULLABLE = {"data.label_key", "model.num_classes", "model.mid_attention", "optim.clip_norm"}
# keys whose default is None and the types they take otherwise
OPTIONAL_TYPES = {
    "data.data_dir": (str,), "train.peak_tflops": (int, float), "sample.guidance_scale": (int, float),
    "latent.autoencoder": (str,), "latent.size": (int,), "latent.channels": (int,),
    "autoencoder.lpips_weights": (str,), "autoencoder.disc_lr": (int, float), "cascade.low_res_size": (int,),
    "data.caption_key": (str,), "model.cross_attention_dim": (int,), "text.encoder": (str,),
    "lora.base": (str,), "lora.alpha": (int, float), "sadm.disc_lr": (int, float),
    "lora.instance_prompt": (str,), "lora.class_prompt": (str,),
}


def _leaves(cfg: ConfigDict, prefix: str = ""):
    for key in cfg.keys():
        value = cfg[key]
        free = key.endswith("kwargs") or key.endswith("_params")
        if isinstance(value, ConfigDict) and not free:
            yield from _leaves(value, prefix + key + ".")
        elif not free:
            yield prefix + key, value


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _type_name(types) -> str:
    return " or ".join(t.__name__ for t in types)


def check_types(config: ConfigDict, schema: ConfigDict | None = None) -> None:
    """Raise ValueError for a value whose type is not its key's (the schema default's type; an int
    stands for a float; a list for a tuple), e.g. a string where a number belongs."""
    schema = default_config() if schema is None else schema
    defaults = dict(_leaves(schema))
    for key, value in _leaves(config):
        ref = defaults.get(key)
        if ref is None:
            types = OPTIONAL_TYPES.get(key)
            if value is None or types is None:
                continue
        else:
            if value is None:
                if key in NULLABLE:
                    continue
                raise ValueError(f"config key {key!r} must be {_a(type(ref).__name__)}, got None")
            types = (float, int) if isinstance(ref, float) else (type(ref),)
        if isinstance(value, bool) and bool not in types:
            ok = False
        elif tuple in types:
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, types)
        if not ok:
            raise ValueError(f"config key {key!r} must be {_a(_type_name(types))}, got {value!r} "
                             f"({type(value).__name__})")


def _one_of(key: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"config key {key!r} must be one of {sorted(accepted)}, got {value!r}")


def _check_range(key: str, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    if value is None:
        return
    bad = ((low is not None and (value < low or (low_open and value == low)))
           or (high is not None and (value > high or (high_open and value == high))))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"config key {key!r} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


def check_values(c: ConfigDict) -> None:
    """Raise ValueError for a value out of its range or a name that names nothing (a solver, a grid, a
    noise process, a loss option, ...), including values first used late in a run, such as the sampler
    of the training sample grids."""
    from jaxdiff.data.transforms import CROPS
    from jaxdiff.losses import TIME_SAMPLERS, WEIGHTINGS
    from jaxdiff.noise import PROCESSES
    from jaxdiff.predictions import KINDS
    from jaxdiff.sampling import SamplerSettings
    from jaxdiff.train_lib.optim import SCHEDULES
    _one_of("task", c.task, TASKS)
    _one_of("data.crop", c.data.crop, CROPS)
    _one_of("process.name", c.process.name, PROCESSES)
    _one_of("loss.target", c.loss.target, KINDS)
    _one_of("loss.time_sampling", c.loss.time_sampling, TIME_SAMPLERS)
    _one_of("loss.weighting", c.loss.weighting, WEIGHTINGS)
    _one_of("model.dtype", c.model.dtype, ("float32", "bfloat16"))
    _one_of("optim.schedule", c.optim.schedule, SCHEDULES)
    _one_of("autoencoder.kind", c.autoencoder.kind, ("kl", "vq"))
    _one_of("autoencoder.rec_loss", c.autoencoder.rec_loss, ("l1", "l2"))
    for key, low in [("data.image_size", 1), ("data.channels", 1), ("train.steps", 1), ("train.batch_size", 1),
                     ("train.grad_accum", 1), ("train.log_every", 1), ("train.sample_every", 0),
                     ("checkpoint.every", 1), ("checkpoint.keep", 1), ("optim.warmup_steps", 0),
                     ("model.layers_per_block", 1), ("model.norm_num_groups", 1), ("sample.steps", 1),
                     ("sample.num", 1), ("autoencoder.scale_images", 1), ("model.num_classes", 1),
                     ("model.cross_attention_dim", 1), ("text.max_length", 3), ("text.width", 1),
                     ("text.layers", 1), ("text.heads", 1), ("text.mlp_dim", 1), ("text.clip_skip", 0),
                     ("sadm.start", 0), ("sadm.disc_channels", 1), ("sadm.disc_layers", 1)]:
        _check_range(key, _get(c, key), low)
    for key in ("optim.lr", "optim.eps", "autoencoder.disc_lr", "train.peak_tflops", "sadm.temperature",
                "sadm.disc_lr"):
        _check_range(key, _get(c, key), 0, low_open=True)
    for key in ("optim.weight_decay", "optim.end_lr_factor", "optim.clip_norm", "autoencoder.kl_weight",
                "autoencoder.perceptual_weight", "autoencoder.disc_weight", "autoencoder.codebook_weight",
                "sadm.weight"):
        _check_range(key, _get(c, key), 0)
    for key in ("optim.b1", "optim.b2"):
        _check_range(key, _get(c, key), 0, 1, high_open=True)
    _check_range("train.label_dropout", c.train.label_dropout, 0, 1, high_open=True)
    _check_range("train.ema_decay", c.train.ema_decay, 0, 1)
    _check_range("model.dropout", c.model.dropout, 0, 1, high_open=True)
    _check_range("text.caption_dropout", c.text.caption_dropout, 0, 1, high_open=True)
    _check_range("text.word_dropout", c.text.word_dropout, 0, 1, high_open=True)
    _check_range("text.unknown_words", c.text.unknown_words, 0, 1)
    if c.train.batch_size % c.train.grad_accum:
        raise ValueError(f"config key 'train.batch_size' ({c.train.batch_size}) must divide by "
                         f"'train.grad_accum' ({c.train.grad_accum})")
    if c.data.caption_key is not None and c.text.encoder is None:
        raise ValueError("config key 'data.caption_key' is set but 'text.encoder' is None: captions condition a "
                         "text-conditioned model only (set text.encoder='train' or a CLIPTextModel folder)")
    if c.task == "autoencoder" and c.train.grad_accum != 1:
        raise ValueError("config key 'train.grad_accum' must be 1 for task='autoencoder'")
    for key in ("model.block_out_channels", "autoencoder.block_out_channels"):
        channels = _get(c, key)
        if not channels or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in channels):
            raise ValueError(f"config key {key!r} must be a non-empty tuple of positive ints, got {channels!r}")
    if c.cascade.low_res_size is not None:
        check_cascade_values(c)
    if c.task == "lora":
        if not c.lora.base:
            raise ValueError("task='lora' needs a frozen base: set config key 'lora.base' to a jaxdiff training "
                             "workdir or a diffusers folder")
        from jaxdiff.nn.lora import LoRASpec
        LoRASpec(targets=tuple(c.lora.targets), rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout).check()
        check_lora_prior_values(c)
    if c.task in ("diffusion", "lora", "sadm"):
        try:
            SamplerSettings.resolve(c.sample)
        except ValueError as e:
            raise ValueError(f"config section 'sample': {e}") from None


def check_lora_prior_values(c: ConfigDict) -> None:
    """The prior-preservation keys of ``lora``: a class prompt and a class-image count together, or neither."""
    lo = c.lora
    _check_range("lora.num_class_images", lo.num_class_images, 0)
    _check_range("lora.num_instance_images", lo.num_instance_images, 0)
    _check_range("lora.prior_loss_weight", lo.prior_loss_weight, 0)
    if bool(lo.class_prompt) != bool(lo.num_class_images):
        raise ValueError("prior preservation needs both config keys 'lora.class_prompt' and 'lora.num_class_images' "
                         f"> 0 (or neither), got {lo.class_prompt!r} and {lo.num_class_images}")
    from jaxdiff.train_lib.lora_data import parse_filter
    parse_filter(lo.instance_filter)
    if lo.token_init and len(lo.token_init) != len(lo.new_tokens):
        raise ValueError(f"config key 'lora.token_init' has {len(lo.token_init)} entries for "
                         f"{len(lo.new_tokens)} new tokens: give one per token ('' for a random start) or ()")


def check_cascade_values(c: ConfigDict) -> None:
    """The ``cascade`` section of a super-resolution run: a low-res size that divides the image size, an
    augmentation range inside the process's times, a pixel-space diffusion task without training sample grids."""
    lr, size = c.cascade.low_res_size, c.data.image_size
    if c.task != "diffusion" or c.latent.autoencoder:
        raise ValueError("config key 'cascade.low_res_size' applies to pixel diffusion (task='diffusion', no latent)")
    if lr < 1 or lr >= size or size % lr:
        raise ValueError(f"config key 'cascade.low_res_size' must be smaller than and divide data.image_size "
                         f"({size}), got {lr}")
    _check_range("cascade.aug_min", c.cascade.aug_min, 0)
    _check_range("cascade.aug_max", c.cascade.aug_max, c.cascade.aug_min, 1)
    if c.train.sample_every:
        raise ValueError("config key 'train.sample_every' must be 0 for a super-resolution run (cascade.low_res_size "
                         "set): sample it in its cascade with jaxdiff-sample --cascade")


def _get(c: ConfigDict, dotted: str):
    node = c
    for name in dotted.split("."):
        node = node[name]
    return node


def shipped_configs() -> list[str]:
    """Names of the configs shipped with jaxdiff (the repository's ``configs/``, ``jaxdiff.configs``)."""
    try:
        folder = importlib.resources.files("jaxdiff.configs")
    except ModuleNotFoundError:
        return []
    return sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".py") and not p.name.startswith("_"))


def config_file(name: str) -> str:
    """The file of a config given as a path, or as the name of a shipped config (``digits``)."""
    if os.path.isfile(name):
        return name
    if os.sep not in name and not name.endswith(".py") and name in shipped_configs():
        return str(importlib.resources.files("jaxdiff.configs") / f"{name}.py")
    raise ValueError(f"config {name!r} is neither a file nor a shipped config; shipped: {shipped_configs()}")


def load_config(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load ``path[:arg]`` (a config file or shipped config name; a module with ``get_config``), apply ``--config.a.b=value`` style overrides
    (``"a.b=value"`` also accepted), validate, and return it (still locked against new keys)."""
    name, _, arg = path.partition(":")
    file = config_file(name)
    spec = importlib.util.spec_from_file_location("jaxdiff_user_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file!r} has no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (AttributeError, KeyError) as e:
        raise ValueError(f"config file {file!r} sets a key the schema lacks ({e}); "
                         f"see jaxdiff/train_lib/config.py default_config()") from None
    apply_overrides(config, overrides)
    validate(config)
    return config


def _parse_value(text: str, current: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if text in ("None", "none", "null"):
        return None
    if isinstance(current, bool) and isinstance(value, str):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        return (value,)
    return value


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Set ``a.b=value`` items (a leading ``--config.`` is stripped) in place; unknown keys raise
    ValueError listing the valid keys at that level; values are Python literals, else strings."""
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item
        if "=" not in text:
            raise ValueError(f"override {item!r} must look like --config.section.key=value")
        dotted, raw = text.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ConfigDict):
                where = ".".join(parents[:i]) or "the top level"
                raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r}; valid keys of {where}: "
                                 f"{[k for k in _keys(node) if isinstance(node[k], ConfigDict)] or _keys(node)}")
            node = node[name]
        free = parents and (parents[-1].endswith("kwargs") or parents[-1].endswith("_params"))
        if leaf not in node and not free:
            raise ValueError(f"unknown config key {dotted!r}; valid keys of "
                             f"{'.'.join(parents) or 'the top level'}: {_keys(node)}")
        value = _parse_value(raw, node[leaf] if leaf in node else None)
        try:
            with node.unlocked() if free else _nullcontext():
                node[leaf] = value
        except TypeError:
            raise ValueError(f"config key {dotted!r} must be {_a(type(node[leaf]).__name__)}, got {raw!r}") from None
    return config


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def to_dict(config: ConfigDict) -> dict:
    """Plain nested dict (tuples as lists) for JSON: what checkpoints store."""
    return ml_collections.ConfigDict(config).to_dict()


def config_from_dict(values: dict, prefix: str = "") -> ConfigDict:
    """The inverse of :func:`to_dict`: :func:`default_config` updated with ``values`` (what a checkpoint
    stored); unknown keys raise ValueError as in :func:`validate`."""
    config = default_config()
    _update(config, values, prefix)
    validate(config)
    return config


def _update(node: ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        if key not in node:
            raise ValueError(f"unknown config key {prefix + key!r}; valid keys: {_keys(node)}")
        free = key.endswith("kwargs") or key.endswith("_params")
        if isinstance(node[key], ConfigDict) and not free:
            _update(node[key], value, prefix + key + ".")
        elif free:
            with node.unlocked():
                node[key] = ConfigDict(value)
        else:
            current = node[key]
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            node[key] = value
