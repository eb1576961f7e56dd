"""Parameter naming and layout between jaxdiff NNX modules and diffusers PyTorch state dicts.

jaxdiff mirrors diffusers' module tree, so a parameter path such as
``("down_blocks", 0, "resnets", 1, "conv1", "kernel")`` maps to ``down_blocks.0.resnets.1.conv1.weight``
after a few renames (``downsampler`` -> ``downsamplers.0``, ``to_out`` -> ``to_out.0``,
``ff.geglu`` -> ``ff.net.0.proj``, ``ff.out`` -> ``ff.net.2``; ``kernel/scale/embedding`` -> ``weight``).
Convolution kernels go ``OIHW <-> HWIO``; dense kernels are transposed.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

_SEGMENT_RENAMES = [  # (jaxdiff, diffusers), applied on dotted paths wrapped in dots
    (".downsampler.", ".downsamplers.0."),
    (".upsampler.", ".upsamplers.0."),
    (".to_out.", ".to_out.0."),
    (".ff.geglu.", ".ff.net.0.proj."),
    (".ff.out.", ".ff.net.2."),
]
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Old diffusers / CompVis attention names -> current names.
_LEGACY = [(re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"),
           (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
           (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
           (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1")]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, missing, unexpected, shape_mismatches, what="checkpoint", matched: int = -1):
        self.missing, self.unexpected, self.shape_mismatches = missing, unexpected, shape_mismatches
        lines = [f"{what} does not match the model:"]
        if unexpected and matched == 0:
            lines.append("  no parameter name matches: this looks like a checkpoint of a different architecture")
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        for k, want, got in shape_mismatches[:20]:
            lines.append(f"  shape mismatch {k}: model expects {want}, checkpoint has {got}")
        super().__init__("\n".join(lines))


def torch_key(path: tuple) -> str:
    """diffusers state-dict key of the NNX parameter at ``path`` (tuple of str/int)."""
    *mods, leaf = [str(p) for p in path]
    dotted = "." + ".".join(mods) + "."
    for a, b in _SEGMENT_RENAMES:
        dotted = dotted.replace(a, b)
    return dotted[1:] + _LEAF_RENAMES[leaf]


def normalize_legacy_keys(sd: dict) -> dict:
    """Rename old attention keys (``query/key/value/proj_attn``) to ``to_q/to_k/to_v/to_out.0``."""
    out = {}
    for k, v in sd.items():
        for pat, rep in _LEGACY:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def to_jax_layout(leaf: str, arr: np.ndarray, want_shape: tuple) -> np.ndarray:
    """Convert a PyTorch tensor (numpy) to the jaxdiff layout of a parameter named ``leaf``."""
    if leaf == "kernel" and len(want_shape) == 4:
        return arr.transpose(2, 3, 1, 0)          # OIHW -> HWIO
    if leaf == "kernel" and len(want_shape) == 2:
        if arr.ndim == 4 and arr.shape[2:] == (1, 1):   # legacy 1x1-conv attention projections
            arr = arr[:, :, 0, 0]
        return arr.T                               # (out, in) -> (in, out)
    return arr


def to_torch_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_jax_layout`."""
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def expected_shape_torch(leaf: str, shape: tuple) -> tuple:
    """PyTorch shape of a parameter with jaxdiff ``shape``."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def param_table(model: nnx.Module) -> dict:
    """``{diffusers_key: (path, nnx.Variable)}`` for every parameter of ``model`` (LoRA adapter weights,
    ``nnx.LoRAParam``, excepted: :mod:`jaxdiff.convert.lora` handles them)."""
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        table[torch_key(path)] = (path, var)
    return table


def load_state_dict(model: nnx.Module, sd: dict, *, what: str = "checkpoint") -> None:
    """Copy a diffusers state dict (``{key: np.ndarray}``) into ``model`` in place.

    Raises :class:`CheckpointMismatchError` listing missing / unexpected keys and shape
    mismatches; nothing is written unless everything fits.
    """
    copy_state_dict(param_table(model), normalize_legacy_keys(sd), what)


def copy_state_dict(table: dict, sd: dict, what: str) -> None:
    """Copy the PyTorch-layout arrays of ``sd`` into the variables of ``table``
    (``{key: (path, nnx.Variable)}``), each converted to the jaxdiff layout (a 1x1 conv kernel also
    fills a linear layer, as diffusers' attention checkpoints store them). All keys and shapes are checked
    first: :class:`CheckpointMismatchError` lists every problem and nothing is written unless all fit."""
    missing = sorted(k for k in table if k not in sd)
    unexpected = sorted(k for k in sd if k not in table)
    bad, staged = [], {}
    for k, (path, var) in table.items():
        if k not in sd:
            continue
        leaf = str(path[-1])
        want = tuple(var.get_value().shape)
        arr = np.asarray(sd[k])
        if leaf == "kernel" and len(want) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]
        if tuple(arr.shape) != expected_shape_torch(leaf, want):
            bad.append((k, expected_shape_torch(leaf, want), tuple(arr.shape)))
            continue
        staged[k] = to_jax_layout(leaf, arr, want)
    if missing or unexpected or bad:
        raise CheckpointMismatchError(missing, unexpected, bad, what, matched=len(staged))
    for k, (path, var) in table.items():
        var.set_value(jnp.asarray(np.asarray(staged[k], dtype=var.get_value().dtype)))


def export_state_dict(model: nnx.Module, dtype=np.float32) -> dict:
    """diffusers-layout state dict ``{key: np.ndarray}`` of ``model``'s parameters."""
    out = {}
    for k, (path, var) in param_table(model).items():
        out[k] = np.ascontiguousarray(to_torch_layout(str(path[-1]), np.asarray(var.get_value(), dtype=dtype)))
    return out
