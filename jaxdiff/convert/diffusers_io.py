"""Load diffusers model folders into jaxdiff modules and export them back.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (read with
``safetensors.numpy``, no torch needed) or ``diffusion_pytorch_model.bin`` / a ``.pt`` state
dict (needs torch).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.configs import (autoencoder_config_from_diffusers, autoencoder_config_to_diffusers,
                                     unet_config_from_diffusers, unet_config_to_diffusers)
from jaxdiff.convert.keys import export_state_dict, load_state_dict
from jaxdiff.nn.autoencoder import AutoencoderKL
from jaxdiff.nn.unet import UNet
from jaxdiff.nn.vq import VQModel

WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_VAE_CLASSES = ("AutoencoderKL", "VQModel")


def read_config(folder: str) -> dict:
    """The parsed ``config.json`` of a diffusers model folder."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder!r}: not a diffusers model folder")
    with open(path) as f:
        return json.load(f)


def read_state_dict(folder: str) -> dict:
    """``{key: np.ndarray}`` from the folder's safetensors file (preferred) or torch ``.bin``/``.pt``."""
    st = os.path.join(folder, WEIGHTS_SAFETENSORS)
    if os.path.isfile(st):
        from safetensors.numpy import load_file
        return dict(load_file(st))
    candidates = [os.path.join(folder, WEIGHTS_BIN)] + sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".pt", ".pth")))
    for path in candidates:
        if os.path.isfile(path):
            return read_torch_checkpoint(path)
    raise FileNotFoundError(f"no {WEIGHTS_SAFETENSORS}, {WEIGHTS_BIN} or .pt file in {folder!r}")


def read_torch_checkpoint(path: str, what: str = "") -> dict:
    """``{key: np.ndarray}`` (floating tensors as float32) of a PyTorch ``.bin`` / ``.pt`` state dict, loaded
    with ``weights_only=True``; needs torch (ImportError naming the file otherwise)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what + ': ' if what else ''}{path} is a PyTorch checkpoint; install torch or convert "
                          "it to safetensors") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _class_of(cfg: dict, folder: str, allowed: tuple, loader: str) -> str:
    cls = cfg.get("_class_name")
    if cls not in allowed:
        raise ValueError(f"{loader}: {folder!r} holds a {cls!r} checkpoint, expected one of {allowed}")
    return cls


def _build(make, dropout: float):
    """Instantiate a model; without dropout RNG state, only shapes are built (weights come next)."""
    return make() if dropout > 0 else nnx.eval_shape(make)


def load_unet(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False) -> UNet:
    """Build a :class:`~jaxdiff.nn.unet.UNet` from a diffusers ``UNet2DModel`` or
    ``UNet2DConditionModel`` folder and load its weights (shape-checked)."""
    cfg = read_config(folder)
    _class_of(cfg, folder, _UNET_CLASSES, "load_unet")
    sd = read_state_dict(folder)
    c = unet_config_from_diffusers(cfg)
    model = _build(lambda: UNet(c, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)),
                   c.dropout)
    load_state_dict(model, sd, what=f"checkpoint {folder!r}")
    return model


def load_autoencoder(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False):
    """Build an :class:`~jaxdiff.nn.autoencoder.AutoencoderKL` or :class:`~jaxdiff.nn.vq.VQModel`
    (by ``_class_name``) from a diffusers folder and load its weights."""
    cfg = read_config(folder)
    _class_of(cfg, folder, _VAE_CLASSES, "load_autoencoder")
    sd = read_state_dict(folder)
    cls, c = autoencoder_config_from_diffusers(cfg)
    model_cls = AutoencoderKL if cls == "AutoencoderKL" else VQModel
    model = _build(lambda: model_cls(c, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                     rngs=nnx.Rngs(0)), 0.0)
    load_state_dict(model, sd, what=f"checkpoint {folder!r}")
    return model


def load_autoencoder_kl(folder: str, **kw) -> AutoencoderKL:
    """Like :func:`load_autoencoder` but requires an ``AutoencoderKL`` folder."""
    _class_of(read_config(folder), folder, ("AutoencoderKL",), "load_autoencoder_kl")
    return load_autoencoder(folder, **kw)


def load_vq_model(folder: str, **kw) -> VQModel:
    """Like :func:`load_autoencoder` but requires a ``VQModel`` folder."""
    _class_of(read_config(folder), folder, ("VQModel",), "load_vq_model")
    return load_autoencoder(folder, **kw)


def load_diffusers(folder: str, **kw):
    """Load any supported diffusers model folder, dispatching on ``config.json``'s ``_class_name``."""
    cls = read_config(folder).get("_class_name")
    if cls in _UNET_CLASSES:
        return load_unet(folder, **kw)
    if cls in _VAE_CLASSES:
        return load_autoencoder(folder, **kw)
    raise ValueError(f"{folder!r}: unsupported diffusers class {cls!r} "
                     f"(supported: {_UNET_CLASSES + _VAE_CLASSES})")


def diffusers_config(model) -> dict:
    """diffusers ``config.json`` content for a jaxdiff model."""
    if isinstance(model, UNet):
        return unet_config_to_diffusers(model.config)
    if isinstance(model, AutoencoderKL):
        return autoencoder_config_to_diffusers(model.config, "AutoencoderKL")
    if isinstance(model, VQModel):
        return autoencoder_config_to_diffusers(model.config, "VQModel")
    raise TypeError(f"cannot export {type(model).__name__} to diffusers")


def save_diffusers(model, folder: str) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (float32) in diffusers'
    layout, loadable with diffusers' ``<Class>.from_pretrained(folder)``."""
    from safetensors.numpy import save_file
    cfg = diffusers_config(model)
    sd = export_state_dict(model, np.float32)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(sd, os.path.join(folder, WEIGHTS_SAFETENSORS))
