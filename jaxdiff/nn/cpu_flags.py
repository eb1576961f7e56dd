"""XLA:CPU settings for jaxdiff's models, measured on a 2-core x86 machine (issue 13).

XLA flags must be in ``XLA_FLAGS`` before the CPU backend starts (the first ``jax.devices()``, array
or ``jit`` call); a CLI applies them at the top of ``main``::

    from jaxdiff.nn.cpu_flags import apply_recommended_xla_flags
    apply_recommended_xla_flags()      # before anything touches a JAX backend

Importing this module (and the jaxdiff.nn package) imports jax but starts no backend.
Measurements: ``benchmarks/results/train_vs_pytorch.md``.
"""
from __future__ import annotations

import os

# XLA:CPU flags of jax 0.10.2 measured on the digits UNet's training step (batch 64; one process per
# setting, alternating with a defaults process; median process CPU time per step, as wall time moved
# by up to 2x with the other jobs on the 2 shared cores; defaults: 112-125 ms). What each did; none
# made the step faster, so none is recommended.
MEASURED_FLAGS = {
    "--xla_cpu_use_onednn=true": "about 2x slower (wall 514 vs 260 ms), compile 48 vs 22 s",
    "--xla_cpu_experimental_onednn_fusion_type=dot": "no change (116 vs 112 ms)",
    "--xla_cpu_experimental_ynn_fusion_type=+eltwise": "slower (132 vs 119 ms)",
    "--xla_cpu_experimental_ynn_fusion_type=-reduce": "slower (126 vs 117 ms)",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY": "no change (115 vs 125 ms)",
    "--xla_cpu_multi_thread_eigen=false": "no change (119 vs 121 ms)",
}

# Flags recommended for jaxdiff training/sampling on CPU (empty: XLA:CPU's defaults were best).
RECOMMENDED_CPU_FLAGS: tuple[str, ...] = ()


def recommended_xla_flags(platform: str | None = None) -> str:
    """The XLA flags (one string, space-separated) recommended for jaxdiff on ``platform``.

    ``platform`` defaults to ``$JAX_PLATFORMS`` (first entry) or ``"cpu"`` when that is unset and no
    accelerator plugin is installed; flags are only ever returned for CPU (``""`` otherwise).
    """
    if platform is None:
        platform = (os.environ.get("JAX_PLATFORMS") or "cpu").split(",")[0].strip().lower() or "cpu"
    if platform != "cpu":
        return ""
    return " ".join(RECOMMENDED_CPU_FLAGS)


def apply_recommended_xla_flags(platform: str | None = None) -> str:
    """Append :func:`recommended_xla_flags` to ``$XLA_FLAGS`` (flags the user already set win: a flag
    named there is not added again). Call before the JAX backend starts. Returns the new ``XLA_FLAGS``."""
    current = os.environ.get("XLA_FLAGS", "")
    named = {f.split("=", 1)[0] for f in current.split()}
    extra = [f for f in recommended_xla_flags(platform).split() if f.split("=", 1)[0] not in named]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
    return os.environ.get("XLA_FLAGS", "")
