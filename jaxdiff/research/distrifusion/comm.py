"""What patch parallelism communicates: bytes per step from the exchanged shapes, and the collectives of the
compiled program (HLO), with which of them the step's output waits for.

:func:`exchange_log` traces one forward and lists every exchange (kind, collective, per-device shape) plus the
all-reduces a tensor-parallel UNet (Megatron-style, as the official ``distri_sdxl_unet_tp``: one all-reduce of
the full activation after every residual block, attention, feed-forward and stand-alone convolution) would
make. :func:`bytes_per_step` turns the log into bytes received per device per step (ring all-reduce
``2 (N-1)/N S``, all-gather ``(N-1) c``, neighbour permute ``c``). :func:`hlo_collectives` reads a compiled
program's text and, for each branch of the warm-up/displaced conditional, counts the collectives and says
how many the branch's model output depends on.
"""
from __future__ import annotations

import re
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.research.distrifusion.model import PatchParallelUNet

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def exchange_log(pp: PatchParallelUNet, batch: int, shape) -> list[tuple]:
    """``[(kind, collective, per-device shape, dtype)]`` of one forward on ``(batch, *shape)`` inputs; kinds
    ``halo``, ``kv``, ``group_norm``, ``output`` (patch parallelism) and ``tp`` (tensor parallelism)."""
    log: list = []
    c = pp._unet.config
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pp._param_shapes())
    x = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = None
    if pp.condition == "context":
        cond = jax.ShapeDtypeStruct((batch, 77, c.cross_attention_dim), jnp.float32)
    elif c.num_classes:
        cond = jax.ShapeDtypeStruct((batch,), jnp.int32)
    jax.eval_shape(lambda p, x, t, cc: pp._forward(p, x, t, cc, None, jnp.int32(0), "sync", log=log)[0],
                   params, x, t, cond)
    return log


def _bytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def bytes_per_step(log: list[tuple], n: int) -> dict[str, int]:
    """Bytes received per device in one step, by kind: ``halo``, ``kv``, ``group_norm``, ``output`` (the
    final all-gather), ``tp`` (tensor parallelism's all-reduces), and the totals ``patch_parallel``
    (everything but ``tp``) and ``halo_only`` (halos and output: a patch scheme with attention and norms local)."""
    out: dict[str, int] = defaultdict(int)
    for kind, collective, shape, dtype in log:
        b = _bytes(shape, dtype)
        if collective == "all-reduce":
            b = int(round(2 * (n - 1) / n * b))
        elif collective == "all-gather":
            b = (n - 1) * b
        out[kind] += b
    out = dict(out)
    for k in ("halo", "kv", "group_norm", "output", "tp"):
        out.setdefault(k, 0)
    out["patch_parallel"] = out["halo"] + out["kv"] + out["group_norm"] + out["output"]
    out["halo_only"] = out["halo"] + out["output"]
    return out


# -- the compiled program ------------------------------------------------------------------------------------
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")


def _computations(hlo: str) -> dict[str, list[tuple[str, bool, str]]]:
    comps, cur = {}, None
    for line in hlo.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("{")[0].split("->")[0].split("(")[0]:
                cur = m.group(1)
                comps[cur] = []
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[cur].append((m.group(2), bool(m.group(1)), m.group(3)))
    return comps


def _op(rhs: str) -> str:
    """The opcode of an instruction's right-hand side (``shape opcode(operands), attrs``)."""
    depth = 0
    for i, ch in enumerate(rhs):
        if ch in "([{":
            if ch == "(" and depth == 0 and i > 0 and rhs[i - 1] not in " ,":
                return rhs[:i].split()[-1]
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return ""


def _collective(op: str) -> str | None:
    for c in COLLECTIVES:
        if op == c or op == c + "-start":
            return c
    return None


def _output_ancestors(instrs, root_index: int = 0) -> set[str]:
    """Names the ``root_index``-th element of the ROOT tuple depends on (within this computation)."""
    defs = {name: rhs for name, _, rhs in instrs}
    root = next((name, rhs) for name, is_root, rhs in instrs if is_root)
    op = _op(root[1])
    operands = _NAME.findall(root[1][root[1].index(op + "(") + len(op):]) if op else []
    start = operands[root_index] if op == "tuple" and len(operands) > root_index else root[0]
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        rhs = defs[name]
        o = _op(rhs)
        body = rhs[rhs.index(o + "(") + len(o):] if o else rhs
        todo += _NAME.findall(body.split("), ")[0] if ")," in body else body)
    return seen


def hlo_collectives(hlo: str) -> dict:
    """Collectives of a compiled patch-parallel step (``jit(...).lower(...).compile().as_text()``).

    Returns ``{"total": {collective: count}, "branches": [{"name", "counts", "feeding_output"}]}`` where the
    branches are those of conditionals holding collectives (the synchronous warm-up forward and the displaced
    one) and ``feeding_output`` counts the collectives the branch's first result (the model output) depends
    on: in the displaced branch only the final all-gather of the output should; the halo, K/V and GroupNorm
    exchanges feed only the state handed to the next step.
    """
    comps = _computations(hlo)
    total: dict[str, int] = defaultdict(int)
    per_comp = {}
    for cname, instrs in comps.items():
        counts = defaultdict(int)
        for _, _, rhs in instrs:
            c = _collective(_op(rhs))
            if c:
                counts[c] += 1
                total[c] += 1
        per_comp[cname] = counts
    branches = []
    for cname, instrs in comps.items():
        for _, _, rhs in instrs:
            if _op(rhs) != "conditional":
                continue
            m = re.search(r"branch_computations=\{([^}]*)\}", rhs) or None
            names = _NAME.findall(m.group(1)) if m else []
            if not names:
                names = [re.search(r"(?:true|false)_computation=%?([\w.\-]+)", rhs).group(1)] if m else []
            for b in names:
                if b not in comps or not per_comp[b]:
                    continue
                anc = _output_ancestors(comps[b], 0)
                feeding = sum(1 for name, _, r in comps[b] if name in anc and _collective(_op(r)))
                branches.append({"name": b, "counts": dict(per_comp[b]), "feeding_output": feeding,
                                 "total": sum(per_comp[b].values())})
    return {"total": dict(total), "branches": branches}
