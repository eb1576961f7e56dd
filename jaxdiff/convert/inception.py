"""Load pytorch-fid's FID Inception weights into :class:`jaxdiff.nn.inception.InceptionV3FID`.

The weight file is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a PyTorch state dict of
torchvision's ``Inception3`` with the FID blocks, 1008 classes, no aux head). jaxdiff never
downloads it: pass its local path, or set ``JAXDIFF_INCEPTION_WEIGHTS``.

Key mapping: the NNX variable at ``Mixed_6b.branch7x7_2.conv.kernel`` is the state-dict entry
``Mixed_6b.branch7x7_2.conv.weight`` (``OIHW -> HWIO``); ``bn.scale/bias/mean/var`` are
``bn.weight/bias/running_mean/running_var``; ``fc.kernel`` is ``fc.weight`` transposed.
BatchNorm's ``num_batches_tracked`` counters are ignored.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from jaxdiff.convert.keys import copy_state_dict
from jaxdiff.nn.inception import InceptionV3FID

WEIGHTS_ENV = "JAXDIFF_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


def _missing_file_message(path: str | None) -> str:
    where = f"{path!r} does not exist" if path else f"no path given and ${WEIGHTS_ENV} is not set"
    return (f"FID Inception weights not found: {where}. jaxdiff does not download weights. Get "
            f"{WEIGHTS_FILENAME} (pytorch-fid's converted TF 2015-12-05 Inception) from {WEIGHTS_URL} "
            f"or from the torch hub cache of a pytorch-fid install (~/.cache/torch/hub/checkpoints/), "
            f"then pass its path to load_inception_fid(path) or set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILENAME}.")


def resolve_weights_path(path: str | os.PathLike | None = None) -> str:
    """The local weight file to read: ``path`` if given, else ``$JAXDIFF_INCEPTION_WEIGHTS``.

    Raises ``FileNotFoundError`` (saying where to get the file and where to put it) when neither
    names an existing file; a directory is searched for ``pt_inception-2015-12-05-6726825d.pth``.
    """
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            path = os.path.join(path, WEIGHTS_FILENAME)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path))
    return path


def read_inception_state_dict(path: str) -> dict:
    """``{key: np.ndarray}`` from a PyTorch ``.pth`` state dict (needs torch; ``weights_only`` load).

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}``; a ``module.`` prefix
    (``DataParallel``) is stripped."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (pip install torch): it is a PyTorch .pth file") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable PyTorch state-dict file: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "numpy") for v in sd.values()):
        raise ValueError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        v = v.detach().cpu()
        out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
    return out


def inception_variable_table(model: InceptionV3FID) -> dict:
    """``{torch_key: (path, nnx.Variable)}`` for every parameter and BatchNorm statistic of ``model``."""
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        *mods, leaf = [str(p) for p in path]
        table[".".join(mods + [_LEAF_TO_TORCH[leaf]])] = (path, var)
    return table


def load_inception_state_dict(model: InceptionV3FID, sd: dict, *, what: str = "Inception checkpoint") -> None:
    """Copy a pytorch-fid Inception state dict (``{key: np.ndarray}``) into ``model`` in place.

    Raises :class:`~jaxdiff.convert.keys.CheckpointMismatchError` (a ``ValueError``) listing
    missing / unexpected keys and shape mismatches; nothing is written unless everything fits.
    ``num_batches_tracked`` entries are ignored; ``AuxLogits.*`` entries (torchvision's auxiliary
    head, absent from pytorch-fid's file) are reported as unexpected.
    """
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    copy_state_dict(inception_variable_table(model), sd, what)


def load_inception_fid(path: str | os.PathLike | None = None, *, dtype=jnp.float32, precision=None
                       ) -> InceptionV3FID:
    """Build :class:`~jaxdiff.nn.inception.InceptionV3FID` with pytorch-fid's FID weights.

    ``path``: the local ``pt_inception-2015-12-05-6726825d.pth`` (or a folder holding it); when
    ``None``, ``$JAXDIFF_INCEPTION_WEIGHTS`` is used. Nothing is downloaded: a missing file raises
    ``FileNotFoundError`` saying where to get it. Keys and shapes are checked
    (:class:`~jaxdiff.convert.keys.CheckpointMismatchError` on any mismatch).
    """
    path = resolve_weights_path(path)
    sd = read_inception_state_dict(path)
    model = nnx.eval_shape(lambda: InceptionV3FID(dtype=dtype, precision=precision, rngs=None))
    load_inception_state_dict(model, sd, what=f"Inception checkpoint {path!r}")
    return model
