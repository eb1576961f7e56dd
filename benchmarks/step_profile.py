"""Where one training step's time goes, by category of op: the jaxdiff step from a ``jax.profiler`` trace
(XLA:CPU thunk events mapped back to the jax op of their HLO instruction) and the PyTorch step from
``torch.profiler`` (self CPU time per aten op). Used by ``benchmarks/train_vs_pytorch.py --profile``."""
from __future__ import annotations

import os
import time

def hlo_op_sources(hlo_text: str) -> dict[str, str]:
    """``{instruction name: jax op_name metadata}`` of an optimized HLO module's text."""
    import re
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            on = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = on.group(1) if on else ""
    return out


def jax_category(op: str, source: str) -> str:
    """Coarse category of one XLA:CPU op of the training step, from its name and jax source op."""
    last = source.split("/")[-1]
    bwd = "transpose(jvp" in source
    if not source and op.startswith("transpose"):
        return "conv backward: layout transposes"     # XLA's layout change for the backward-filter conv
    if "conv_general_dilated" in last:
        if op.startswith(("transpose", "copy")):
            return "conv backward: layout transposes"
        return "conv backward" if bwd else "conv forward"
    if "dot_general" in last or op.startswith("dot"):
        return "matmul (attention, dense, tap matmuls)"
    if op.startswith(("slice", "wrapped_pad", "pad")) and bwd:
        return "conv backward: tap copies (matmul kernel grad)"
    if "adam" in source or "apply_updates" in source or "optax" in source:
        return "Adam update"
    return "elementwise / norm / reductions (backward)" if bwd else "elementwise / norm / reductions (forward)"


def profile_ops(step, state, args, steps: int = 3, top: int = 25) -> dict:
    """Per-HLO-op wall time (ms per step) of ``steps`` runs of the compiled jaxdiff step, from a
    ``jax.profiler`` trace (XLA:CPU emits one event per thunk: fusions, convolutions, dots, copies);
    only events named after an instruction of the step's HLO module are counted."""
    import glob
    import tempfile

    import jax
    from jax._src.lib import _profile_data

    sources = hlo_op_sources(step.as_text())
    d = tempfile.mkdtemp(prefix="jaxdiff_prof_")
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
        for _ in range(steps):
            state["p"], state["s"], loss = step(state["p"], state["s"], *args)
            loss.block_until_ready()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    pd = _profile_data.ProfileData.from_file(path)
    tot: dict[str, float] = {}
    for plane in pd.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for ev in line.events:
                if ev.name in sources:
                    tot[ev.name] = tot.get(ev.name, 0.0) + ev.duration_ns / 1e6 / steps
    kinds: dict[str, float] = {}
    cats: dict[str, float] = {}
    for k, v in tot.items():
        kinds[op_kind(k)] = kinds.get(op_kind(k), 0.0) + v
        c = jax_category(k, sources[k])
        cats[c] = cats.get(c, 0.0) + v
    srt = lambda dct, key: sorted(({key: k, "ms_per_step": v} for k, v in dct.items()), key=lambda r: -r["ms_per_step"])
    return {"traced_wall_ms": wall_ms, "ops_total_ms": sum(tot.values()), "by_category": srt(cats, "category"),
            "by_kind": srt(kinds, "kind"),
            "top_ops": [dict(r, source=sources[r["op"]][-120:]) for r in srt(tot, "op")[:top]]}


def torch_category(key: str) -> str | None:
    """Coarse category of a PyTorch op (same categories as :func:`jax_category`); None: not counted
    (an op that only calls others)."""
    k = key.lower()
    if "convolution_backward" in k:
        return "conv backward"
    if "convolution" in k or "conv2d" in k:
        return "conv forward" if "backward" not in k else "conv backward"
    if any(n in k for n in ("addmm", "bmm", "aten::mm", "matmul", "linear", "baddbmm", "scaled_dot_product")):
        return "matmul (attention, dense, tap matmuls)"
    if "_foreach" in k or "adam" in k:
        return "Adam update"
    return "elementwise / norm / reductions (backward)" if "backward" in k else \
        "elementwise / norm / reductions (forward)"


def profile_torch(step_fn, steps: int = 3, top: int = 25) -> dict:
    """Self CPU time per PyTorch op (ms per step) of ``steps`` training steps (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step_fn()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    cats: dict[str, float] = {}
    for k, v in ops.items():
        c = torch_category(k)
        cats[c] = cats.get(c, 0.0) + v
    srt = lambda dct, key: sorted(({key: k, "ms_per_step": v} for k, v in dct.items()), key=lambda r: -r["ms_per_step"])
    return {"traced_wall_ms": wall_ms, "ops_total_ms": sum(ops.values()), "by_category": srt(cats, "category"),
            "top_ops": srt(ops, "op")[:top]}


def op_kind(name: str) -> str:
    """HLO op name without its numeric suffix (``ynn_fusion.265`` -> ``ynn_fusion``)."""
    base = name.split(".")[0]
    return base.rstrip("0123456789_") or base
