"""transformers' ``CLIPTextModel`` folders (``config.json`` + ``model.safetensors``, a pipeline's
``text_encoder/``) <-> :class:`jaxdiff.nn.clip_text.CLIPTextModel`.

Key mapping (transformers -> jaxdiff): ``[text_model.]embeddings.{token,position}_embedding.weight`` ->
``embeddings.*.embedding``; ``[text_model.]encoder.layers.{i}.self_attn.{q,k,v,out}_proj`` ->
``layers[i].self_attn.to_{q,k,v,out}`` (kernels transposed); ``layer_norm{1,2}``, ``mlp.fc{1,2}`` and
``final_layer_norm`` keep their names. Checkpoints with and without the ``text_model.`` prefix (transformers
4 and 5) both load; exports carry the prefix, as published Stable Diffusion checkpoints do. Weights are read
with ``safetensors.numpy`` (no torch needed); a ``pytorch_model.bin`` needs torch.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.configs import UnsupportedConfigError
from jaxdiff.convert.diffusers_io import read_torch_checkpoint
from jaxdiff.convert.keys import copy_state_dict, to_torch_layout
from jaxdiff.nn.clip_text import ACTIVATIONS, CLIPTextConfig, CLIPTextModel

WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_BIN = "pytorch_model.bin"
PREFIX = "text_model."
_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_RENAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# buffers and heads that do not belong to the text transformer
_IGNORED_KEYS = ("embeddings.position_ids", "text_projection.weight")


def clip_text_config_from_transformers(cfg: dict, what: str = "text encoder") -> CLIPTextConfig:
    """:class:`CLIPTextConfig` from a transformers ``CLIPTextConfig`` dict (``config.json``).

    Raises :class:`~jaxdiff.convert.configs.UnsupportedConfigError` naming the field for other model types or
    settings jaxdiff does not implement."""
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise UnsupportedConfigError(f"{what}: expected a CLIP text model config (model_type 'clip_text_model'), "
                                     f"got model_type={model_type!r}")
    arch = cfg.get("architectures") or ["CLIPTextModel"]
    if not set(arch) & set(_CLASSES):
        raise UnsupportedConfigError(f"{what}: unsupported architectures {arch} (supported: {list(_CLASSES)})")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise UnsupportedConfigError(f"{what}: unsupported hidden_act={act!r} (supported: {sorted(ACTIVATIONS)})")
    eos = cfg.get("eos_token_id", 49407)
    if isinstance(eos, list):
        if len(eos) != 1:
            raise UnsupportedConfigError(f"{what}: several eos_token_id {eos} are not supported")
        eos = eos[0]
    try:
        return CLIPTextConfig(
            vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 512),
            intermediate_size=cfg.get("intermediate_size", 2048), num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 8),
            max_position_embeddings=cfg.get("max_position_embeddings", 77), hidden_act=act,
            layer_norm_eps=float(cfg.get("layer_norm_eps") or 1e-5), eos_token_id=int(eos),
            bos_token_id=cfg.get("bos_token_id", 49406), pad_token_id=cfg.get("pad_token_id", 1))
    except ValueError as e:
        raise UnsupportedConfigError(f"{what}: {e}") from None


def clip_text_config_to_transformers(c: CLIPTextConfig) -> dict:
    """transformers ``config.json`` content for a :class:`CLIPTextConfig` (``CLIPTextModel``)."""
    return dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=c.vocab_size,
                hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, max_position_embeddings=c.max_position_embeddings,
                hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, eos_token_id=c.eos_token_id,
                bos_token_id=c.bos_token_id, pad_token_id=c.pad_token_id,
                attention_dropout=0.0, torch_dtype="float32")


def torch_key(path: tuple, prefix: str = PREFIX) -> str:
    """transformers state-dict key of the :class:`CLIPTextModel` parameter at ``path``."""
    *mods, leaf = [str(p) for p in path]
    mods = [_RENAMES.get(m, m) for m in mods]
    if mods and mods[0] == "layers":
        mods = ["encoder"] + mods
    return prefix + ".".join(mods + [_LEAVES[leaf]])


def param_table(model: CLIPTextModel, prefix: str = PREFIX) -> dict:
    """``{transformers_key: (path, nnx.Variable)}`` for every parameter of ``model``."""
    return {torch_key(path, prefix): (path, var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_clip_text_state_dict(model: CLIPTextModel, sd: dict, *, what: str = "text encoder checkpoint") -> None:
    """Copy a transformers ``CLIPTextModel`` state dict (``{key: np.ndarray}``, with or without the
    ``text_model.`` prefix) into ``model``; :class:`~jaxdiff.convert.keys.CheckpointMismatchError` lists
    missing, unexpected and mis-shaped keys, and nothing is written unless all fit."""
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}
    copy_state_dict(param_table(model, prefix=""), sd, what)


def export_clip_text_state_dict(model: CLIPTextModel, dtype=np.float32, prefix: str = PREFIX) -> dict:
    """transformers-layout state dict ``{key: np.ndarray}`` of ``model``."""
    return {k: np.ascontiguousarray(to_torch_layout(str(path[-1]), np.asarray(var.get_value(), dtype=dtype)))
            for k, (path, var) in param_table(model, prefix).items()}


def read_transformers_config(folder: str, what: str = "text encoder") -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no config.json in {folder!r}: not a transformers model folder")
    with open(path) as f:
        return json.load(f)


def read_transformers_state_dict(folder: str, what: str = "text encoder") -> dict:
    """``{key: np.ndarray}`` from ``model.safetensors`` (or its sharded index) or ``pytorch_model.bin``."""
    from safetensors.numpy import load_file
    st = os.path.join(folder, WEIGHTS_SAFETENSORS)
    if os.path.isfile(st):
        return dict(load_file(st))
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(folder, name)))
        return sd
    binary = os.path.join(folder, WEIGHTS_BIN)
    if os.path.isfile(binary):
        return read_torch_checkpoint(binary, what)
    raise FileNotFoundError(f"{what}: no {WEIGHTS_SAFETENSORS}, {WEIGHTS_INDEX} or {WEIGHTS_BIN} in {folder!r}")


def load_clip_text_model(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPTextModel:
    """A :class:`~jaxdiff.nn.clip_text.CLIPTextModel` from a transformers ``CLIPTextModel`` folder (a
    pipeline's ``text_encoder/``): config mapped, weights loaded and shape-checked."""
    what = f"text encoder {folder!r}"
    c = clip_text_config_from_transformers(read_transformers_config(folder, what), what)
    sd = read_transformers_state_dict(folder, what)
    model = nnx.eval_shape(lambda: CLIPTextModel(c, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    load_clip_text_state_dict(model, sd, what=f"checkpoint of {what}")
    return model


def save_clip_text_model(model: CLIPTextModel, folder: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` (float32, ``text_model.`` keys), loadable with
    transformers' ``CLIPTextModel.from_pretrained(folder)``."""
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(clip_text_config_to_transformers(model.config), f, indent=2)
    save_file(export_clip_text_state_dict(model), os.path.join(folder, WEIGHTS_SAFETENSORS),
              metadata={"format": "pt"})


__all__ = ["clip_text_config_from_transformers", "clip_text_config_to_transformers", "export_clip_text_state_dict",
           "load_clip_text_model", "load_clip_text_state_dict", "param_table", "read_transformers_state_dict",
           "save_clip_text_model", "torch_key"]
