"""Low-rank adapters (LoRA) on the linear and convolution layers of any jaxdiff NNX model.

:func:`add_lora` replaces each :class:`~jaxdiff.nn.layers.Dense` / :class:`~jaxdiff.nn.layers.Conv2d` whose
dotted module path matches one of the target patterns by a :class:`LoRADense` / :class:`LoRAConv2d` that
*shares* the original ``kernel`` and ``bias`` variables (no copies; their paths are unchanged, so checkpoints
and :mod:`jaxdiff.convert` still see the base weights under their usual names) and adds
``y += (alpha / rank) * B(A(dropout(x)))``. The adapter weights are :class:`flax.nnx.LoRAParam` variables
(a subclass of ``nnx.Param``), stored under ``<layer>.lora.lora_a`` / ``lora_b``; the NNX filters
:data:`LORA_PARAMS` and :data:`BASE_PARAMS` pick them apart for training with a frozen base.

Dense layout: ``kernel (in, out)``, ``lora_a (in, r)``, ``lora_b (r, out)``, delta ``scale * lora_a @ lora_b``.
Conv layout (as peft): ``lora_a (kh, kw, in, r)`` (the base kernel's size, stride and padding),
``lora_b (r, out)`` (a 1x1 conv); delta ``scale * einsum("hwir,ro->hwio", lora_a, lora_b)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.nn.layers import Conv2d, Dense, conv2d

LORA_PARAMS = nnx.LoRAParam
"""NNX filter of the adapter weights (``lora_a``, ``lora_b``)."""
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
"""NNX filter of every parameter except the adapters: the frozen base."""

TARGET_PRESETS = {
    "attention": r".*\.to_(q|k|v|out)",            # every attention projection (self, cross, spatial)
    "cross_attention": r".*\.attn2\.to_(q|k|v|out)",
    "cross_kv": r".*\.attn2\.to_(k|v)",           # C-LoRA / Custom Diffusion: K and V of the text features
    "self_attention": r".*\.attn1\.to_(q|k|v|out)",
    "feed_forward": r".*\.ff\.(geglu|out)",
}
"""Named target patterns (regular expressions, full match on dotted module paths such as
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``)."""


@dataclass(frozen=True)
class LoRASpec:
    """Which layers get adapters and how.

    Attributes:
      targets: preset names of :data:`TARGET_PRESETS` or regular expressions (full match on the dotted
        module path); each must match at least one Dense or Conv2d layer.
      rank: adapter rank r >= 1 (at most min(fan_in, fan_out) of every adapted layer).
      alpha: the delta is scaled by ``alpha / rank`` (peft's ``lora_alpha``); None means ``alpha = rank``.
      dropout: dropout rate on the adapter's input (training only).
    """

    targets: tuple = ("attention",)
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank

    def patterns(self) -> tuple[str, ...]:
        """The target regular expressions (presets expanded)."""
        if isinstance(self.targets, str):
            raise ValueError(f"lora targets must be a list of patterns, got the string {self.targets!r}")
        return tuple(TARGET_PRESETS.get(t, t) for t in self.targets)

    def check(self) -> None:
        """Raise ValueError naming a bad rank, alpha, dropout or pattern."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora alpha must be positive (or None for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.patterns():
            raise ValueError("lora targets are empty: name at least one layer pattern")
        for p in self.patterns():
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"lora target {p!r} is not a valid regular expression: {e}") from None


def _dropout(rate: float, rngs: nnx.Rngs):
    return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


class LoRADense(Dense):
    """A :class:`Dense` plus a low-rank delta. ``(..., in_f) -> (..., out_f)``.

    Built from an existing ``base`` Dense whose ``kernel``/``bias`` variables it takes over (shared, not
    copied). Sub-module ``lora`` is a :class:`flax.nnx.LoRA` (``lora_a (in, r)`` he-uniform,
    ``lora_b (r, out)`` zeros: the adapted layer starts equal to the base). ``merged`` says whether the delta
    is currently folded into ``kernel`` (then the adapter path is skipped).
    """

    def __init__(self, base: Dense, *, rank: int, scale: float, dropout: float = 0.0, rngs: nnx.Rngs):
        self.dtype = base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        in_f, out_f = base.kernel.shape
        self.lora = nnx.LoRA(in_f, rank, out_f, param_dtype=base.kernel.dtype, rngs=rngs)
        self.scale = float(scale)
        self.dropout = _dropout(dropout, rngs)
        self.merged = False

    def delta(self) -> jax.Array:
        """The kernel delta ``scale * lora_a @ lora_b``, ``(in, out)`` float32."""
        a, b = self.lora.lora_a[...].astype(jnp.float32), self.lora.lora_b[...].astype(jnp.float32)
        return self.scale * (a @ b)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in_f)`` -> ``(..., out_f)`` in ``dtype``."""
        y = super().__call__(x)
        if self.merged:
            return y
        h = jnp.asarray(x, self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        low = (h @ self.lora.lora_a[...].astype(self.dtype)) @ self.lora.lora_b[...].astype(self.dtype)
        return y + (self.scale * low).astype(y.dtype)


class LoRAConv2d(Conv2d):
    """A :class:`Conv2d` plus a low-rank delta: a conv ``in -> r`` with the base's kernel size, stride and
    padding, then a 1x1 conv ``r -> out`` (peft's conv LoRA). ``(B, H, W, in) -> (B, H', W', out)``.

    Takes over ``base``'s ``kernel``/``bias`` variables. ``lora.lora_a (kh, kw, in, r)`` uniform
    +-1/sqrt(fan_in), ``lora.lora_b (r, out)`` zeros.
    """

    def __init__(self, base: Conv2d, *, rank: int, scale: float, dropout: float = 0.0, rngs: nnx.Rngs):
        self.padding, self.stride = base.padding, base.stride
        self.in_ch, self.out_ch, self.dtype = base.in_ch, base.out_ch, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        kh, kw, cin, cout = base.kernel.shape
        bound = 1.0 / np.sqrt(kh * kw * cin)
        dt = base.kernel.dtype
        self.lora = nnx.Module()
        self.lora.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (kh, kw, cin, rank), dt, -bound, bound))
        self.lora.lora_b = nnx.LoRAParam(jnp.zeros((rank, cout), dt))
        self.scale = float(scale)
        self.dropout = _dropout(dropout, rngs)
        self.merged = False

    def delta(self) -> jax.Array:
        """The kernel delta, ``(kh, kw, in, out)`` float32."""
        a, b = self.lora.lora_a[...].astype(jnp.float32), self.lora.lora_b[...].astype(jnp.float32)
        return self.scale * jnp.einsum("hwir,ro->hwio", a, b)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, H, W, in)`` -> ``(B, H', W', out)`` in ``dtype``."""
        y = super().__call__(x)
        if self.merged:
            return y
        h = jnp.asarray(x, self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        low = conv2d(h, self.lora.lora_a[...].astype(self.dtype), self.stride, self.padding)
        low = low @ self.lora.lora_b[...].astype(self.dtype)
        return y + (self.scale * low).astype(y.dtype)


LORA_LAYERS = (LoRADense, LoRAConv2d)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _set_child(model: nnx.Module, path: tuple, new) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def adaptable_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """``{dotted path: layer}`` of every Dense and Conv2d in ``model`` (adapted or not)."""
    return {_dotted(p): m for p, m in nnx.iter_modules(model) if p and isinstance(m, (Dense, Conv2d))}


def lora_layers(model: nnx.Module) -> dict[str, LoRADense | LoRAConv2d]:
    """``{dotted path: layer}`` of the adapted layers of ``model``."""
    return {k: m for k, m in adaptable_layers(model).items() if isinstance(m, LORA_LAYERS)}


def match_targets(model: nnx.Module, spec: LoRASpec) -> list[str]:
    """Dotted paths of the Dense/Conv2d layers that ``spec``'s patterns select, in model order.

    Raises ValueError naming every pattern that matches no layer (with examples of the layer paths).
    """
    spec.check()
    layers = adaptable_layers(model)
    patterns = spec.patterns()
    unmatched = [p for p in patterns if not any(re.fullmatch(p, k) for k in layers)]
    if unmatched:
        examples = ", ".join(list(layers)[:6])
        raise ValueError(f"lora target pattern(s) {unmatched} match no Dense or Conv2d layer of this "
                         f"{type(model).__name__}; layer paths look like: {examples}")
    return [k for k in layers if any(re.fullmatch(p, k) for p in patterns)]


def add_lora(model: nnx.Module, spec: LoRASpec, *, rngs: nnx.Rngs) -> list[str]:
    """Attach adapters in place to the layers ``spec`` selects; returns their dotted paths.

    The base weights are not copied: each adapted layer keeps the original kernel/bias variables. Raises
    ValueError for a bad spec, a pattern matching nothing, a layer already adapted, or a rank larger than a
    layer's fan-in or fan-out.
    """
    paths = match_targets(model, spec)
    layers = adaptable_layers(model)
    for k in paths:
        layer = layers[k]
        if isinstance(layer, LORA_LAYERS):
            raise ValueError(f"layer {k} already has a LoRA adapter")
        fan_in, fan_out = int(np.prod(layer.kernel.shape[:-1])), layer.kernel.shape[-1]
        if spec.rank > min(fan_in, fan_out):
            raise ValueError(f"lora rank {spec.rank} exceeds min(fan_in, fan_out) = {min(fan_in, fan_out)} "
                             f"of layer {k} (kernel {tuple(layer.kernel.shape)})")
    for path, layer in list(nnx.iter_modules(model)):
        if _dotted(path) in paths:
            cls = LoRADense if isinstance(layer, Dense) else LoRAConv2d
            _set_child(model, path, cls(layer, rank=spec.rank, scale=spec.scale, dropout=spec.dropout, rngs=rngs))
    return paths


def _fold(model: nnx.Module, sign: float, merged: bool) -> None:
    for k, layer in lora_layers(model).items():
        if layer.merged == merged:
            raise ValueError(f"layer {k} is {'already' if merged else 'not'} merged")
        w = layer.kernel[...]
        layer.kernel[...] = (w.astype(jnp.float32) + sign * layer.delta()).astype(w.dtype)
        layer.merged = merged


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter's delta into its base kernel (``W += scale * A B``), in place; the adapters stay
    (inactive) so :func:`unmerge_lora` can take the delta out again.

    Floating point: ``(W + d) - d`` equals ``W`` exactly only when no rounding occurs (e.g. dyadic values);
    in general the round trip is within one float32 ulp of ``|W + d|`` per entry.
    """
    _fold(model, 1.0, True)


def unmerge_lora(model: nnx.Module) -> None:
    """Inverse of :func:`merge_lora` (``W -= scale * A B``); the adapters become active again."""
    _fold(model, -1.0, False)


def strip_lora(model: nnx.Module) -> None:
    """Replace every adapted layer by a plain Dense/Conv2d holding the same kernel/bias (merged or not: the
    delta is kept in the kernel only if it was merged), in place."""
    for path, layer in list(nnx.iter_modules(model)):
        if path and isinstance(layer, LORA_LAYERS):
            kshape, bias = layer.kernel.shape, layer.bias is not None
            if isinstance(layer, LoRADense):
                make = lambda: Dense(kshape[0], kshape[1], use_bias=bias, dtype=layer.dtype, rngs=nnx.Rngs(0))
            else:
                make = lambda: Conv2d(kshape[2], kshape[3], kshape[0], stride=layer.stride, padding=layer.padding,
                                      use_bias=bias, dtype=layer.dtype, rngs=nnx.Rngs(0))
            plain = nnx.eval_shape(make)   # shapes only; the real variables are put in next
            plain.kernel, plain.bias = layer.kernel, layer.bias
            _set_child(model, path, plain)


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, adapters, base, rest)``: the adapter weights, the frozen base parameters and any other
    state (dropout RNGs), apart; ``nnx.merge(graphdef, adapters, base, rest)`` rebuilds the model."""
    return nnx.split(model, LORA_PARAMS, nnx.Param, ...)


def merge_param_trees(base: dict, adapters: dict) -> dict:
    """The nested parameter dict ``base`` with the leaves of ``adapters`` (a sparser tree of the same nesting,
    e.g. the adapter weights of :func:`split_lora`) put in or over it; ``base`` is not modified."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = merge_param_trees(base[k], v) if isinstance(v, dict) and k in base else v
    return out


def lora_mask(params: dict) -> dict:
    """An optax mask for a pure parameter dict (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``): True on
    adapter leaves (``.../lora/lora_a|lora_b``), False on the base. Same tree structure as ``params``."""
    def walk(tree, inside):
        if isinstance(tree, dict):
            return {k: walk(v, inside or k == "lora") for k, v in tree.items()}
        return bool(inside)
    return walk(params, False)
