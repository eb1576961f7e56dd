"""Training configuration: the schema every config starts from, loading and command-line overrides.

A config file is a Python module with ``get_config(arg=None) -> ConfigDict`` that starts from
:func:`default_config` and changes values. The default is locked, so a config that sets a key the
schema lacks fails at once; :func:`validate` and :func:`apply_overrides` report such keys with the
valid ones listed.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import ConfigDict


def default_config() -> ConfigDict:
    """Every key a training config may have, with defaults (a small class-conditional pixel model)."""
    c = ConfigDict()
    c.seed = 0
    c.task = "diffusion"         # "diffusion" | "autoencoder" (the first stage of latent diffusion)

    c.data = ConfigDict(dict(
        name="digits/16",        # any TFDS image dataset prepared as array_record, or the embedded digits
        split="train",
        data_dir=None,           # None: ~/tensorflow_datasets (digits: ~/.cache/jaxdiff/tensorflow_datasets)
        image_size=16,
        channels=1,
        random_flip=False,
        crop="resize",           # "center" | "random" | "resize"
        label_key="label",       # None for unconditional data
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
    c.latent = ConfigDict(dict(          # latent diffusion: train on a frozen autoencoder's latents
        autoencoder=None,        # workdir of a finished task="autoencoder" run; None = pixel diffusion
        size=None,               # latent height/width (image_size / f), checked against the autoencoder
        channels=None,           # latent channels, checked against the autoencoder
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
        sample_every=1000,       # PNG sample grid with the EMA model; 0 = never
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


TASKS = ("diffusion", "autoencoder")


def validate(config: ConfigDict, schema: ConfigDict | None = None, prefix: str = "") -> None:
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
            validate(ConfigDict(value) if isinstance(value, dict) else value, ref, prefix + key + ".")


def load_config(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load ``path[:arg]`` (a module with ``get_config``), apply ``--config.a.b=value`` style overrides
    (``"a.b=value"`` also accepted), validate, and return it (still locked against new keys)."""
    file, _, arg = path.partition(":")
    if not os.path.exists(file):
        raise ValueError(f"config file {file!r} does not exist")
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
        except TypeError as e:
            raise ValueError(f"bad value {raw!r} for config key {dotted!r}: {e}") from None
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
