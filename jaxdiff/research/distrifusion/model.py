"""Patch-parallel sampling of one image on several devices (DistriFusion, Li et al., CVPR 2024).

:class:`PatchParallelUNet` is an ``apply(params, x, t, labels_or_context)`` for a jaxdiff UNet whose rows are
split over a 1-D device mesh (``shard_map``). Modes (:class:`DistriConfig`):

* ``"sync"``: every exchange fresh, every step (equals the one-device UNet to float tolerance);
* ``"displaced"``: the first ``1 + warmup`` evaluations synchronous, then each layer uses its neighbours'
  halos, the other patches' keys/values and the image's GroupNorm moments from the *previous* evaluation,
  while this evaluation's are exchanged for the next one (issued in this step's program, consumed by the
  next step's: the exchange can overlap the computation);
* ``"naive"``: no exchanges at all (each patch alone; the paper's baseline with seams).

The stale exchanges are the *model's* state. :meth:`PatchParallelUNet.start` (called inside the jitted
sampling program, as ``jaxdiff.sampling.Sampler`` does) returns an ``apply`` bound to fresh state held in
``jax.Ref`` cells; every call reads and replaces them, so the state rides along in whatever ``lax.scan`` the
solver runs: any jaxdiff solver, through the ordinary ``jaxdiff.solvers.sample`` call::

    pp = PatchParallelUNet.from_module(unet, DistriConfig(patches=8, mode="displaced", warmup=4))
    @jax.jit
    def draw(params, x_T, labels):
        apply = pp.start(x_T.shape[0], x_T.shape[1:])
        return sample(make_denoiser(apply, params, process), process, x_T, grid, cond=labels)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxdiff.nn.functional import split_model
from jaxdiff.research.distrifusion.ops import GN_MODES, PatchComm
from jaxdiff.research.distrifusion.unet import check_covered, check_rows, patch_unet_forward

MODES = ("sync", "displaced", "naive")
AXIS = "patch"


@dataclasses.dataclass(frozen=True)
class DistriConfig:
    """How to split: ``patches`` row blocks (one per device), ``mode`` (``MODES``), ``warmup``: synchronous
    evaluations after the first (displaced mode; the paper's default is 4), ``group_norm`` (``GN_MODES``:
    ``"corrected"`` is the paper's corrected asynchronous GroupNorm)."""

    patches: int
    mode: str = "displaced"
    warmup: int = 4
    group_norm: str = "corrected"

    def __post_init__(self):
        if isinstance(self.patches, bool) or not isinstance(self.patches, (int, np.integer)) or self.patches < 1:
            raise ValueError(f"patches must be a positive integer, got {self.patches!r}")
        if self.mode not in MODES:
            raise ValueError(f"distrifusion mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, np.integer)) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.group_norm not in GN_MODES:
            raise ValueError(f"group_norm must be one of {GN_MODES}, got {self.group_norm!r}")


def patch_mesh(patches: int, devices=None) -> Mesh:
    """A 1-D ``("patch",)`` mesh over the first ``patches`` devices (ValueError if there are fewer)."""
    devices = list(jax.devices() if devices is None else devices)
    if patches > len(devices):
        raise ValueError(f"{patches} patches need {patches} devices, only {len(devices)} exist "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return Mesh(np.asarray(devices[:patches]), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


class PatchParallelUNet:
    """``apply(params, x (B,H,W,C), t (B,), cond)`` of a jaxdiff UNet, computed in row patches on a device mesh.

    ``cond`` is the labels ``(B,)`` (``condition="labels"``) or the cross-attention context ``(B, S, D)``
    (``condition="context"``), as :func:`jaxdiff.nn.functional.make_apply`. Called directly it is stateless:
    modes ``sync``/``displaced`` compute the exact (synchronous) forward, ``naive`` the exchange-free one.
    :meth:`start` binds the step-to-step state of the displaced mode.

    Args:
      graphdef, rest: the UNet's graph and non-parameter state (``jaxdiff.nn.functional.split_model``).
      params: a parameter state of this graph, used only to check the layer types now.
      config: :class:`DistriConfig`. ``devices``: default ``jax.devices()``.
    """

    def __init__(self, graphdef: nnx.GraphDef, rest: Any, params: Any, config: DistriConfig, *,
                 condition: str = "labels", devices=None):
        if condition not in ("labels", "context"):
            raise ValueError(f"condition must be 'labels' or 'context', got {condition!r}")
        self.graphdef, self.config, self.condition = graphdef, config, condition
        self.rest = nnx.to_pure_dict(rest) if isinstance(rest, nnx.State) else rest
        unet = nnx.merge(graphdef, nnx.State(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params),
                         nnx.State(self.rest))
        check_covered(unet)
        self.num_downsamples = unet.num_downsamples
        self._unet = unet
        self.mesh = patch_mesh(config.patches, devices)

    @classmethod
    def from_module(cls, unet: nnx.Module, config: DistriConfig, **kw) -> "PatchParallelUNet":
        """From a UNet module; its parameters are ``nnx.to_pure_dict(nnx.state(unet, nnx.Param))``."""
        graphdef, params, rest = split_model(unet)
        return cls(graphdef, rest, params, config, **kw)

    def _param_shapes(self):
        """The parameters the layer check was made with (a pure dict; used for their shapes only)."""
        return nnx.to_pure_dict(nnx.state(self._unet, nnx.Param))

    # -- the sharded forward -------------------------------------------------------------------------------
    def check_shape(self, x_shape) -> None:
        """ValueError unless ``x (B, H, W, C)`` rows split into the configured patches at every level."""
        check_rows(self._unet, int(x_shape[1]), self.config.patches)

    def _forward(self, params, x, t, cond, stale, counter, phase: str | None = None, log=None):
        """``(out (B,H,W,C), new_state)``; ``phase=None`` picks sync/stale from ``counter`` (displaced)."""
        self.check_shape(np.shape(x))
        cfg, n = self.config, self.config.patches

        def body(params, x, t, cond, stale, counter):
            unet = nnx.merge(self.graphdef, nnx.State(params), nnx.State(self.rest))
            stale = None if stale is None else jax.tree.map(lambda a: a[0], stale)

            def run(ph):
                comm = PatchComm(AXIS, n, ph, cfg.group_norm, stale=stale if ph == "stale" else None, log=log)
                kw = dict(context=cond) if self.condition == "context" else dict(labels=cond)
                rows = patch_unet_forward(comm, unet, x, t, **kw)
                if log is not None:
                    comm.record("output", "all-gather", rows)
                out = jax.lax.all_gather(rows, AXIS, axis=1, tiled=True)      # always synchronous
                return out, jax.tree.map(lambda a: a[None], comm.new_state)

            if phase is not None:
                return run(phase)
            return jax.lax.cond(counter <= cfg.warmup, lambda: run("sync"), lambda: run("stale"))

        state_spec = None if stale is None else jax.tree.map(lambda _: P(AXIS), stale)
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(), P(), P(), state_spec, P()),
                           out_specs=(P(), P(AXIS)), check_vma=False)
        return fn(params, x, t, cond, stale, counter)

    def __call__(self, params, x, t, cond=None, dropout_key=None) -> jax.Array:
        """Stateless ``(B, H, W, C_out)``: the exact synchronous forward (``naive`` mode: without exchanges)."""
        phase = "naive" if self.config.mode == "naive" else "sync"
        return self._forward(params, x, t, cond, None, jnp.int32(0), phase)[0]

    # -- the step-to-step state ------------------------------------------------------------------------------
    def state_shapes(self, batch: int, shape) -> Any:
        """The displaced mode's state (the exchanged tensors of one step) as ``ShapeDtypeStruct`` s, in the global
        view ``(N, ...)`` per entry, for inputs ``(batch, *shape)``, ``shape = (H, W, C)``."""
        c = self._unet.config
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self._param_shapes())
        x = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)
        t = jax.ShapeDtypeStruct((batch,), jnp.float32)
        if self.condition == "context":
            cond = jax.ShapeDtypeStruct((batch, 1, c.cross_attention_dim), jnp.float32)   # K/V of text: local
        else:
            cond = jax.ShapeDtypeStruct((batch,), jnp.int32) if c.num_classes else None
        return jax.eval_shape(lambda p, x, t, c: self._forward(p, x, t, c, None, jnp.int32(0), "sync")[1],
                              params, x, t, cond)

    def start(self, batch: int, shape) -> Callable[..., jax.Array]:
        """A fresh stateful ``apply(params, x, t, cond)`` for inputs ``(batch, *shape)``; call it inside ``jit``
        before the solver's loop (``jaxdiff.sampling.Sampler`` does).

        Modes ``sync``/``naive`` have no state and return this object. Displaced: the state (zeros, never
        read before it is written: the first evaluation is synchronous) and an evaluation counter live in
        ``jax.Ref`` cells created here; every call reads them and writes the new exchanges back.
        """
        self.check_shape((batch,) + tuple(shape))
        if self.config.mode != "displaced":
            return self
        cells = jax.tree.map(lambda s: jax.new_ref(jnp.zeros(s.shape, s.dtype)), self.state_shapes(batch, shape))
        counter = jax.new_ref(jnp.int32(0))

        def apply(params, x, t, cond=None, dropout_key=None):
            if x.shape[0] != batch or tuple(x.shape[1:]) != tuple(shape):
                raise ValueError(f"this patch-parallel state was started for inputs {(batch,) + tuple(shape)}, "
                                 f"got {tuple(x.shape)}")
            k = counter[...]
            out, new = self._forward(params, x, t, cond, jax.tree.map(lambda r: r[...], cells), k)
            jax.tree.map(lambda r, v: r.__setitem__(Ellipsis, v.astype(r.dtype)), cells, new)
            counter[...] = k + 1
            return out

        return apply
