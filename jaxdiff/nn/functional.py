"""An NNX module as a pure function of its parameters: what the train state holds and what jit sees.

``split_model`` separates a module's graph from its trainable parameters and any other state;
``make_apply`` turns the graph (and that other state) back into a pure
``apply(params, x, model_time, labels, dropout_key)`` for the UNet-style signature every denoiser here has.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: the trainable parameters and any other state, apart."""
    return nnx.split(model, nnx.Param, ...)


def make_apply(graphdef: nnx.GraphDef, rest: nnx.State, *, condition: str = "labels") -> Callable[..., jax.Array]:
    """``apply(params, x (B,H,W,C), model_time (B,), labels (B,) | None, dropout_key=None) -> (B,H,W,C)``, pure.

    ``condition="context"``: the fourth argument is the cross-attention context ``(B, S, D)`` instead
    (``model(x, model_time, context)``, text-conditioned UNets). ``condition="low_res"`` (super-resolution
    UNets): it is a dict ``{"labels": (B,) | None, "low_res": (B, h, w, C), "aug_level": (B,)}``.

    With a ``dropout_key`` the network runs in training mode (dropout masks drawn from that key); without
    one, in evaluation mode (dropout off). ``rest`` (dropout RNG state, if any) is kept as plain arrays
    and merged afresh inside each trace, so nothing is mutated across ``jit`` boundaries.

    Keyword arguments after ``dropout_key`` go to the network's call (the UNet's h-space access:
    ``mid_hook=``, ``return_features=True``, which makes ``apply`` return ``(output, h)``).
    """
    if condition not in ("labels", "context", "low_res"):
        raise ValueError(f"condition must be 'labels', 'context' or 'low_res', got {condition!r}")
    rest_values = nnx.to_pure_dict(rest)
    has_rngs = bool(jax.tree.leaves(rest_values))

    def apply(params, x, model_time, labels=None, dropout_key=None, **hooks):
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest_values))
        if dropout_key is not None and has_rngs:
            nnx.reseed(model, default=dropout_key)
        else:
            model.eval()
        if condition == "context":
            return model(x, model_time, labels, **hooks)
        if condition == "low_res":
            return model(x, model_time, labels=labels["labels"], low_res=labels["low_res"],
                         aug_level=labels["aug_level"], **hooks)
        return model(x, model_time, labels=labels, **hooks)
    apply.graphdef, apply.rest, apply.condition = graphdef, rest, condition   # to rebuild the module elsewhere
    return apply
