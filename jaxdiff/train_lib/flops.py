"""FLOPs of a train step (from XLA's cost analysis of the unpartitioned program) and device peaks for MFU."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# dense bf16 peak TFLOP/s per device (vendor figures); MFU is reported only when the peak is known
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def step_flops(train_step, abstract_state, batch_size: int, image_shape: tuple[int, int, int]) -> float:
    """Floating-point operations of one ``train_step(state, batch)`` on a global batch (0.0 if XLA gives
    no estimate). ``abstract_state``: ``jax.eval_shape`` of the state."""
    strip = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    batch = {"image": jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    return lowered_flops(jax.jit(train_step).lower(jax.tree.map(strip, abstract_state), batch))


def lowered_flops(lowered) -> float:
    """Floating-point operations XLA's cost analysis gives for a ``jax.stages.Lowered`` program (the
    whole, unpartitioned computation; 0.0 when there is no estimate). No compilation happens."""
    try:
        cost = lowered.cost_analysis()
    except Exception:   # noqa: BLE001 - an estimate only
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def peak_tflops(configured: float | None = None) -> float | None:
    """Per-device peak TFLOP/s: ``configured`` if given, else from the device kind (None when unknown,
    e.g. CPU)."""
    if configured:
        return float(configured)
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return value
    return None
