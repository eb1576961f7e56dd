"""LoRA weights in the format diffusers' ``load_lora_weights`` reads and ``save_lora_weights`` writes: a
``pytorch_lora_weights.safetensors`` file with peft names ``unet.<module>.lora_A.weight`` (``(r, in)``, or
``(r, in, kh, kw)`` for convs) and ``unet.<module>.lora_B.weight`` (``(out, r)`` / ``(out, r, 1, 1)``), and
the peft ``LoraConfig`` (``r``, ``lora_alpha``, ``target_modules``) as JSON under the safetensors metadata key
``lora_adapter_metadata`` (keys prefixed ``unet.``). No torch needed.

Module names follow :mod:`jaxdiff.convert.keys` (``to_out`` -> ``to_out.0``, ``ff.geglu`` -> ``ff.net.0.proj``...).
"""
from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.keys import torch_key
from jaxdiff.nn.lora import LoRASpec, add_lora, adaptable_layers, lora_layers

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def diffusers_module_name(path: str) -> str:
    """diffusers module name of the jaxdiff layer at dotted ``path`` (e.g. ``...attn1.to_out`` -> ``...to_out.0``)."""
    return torch_key(tuple(path.split(".")) + ("kernel",))[: -len(".weight")]


def _uniform(model) -> tuple[int, float]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (add them with jaxdiff.nn.lora.add_lora)")
    ranks = {layer.lora.lora_b.shape[0] for layer in layers.values()}
    scales = {layer.scale for layer in layers.values()}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"diffusers LoRA files hold one rank and alpha; the model's adapters have ranks {ranks} "
                         f"and scales {scales}")
    return ranks.pop(), scales.pop()


def export_lora_state_dict(model: nnx.Module, prefix: str = "unet") -> tuple[dict, dict]:
    """``(state_dict, config)``: peft-named float32 arrays in PyTorch layout and the LoraConfig fields
    (``r``, ``lora_alpha``, ``target_modules``) of ``model``'s adapters."""
    rank, scale = _uniform(model)
    sd, targets = {}, []
    pre = f"{prefix}." if prefix else ""
    for path, layer in lora_layers(model).items():
        name = diffusers_module_name(path)
        targets.append(name)
        a = np.asarray(layer.lora.lora_a[...], np.float32)
        b = np.asarray(layer.lora.lora_b[...], np.float32)
        if a.ndim == 2:          # dense: (in, r), (r, out)
            sd[f"{pre}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
            sd[f"{pre}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        else:                    # conv: (kh, kw, in, r), 1x1 (r, out)
            sd[f"{pre}{name}.lora_A.weight"] = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
            sd[f"{pre}{name}.lora_B.weight"] = np.ascontiguousarray(b.T[:, :, None, None])
    return sd, {"r": rank, "lora_alpha": scale * rank, "target_modules": targets}


def save_lora_diffusers(model: nnx.Module, path: str, *, prefix: str = "unet") -> str:
    """Write ``model``'s adapters to ``path`` (a folder gets ``pytorch_lora_weights.safetensors``); returns the
    file. diffusers reads it with ``pipe.load_lora_weights(folder)`` or ``unet.load_lora_adapter(folder,
    prefix="unet")``. Raises ValueError when there are no adapters or their ranks/scales differ."""
    from safetensors.numpy import save_file
    sd, config = export_lora_state_dict(model, prefix)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, LORA_WEIGHTS)
    pre = f"{prefix}." if prefix else ""
    meta = {f"{pre}{k}": v for k, v in config.items()}
    save_file(sd, path, metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path


def read_lora_file(path: str) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of a diffusers LoRA safetensors file (or a folder holding
    ``pytorch_lora_weights.safetensors``); ``metadata`` is the parsed ``lora_adapter_metadata`` ({} if absent)."""
    from safetensors import safe_open
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA weights file {path!r}")
    with safe_open(path, "np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    return sd, json.loads(meta.get(METADATA_KEY, "{}"))


def _parse(sd: dict, meta: dict, prefix: str, what: str) -> tuple[dict, int, float]:
    pre = f"{prefix}." if prefix else ""
    modules: dict[str, dict] = {}
    foreign = []
    for k, v in sd.items():
        m = _KEY.match(k[len(pre):]) if k.startswith(pre) else None
        if m is None:
            foreign.append(k)
            continue
        modules.setdefault(m["module"], {})[m["ab"]] = np.asarray(v)
    if not modules:
        raise ValueError(f"{what}: no peft LoRA keys '{pre}<module>.lora_A.weight' found "
                         f"(keys look like: {', '.join(list(sd)[:4])})")
    half = [k for k, ab in modules.items() if len(ab) != 2]
    if half:
        raise ValueError(f"{what}: modules with only one of lora_A / lora_B: {half[:5]}")
    ranks = {ab["A"].shape[0] for ab in modules.values()}
    if len(ranks) > 1:
        raise ValueError(f"{what}: adapters of different ranks {sorted(ranks)} are not supported")
    rank = ranks.pop()
    rank_meta = meta.get(f"{pre}r", rank)
    if rank_meta != rank:
        raise ValueError(f"{what}: metadata says rank {rank_meta} but the weights have rank {rank}")
    if meta.get(f"{pre}use_rslora") or meta.get(f"{pre}use_dora") or meta.get(f"{pre}alpha_pattern"):
        raise ValueError(f"{what}: rsLoRA, DoRA and per-layer alpha patterns are not supported")
    alpha = float(meta.get(f"{pre}lora_alpha", rank))
    return modules, rank, alpha


def load_lora_diffusers(model: nnx.Module, path: str, *, prefix: str = "unet", rngs: nnx.Rngs | None = None,
                        what: str | None = None) -> list[str]:
    """Load a diffusers/peft LoRA file into ``model`` in place; returns the dotted paths of the adapted layers.

    Adapters are added (rank and ``alpha`` from the file's metadata; ``alpha = rank`` without it) unless the
    model already has exactly these adapters, which are then overwritten. Everything is checked before
    anything is written: ValueError names modules that this model does not have (a file for another
    architecture), shape mismatches and rank mismatches.
    """
    what = what or f"LoRA file {path!r}"
    sd, meta = read_lora_file(path)
    modules, rank, alpha = _parse(sd, meta, prefix, what)
    by_name = {diffusers_module_name(k): (k, layer) for k, layer in adaptable_layers(model).items()}
    unknown = sorted(m for m in modules if m not in by_name)
    if unknown:
        raise ValueError(f"{what} does not fit this {type(model).__name__}: {len(unknown)} of {len(modules)} "
                         f"modules do not exist here, e.g. {unknown[:4]} (a LoRA for another architecture?)")
    staged, bad = {}, []
    for name, ab in modules.items():
        path_k, layer = by_name[name]
        kshape = tuple(layer.kernel.shape)
        if len(kshape) == 2:
            want_a, want_b = (rank, kshape[0]), (kshape[1], rank)
            conv = lambda a, b: (a.T, b.T)
        else:
            want_a, want_b = (rank, kshape[2], kshape[0], kshape[1]), (kshape[3], rank, 1, 1)
            conv = lambda a, b: (a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T)
        got_a, got_b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if got_a != want_a or got_b != want_b:
            bad.append(f"{name}: lora_A {got_a} / lora_B {got_b}, the model needs {want_a} / {want_b}")
            continue
        staged[path_k] = conv(ab["A"], ab["B"])
    if bad:
        raise ValueError(f"{what}: shape mismatch (another architecture or rank?):\n  " + "\n  ".join(bad[:10]))
    existing = lora_layers(model)
    if any(layer.merged for layer in existing.values()):
        raise ValueError(f"{what}: the model's adapters are merged into its weights; unmerge_lora first")
    if existing:
        if set(existing) != set(staged):
            raise ValueError(f"{what}: the model already has adapters on other layers "
                             f"({len(existing)} adapted, the file has {len(staged)}); strip them first")
        r_have = {layer.lora.lora_b.shape[0] for layer in existing.values()}
        if r_have != {rank}:
            raise ValueError(f"{what}: rank {rank} but the model's adapters have rank {r_have}")
        for layer in existing.values():
            layer.scale = alpha / rank
    else:
        spec = LoRASpec(targets=tuple(re.escape(k) for k in staged), rank=rank, alpha=alpha)
        add_lora(model, spec, rngs=rngs or nnx.Rngs(0))
    layers = lora_layers(model)
    for k, (a, b) in staged.items():
        va, vb = layers[k].lora.lora_a, layers[k].lora.lora_b
        va[...] = jnp.asarray(a, va.dtype)
        vb[...] = jnp.asarray(b, vb.dtype)
    return sorted(staged)
