"""The three spatial operations of a UNet, computed on one row patch inside ``shard_map`` (DistriFusion §4).

Every function here runs per device on its patch of rows ``(B, H/N, W, C)`` and talks to the other patches
through a :class:`PatchComm`, which decides for the current step whether an exchange is

* ``"sync"``: issued and consumed now (exact: equals the one-device model);
* ``"stale"``: consumed from the previous step's exchange (``PatchComm.stale``) while this step's fresh
  values are issued for the next step (``PatchComm.new_state``): the displaced patch parallelism of the paper;
* ``"naive"``: not made at all (each patch alone: zero padding at its edges, local statistics, local keys).

The operations (as in the official code, mit-han-lab/distrifuser ``modules/pp``):

* :func:`halo_conv`: a convolution with ``k > 1`` needs ``padding`` rows of its neighbours (the halo),
  moved with ``ppermute`` between neighbouring devices;
* :func:`patch_group_norm`: GroupNorm needs the whole image's per-group moments ``E[x], E[x^2]``
  (``pmean``); after warm-up the *corrected* asynchronous estimate of paper eq. 2;
* :func:`patch_kv`: self-attention needs all patches' keys and values (``all_gather`` along tokens).

Pointwise layers (1x1 convolutions, linears, LayerNorm, cross-attention to a text context) need nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff.nn.layers import Conv2d, GroupNorm, conv2d

PHASES = ("sync", "stale", "naive")
GN_MODES = ("corrected", "stale", "separate", "sync")


class PatchComm:
    """Per-trace exchange book-keeping of one patch-parallel forward (a plain Python object, made per call).

    Args:
      axis: the mesh axis name the patches are split over; ``n``: its size.
      phase: ``"sync"``, ``"stale"`` or ``"naive"`` (see the module docstring).
      gn_mode: GroupNorm after warm-up: ``"corrected"`` (paper eq. 2), ``"stale"`` (own entry replaced by the
        fresh local moments, no correction), ``"separate"`` (local moments only), ``"sync"`` (exact all-reduce).
      stale: phase ``"stale"``: the list of exchanged tensors of the previous step, in the order the layers
        registered them (the same order :attr:`new_state` is filled in).
      log: optional list; every exchange appends ``(kind, collective, per-device shape, dtype)`` and every
        place a tensor-parallel UNet would all-reduce appends ``("tp", "all-reduce", full shape, dtype)``.

    Attributes:
      new_state: the exchanged tensors of this step (phases ``sync``/``stale``), the next step's ``stale``.
    """

    def __init__(self, axis: str, n: int, phase: str, gn_mode: str = "corrected", stale=None, log=None):
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if gn_mode not in GN_MODES:
            raise ValueError(f"GroupNorm mode must be one of {GN_MODES}, got {gn_mode!r}")
        if phase == "stale" and stale is None:
            raise ValueError("phase 'stale' needs the previous step's exchanged tensors (stale=)")
        self.axis, self.n, self.phase, self.gn_mode = axis, n, phase, gn_mode
        self._stale = list(stale) if stale is not None else None
        self._cursor = 0
        self.new_state: list = []
        self.log = log

    def index(self) -> jax.Array:
        """This device's patch index (row block), a traced int."""
        return lax.axis_index(self.axis)

    def take_stale(self):
        """The next entry of the previous step's exchanges (phase ``"stale"``)."""
        if self._cursor >= len(self._stale):
            raise ValueError("the stale state has fewer entries than the layers that read it: it was made "
                             "for a different model or input shape")
        item = self._stale[self._cursor]
        self._cursor += 1
        return item

    def record(self, kind: str, collective: str, x) -> None:
        """Append an exchange to :attr:`log` (if logging)."""
        if self.log is not None and x is not None:
            self.log.append((kind, collective, tuple(x.shape), str(x.dtype)))

    def note_tp(self, x_local) -> None:
        """Log where a tensor-parallel UNet would all-reduce the full activation of which ``x_local`` is a patch."""
        if self.log is not None:
            shape = (x_local.shape[0], x_local.shape[1] * self.n) + tuple(x_local.shape[2:])
            self.log.append(("tp", "all-reduce", shape, str(x_local.dtype)))


def _shift(comm: PatchComm, x: jax.Array | None, down: bool) -> jax.Array | None:
    """``x`` of device i arrives at device i+1 (``down``) or i-1; the edge device receives zeros."""
    if x is None:
        return None
    n = comm.n
    perm = [(i, i + 1) for i in range(n - 1)] if down else [(i + 1, i) for i in range(n - 1)]
    comm.record("halo", "collective-permute", x)
    return lax.ppermute(x, comm.axis, perm)


def _conv_valid_rows(conv: Conv2d, x: jax.Array) -> jax.Array:
    """``conv`` with its row padding already applied to ``x`` (rows: valid; columns: the layer's padding)."""
    x = jnp.asarray(x, conv.dtype)
    y = conv2d(x, conv.kernel[...].astype(conv.dtype), conv.stride, ((0, 0), conv.padding[1]))
    if conv.bias is not None:
        y = y + conv.bias[...].astype(conv.dtype)
    return y


def _is_pointwise(conv: Conv2d) -> bool:
    return conv.kernel.shape[0] == 1 and conv.padding[0] == (0, 0)


def halo_conv(comm: PatchComm, conv: Conv2d, x: jax.Array) -> jax.Array:
    """``conv`` on this device's rows ``x (B, h, W, Cin)`` -> ``(B, h / stride, W', Cout)``.

    The ``top`` padding rows come from the device above (its last rows), the ``bottom`` ones from the device
    below (its first rows); the image's outer edges get zeros, as in the one-device convolution.
    """
    if _is_pointwise(conv):
        return conv(x)
    (top, bottom), _ = conv.padding
    h = x.shape[1]
    if max(top, bottom) > h:
        raise ValueError(f"a convolution needs {max(top, bottom)} halo rows but the patch has only {h} rows: "
                         "use fewer patches or a larger image")
    fresh = None
    if comm.phase != "naive":
        fresh = (_shift(comm, x[:, h - top:] if top else None, down=True),
                 _shift(comm, x[:, :bottom] if bottom else None, down=False))
        comm.new_state.append(fresh)
    if comm.phase == "sync":
        above, below = fresh
    elif comm.phase == "stale":
        above, below = comm.take_stale()
    else:
        above = jnp.zeros((x.shape[0], top) + x.shape[2:], x.dtype) if top else None
        below = jnp.zeros((x.shape[0], bottom) + x.shape[2:], x.dtype) if bottom else None
    parts = [p.astype(x.dtype) for p in (above, x, below) if p is not None]
    return _conv_valid_rows(conv, jnp.concatenate(parts, axis=1))


def first_conv(comm: PatchComm, conv: Conv2d, x_full: jax.Array) -> jax.Array:
    """The input convolution: every device holds the full fresh ``x_full (B, H, W, C)`` and slices its own rows
    plus the halo (always exact, no exchange; the official ``is_first_layer``). Naive: own rows only.

    Returns ``(B, H / (N * stride), W', Cout)``.
    """
    (top, bottom), _ = conv.padding
    b, hh, w, c = x_full.shape
    rows = hh // comm.n
    start = comm.index() * rows
    if comm.phase == "naive" or _is_pointwise(conv):
        own = lax.dynamic_slice_in_dim(x_full, start, rows, axis=1)
        return halo_conv(comm, conv, own) if not _is_pointwise(conv) else conv(own)
    padded = jnp.pad(x_full, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    return _conv_valid_rows(conv, lax.dynamic_slice_in_dim(padded, start, rows + top + bottom, axis=1))


def _moments(gn: GroupNorm, x: jax.Array) -> jax.Array:
    """``(2, B, G)`` float32: per-group ``E[x]`` and ``E[x^2]`` over this patch."""
    b, c, g = x.shape[0], x.shape[-1], gn.num_groups
    xf = jnp.asarray(x, jnp.float32).reshape(b, -1, g, c // g)
    return jnp.stack([xf.mean(axis=(1, 3)), jnp.square(xf).mean(axis=(1, 3))])


def patch_group_norm(comm: PatchComm, gn: GroupNorm, x: jax.Array) -> jax.Array:
    """GroupNorm of this patch ``(B, h, W, C)`` with (estimated) whole-image statistics.

    Patches have equal sizes, so the image's moments are the mean of the patches' moments (``pmean``).
    Phase ``"stale"`` (paper eq. 2, mode ``"corrected"``)::

        E_t[x]   ~ mean_j E_{t+1}[x^(j)] + (E_t[x^(i)] - E_{t+1}[x^(i)])     (the same for E[x^2])
        Var      = E[x^2] - E[x]^2,  the patch's own variance where that is negative

    Variance without Bessel's correction (as the one-device layer; the official code multiplies by n/(n-1)).
    """
    local = _moments(gn, x)
    n = comm.n
    exchanges = comm.phase != "naive" and comm.gn_mode in ("corrected", "stale")
    if exchanges:
        comm.record("group_norm", "all-reduce", local)
        fresh_global = lax.pmean(local, comm.axis)
        comm.new_state.append((fresh_global, local))
    if comm.phase == "naive":
        stats = local
    elif comm.phase == "sync" or comm.gn_mode == "sync":
        if not exchanges:
            comm.record("group_norm", "all-reduce", local)
        stats = fresh_global if exchanges else lax.pmean(local, comm.axis)
    elif comm.gn_mode == "separate":
        stats = local
    else:
        stale_global, stale_local = comm.take_stale()
        delta = local - stale_local
        stats = stale_global + (delta if comm.gn_mode == "corrected" else delta / n)
    mean, var = stats[0], stats[1] - jnp.square(stats[0])
    if comm.phase == "stale" and comm.gn_mode == "corrected":
        var = jnp.where(var < 0, local[1] - jnp.square(local[0]), var)
    var = jnp.maximum(var, 0.0)
    b, c, g = x.shape[0], x.shape[-1], gn.num_groups
    a = jnp.repeat(lax.rsqrt(var + gn.eps), c // g, axis=-1) * gn.scale[...].astype(jnp.float32)
    shift = gn.bias[...].astype(jnp.float32) - jnp.repeat(mean, c // g, axis=-1) * a
    bshape = (b,) + (1,) * (x.ndim - 2) + (c,)
    return (jnp.asarray(x, jnp.float32) * a.reshape(bshape) + shift.reshape(bshape)).astype(gn.dtype)


def patch_kv(comm: PatchComm, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """All patches' keys and values ``(B, N * L, inner)`` from this patch's ``k, v (B, L, inner)``.

    Rows are split, so a patch's tokens are a contiguous block of the row-major token order: device ``i``
    holds tokens ``[i L, (i + 1) L)``. Phase ``"stale"``: the previous step's gathered K/V with this patch's
    block replaced by the fresh one. Naive: this patch's own ``(B, L, inner)``.
    """
    kv = jnp.concatenate([k, v], axis=-1)
    if comm.phase == "naive":
        return k, v
    comm.record("kv", "all-gather", kv)
    gathered = lax.all_gather(kv, comm.axis, axis=1, tiled=True)
    comm.new_state.append(gathered)
    if comm.phase == "sync":
        full = gathered
    else:
        full = lax.dynamic_update_slice_in_dim(comm.take_stale().astype(kv.dtype), kv,
                                               comm.index() * kv.shape[1], axis=1)
    return jnp.split(full, 2, axis=-1)
