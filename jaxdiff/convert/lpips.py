"""Load LPIPS (VGG16) weights from local files into :class:`jaxdiff.nn.lpips.LPIPS`.

Two files, neither bundled and never downloaded by jaxdiff:

* the VGG16 trunk: torchvision's ImageNet ``vgg16`` state dict, ``vgg16-397923af.pth`` (keys
  ``features.{i}.weight/bias``; the ``classifier.*`` entries are ignored). A state dict of a whole
  ``lpips.LPIPS(net="vgg")`` (keys ``net.slice{k}.{i}.weight``) is accepted too;
* the linear calibration layers: the lpips package's ``weights/v0.1/vgg.pth`` (keys
  ``lin{k}.model.1.weight``, shape ``(1, C, 1, 1)``; it ships inside the ``lpips`` wheel). taming's
  ``vgg_lpips`` checkpoint has the same keys.

Key mapping: ``convs[j]`` of :class:`~jaxdiff.nn.lpips.VGG16Features` is torchvision's
``features[VGG16_CONV_INDICES[j]]`` (``OIHW -> HWIO``); ``lins[k].kernel (1, 1, C, 1)`` is
``lin{k}.model.1.weight`` transposed the same way.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.convert.inception import read_inception_state_dict
from jaxdiff.convert.keys import CheckpointMismatchError
from jaxdiff.nn.lpips import LPIPS, VGG16_WIDTHS

WEIGHTS_ENV = "JAXDIFF_LPIPS_WEIGHTS"
VGG_FILENAME = "vgg16-397923af.pth"
LIN_FILENAME = "vgg.pth"
#: indices of the 13 convs inside torchvision's ``vgg16().features`` (ReLUs and max-pools in between)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# lpips.pretrained_networks.vgg16 slices torchvision's features at these boundaries
_SLICE_STARTS = (0, 4, 9, 16, 23)


def _missing(what: str, filename: str, path: str | None, source: str) -> FileNotFoundError:
    where = f"{path!r} does not exist" if path else f"no path given and ${WEIGHTS_ENV} is not set"
    return FileNotFoundError(
        f"LPIPS {what} not found: {where}. jaxdiff never downloads weights. Put {filename} ({source}) "
        f"in a folder and set {WEIGHTS_ENV}=/that/folder, or pass the file's path to "
        f"load_lpips(vgg_path=..., lin_path=...).")


def _resolve(path, filename: str, what: str, source: str) -> str:
    if path is None:
        folder = os.environ.get(WEIGHTS_ENV) or None
        path = os.path.join(os.path.expanduser(folder), filename) if folder else None
    else:
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            path = os.path.join(path, filename)
    if path is None or not os.path.isfile(path):
        raise _missing(what, filename, path, source)
    return path


def _torch_conv_key(sd: dict, j: int) -> str:
    """The state-dict prefix of VGG conv ``j`` (torchvision or whole-LPIPS naming)."""
    idx = VGG16_CONV_INDICES[j]
    if f"features.{idx}.weight" in sd or "net.slice1.0.weight" not in sd:
        return f"features.{idx}"
    stage = max(k for k, start in enumerate(_SLICE_STARTS) if idx >= start)
    return f"net.slice{stage + 1}.{idx}"


def vgg_lin_table(model: LPIPS, sd: dict) -> dict:
    """``{torch_key: nnx.Variable}`` for every parameter of ``model`` under ``sd``'s naming."""
    table = {}
    for j, conv in enumerate(model.net.convs):
        prefix = _torch_conv_key(sd, j)
        table[f"{prefix}.weight"] = conv.kernel
        table[f"{prefix}.bias"] = conv.bias
    for k, lin in enumerate(model.lins):
        key = f"lin{k}.model.1.weight"
        if key not in sd and f"lin{k}.model.0.weight" in sd:   # saved without the dropout layer
            key = f"lin{k}.model.0.weight"
        table[key] = lin.kernel
    return table


def load_lpips_state_dict(model: LPIPS, sd: dict, *, what: str = "LPIPS weights") -> None:
    """Copy a ``{torch_key: np.ndarray}`` state dict (VGG16 trunk and lins, merged) into ``model``.

    Raises :class:`~jaxdiff.convert.keys.CheckpointMismatchError` listing missing keys and shape
    mismatches (nothing is written unless everything fits) and ``ValueError`` for negative lin weights
    (LPIPS's calibration layers are non-negative). Extra keys (``classifier.*``, LPIPS's
    ``scaling_layer`` buffers) are ignored.
    """
    table = vgg_lin_table(model, sd)
    missing = sorted(k for k in table if k not in sd)
    bad, staged = [], {}
    for k, var in table.items():
        if k not in sd:
            continue
        shape = tuple(var.get_value().shape)
        want = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
        arr = np.asarray(sd[k], np.float32)
        if tuple(arr.shape) != want:
            bad.append((k, want, tuple(arr.shape)))
            continue
        staged[k] = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr
    if missing or bad:
        raise CheckpointMismatchError(missing, [], bad, what, matched=len(staged))
    for k in table:
        if k.startswith("lin") and float(staged[k].min()) < 0:
            raise ValueError(f"{what}: {k} has negative entries (min {staged[k].min():.3g}); LPIPS's linear "
                             "layers are non-negative: is this an LPIPS vgg.pth file?")
    for k, var in table.items():
        var.set_value(jnp.asarray(staged[k], dtype=var.get_value().dtype))


def load_lpips(vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None, *,
               dtype=jnp.float32) -> LPIPS:
    """:class:`~jaxdiff.nn.lpips.LPIPS` (VGG16) with weights read from local PyTorch files.

    Args:
      vgg_path: torchvision's ``vgg16-397923af.pth`` (or a folder holding it); default
        ``$JAXDIFF_LPIPS_WEIGHTS/vgg16-397923af.pth``.
      lin_path: the lpips package's ``weights/v0.1/vgg.pth`` (or a folder holding it); default
        ``$JAXDIFF_LPIPS_WEIGHTS/vgg.pth``.

    Raises ``FileNotFoundError`` naming the file, where to put it and that jaxdiff never downloads;
    ``ImportError`` when torch (needed to read ``.pth``) is missing.
    """
    vgg = _resolve(vgg_path, VGG_FILENAME, "VGG16 trunk",
                   "torchvision's ImageNet VGG16 weights, found in ~/.cache/torch/hub/checkpoints/ after "
                   "any torchvision vgg16(weights='IMAGENET1K_V1') call")
    lin = _resolve(lin_path, LIN_FILENAME, "linear layers",
                   "the lpips package's lpips/weights/v0.1/vgg.pth, shipped inside `pip install lpips`")
    sd = dict(read_inception_state_dict(vgg))
    sd.update(read_inception_state_dict(lin))
    model = LPIPS(VGG16_WIDTHS, dtype=dtype, rngs=nnx.Rngs(0))
    load_lpips_state_dict(model, sd, what=f"LPIPS weights ({vgg} + {lin})")
    return model


__all__ = ["LIN_FILENAME", "VGG16_CONV_INDICES", "VGG_FILENAME", "WEIGHTS_ENV", "load_lpips",
           "load_lpips_state_dict", "vgg_lin_table"]
