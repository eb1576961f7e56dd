"""One training step of jaxdiff (jit) against diffusers/PyTorch (eager), same architecture, same weights.

    python benchmarks/train_vs_pytorch.py --profile --conv-layers   # what results/train_vs_pytorch.* holds
    python benchmarks/train_vs_pytorch.py --models digits --repeats 20 --no-write
    python benchmarks/train_vs_pytorch.py --variants matmul,xla,auto   # A/B the conv kernel-gradient switch
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" python benchmarks/train_vs_pytorch.py --no-write  # an XLA flag

For each model, a jaxdiff ``UNet`` is built from the training config (``configs/<name>.py``, dropout set to
0 so both sides are deterministic) and a diffusers ``UNet2DModel`` from ``jaxdiff.convert.
unet_config_to_diffusers`` of the same ``UNetConfig``; the jaxdiff weights are exported with
``jaxdiff.convert.export_state_dict`` and loaded into the PyTorch model, so both start identical. One step
is: forward on a fixed noisy batch (x, integer time steps, class labels), MSE against a fixed target,
backward, Adam (lr 1e-4, betas (0.9, 0.999), eps 1e-8) -- ``jax.jit`` with donated parameters/optimizer
state against PyTorch eager with ``torch.set_num_threads(2)``. The first-step losses of the two must
agree (relative difference < 1e-4) or the run stops.

Timing: ``--warmup`` steps of each, then ``--repeats`` rounds, each timing one jaxdiff step and one
PyTorch step back to back (alternating which goes first), so that load from other processes on this
shared machine hits both alike; the median per side and the ratio ``torch_ms / jax_ms`` (> 1: jaxdiff
faster) are reported, with the jaxdiff compile time (lower + compile + first step). The load average is
recorded before and after. PyTorch with other thread counts (``--extra-torch-threads``, default 1) is
timed in the same rounds. ``--profile`` also writes where the time goes: the jaxdiff step from a
``jax.profiler`` trace (XLA:CPU thunk events, by category of the jax op they come from) next to the
PyTorch step from ``torch.profiler``. ``--conv-layers`` times the gradient of each conv shape of the two
models with both kernel-gradient implementations. ``--from-json`` rewrites the markdown from the JSON.
About 10 minutes on 2 shared cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# variant name -> jaxdiff.nn.layers.set_conv_grad_impl value. "before": the kernel gradient of every conv as
# tap matmuls (what jaxdiff did before issue 13); "after": the default ("auto").
VARIANTS = {"before": "matmul", "after": "auto", "matmul": "matmul", "xla": "xla", "auto": "auto"}
# (name, batch, default repeats)
CASES = {"digits": (64, 20), "cifar10": (8, 6)}


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,cifar10", help="comma-separated config names (none: no model)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default per model)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of the compared PyTorch step")
    ap.add_argument("--extra-torch-threads", default="1",
                    help="comma-separated other thread counts for PyTorch, timed in the same rounds ('' for none)")
    ap.add_argument("--variants", default="before,after",
                    help=f"comma-separated jaxdiff step variants timed side by side, of {sorted(VARIANTS)}")
    ap.add_argument("--recommended-flags", action="store_true",
                    help="apply jaxdiff.nn.cpu_flags.recommended_xla_flags() to XLA_FLAGS before jax starts")
    ap.add_argument("--profile", action="store_true", help="per-op profile of the jaxdiff step")
    ap.add_argument("--conv-layers", action="store_true",
                    help="also time the gradient of each conv shape of the two models, matmul vs xla kernel gradient")
    ap.add_argument("--label", default="", help="free-text label stored with the run")
    ap.add_argument("--out", default=os.path.join(RESULTS, "train_vs_pytorch"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite <out>.md from <out>.json with the current NOTES (no measurement)")
    return ap.parse_args(argv)


def _config(name: str):
    from jaxdiff.train_lib import config as config_lib
    c = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    c.model.dropout = 0.0
    return c


def unet_config(config):
    """The ``UNetConfig`` a training config describes (as ``train.py`` builds it: a null class when labels
    are dropped for guidance)."""
    from jaxdiff.nn import UNetConfig
    m = config.model
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in ("dtype", "remat")}
    return UNetConfig(in_channels=config.data.channels, out_channels=config.data.channels,
                      class_null=bool(m.num_classes) and config.train.label_dropout > 0, **fields)


def build_pair(name: str, seed: int = 0):
    """``(jax_model, torch_model, unet_config)`` with identical weights."""
    import diffusers
    import numpy as np
    import torch
    from flax import nnx

    from jaxdiff.convert import export_state_dict, unet_config_to_diffusers
    from jaxdiff.nn import UNet

    ucfg = unet_config(_config(name))
    jm = UNet(ucfg, rngs=nnx.Rngs(seed))
    dcfg = {k: v for k, v in unet_config_to_diffusers(ucfg).items() if not k.startswith("_")}
    tm = diffusers.UNet2DModel(**dcfg)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in export_state_dict(jm).items()}
    missing, unexpected = tm.load_state_dict(sd, strict=True), None
    del missing, unexpected
    return jm, tm, ucfg


def make_batch(ucfg, batch: int, size: int, seed: int = 0):
    import numpy as np
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, size, size, ucfg.in_channels).astype(np.float32)
    target = rng.randn(batch, size, size, ucfg.out_channels).astype(np.float32)
    t = rng.randint(0, 1000, batch).astype(np.int32)
    labels = rng.randint(0, ucfg.num_classes, batch).astype(np.int32) if ucfg.num_classes else None
    return x, t, labels, target


def jax_step_fn(jm):
    """``(step, params, opt_state)``: jitted ``step(params, opt_state, x, t, labels, target) -> (params,
    opt_state, loss)`` with donated parameters and optimizer state."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params = nnx.split(jm, nnx.Param)
    tx = optax.adam(1e-4, b1=0.9, b2=0.999, eps=1e-8)
    opt_state = tx.init(params)

    def step(p, s, x, t, labels, target):
        def loss_fn(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, labels=labels) - target))
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss
    return jax.jit(step, donate_argnums=(0, 1)), params, opt_state


def torch_step_fn(tm):
    import torch
    opt = torch.optim.Adam(tm.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    tm.train()

    def step(x, t, labels, target):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(tm(x, t, class_labels=labels).sample, target)
        loss.backward()
        opt.step()
        return loss
    return step


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


def run_model(name: str, batch: int, repeats: int, warmup: int, variants: list[str], profile: bool, log,
              threads: int = 2, extra_threads: tuple[int, ...] = ()) -> dict:
    """Time ``variants`` (conv kernel-gradient settings, see ``jaxdiff.nn.layers.set_conv_grad_impl``) of
    the jaxdiff step and the PyTorch step, interleaved; one result per variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxdiff.nn import layers
    from jaxdiff.nn.unet import count_params

    c = _config(name)
    size = int(c.data.image_size)
    jm, tm, ucfg = build_pair(name)
    x, t, labels, target = make_batch(ucfg, batch, size)
    jargs = (jnp.asarray(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels), jnp.asarray(target))
    targs = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64)),
             None if labels is None else torch.from_numpy(labels.astype(np.int64)),
             torch.from_numpy(target.transpose(0, 3, 1, 2).copy()))
    tstep = torch_step_fn(tm)
    tloss = float(tstep(*targs).detach())

    before = layers.conv_grad_impl()
    runners, info = {}, {}
    for v in variants:
        layers.set_conv_grad_impl(VARIANTS[v])
        step, params, opt_state = jax_step_fn(jm)       # fresh copies of the initial weights per variant
        params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))
        t0 = time.perf_counter()
        compiled = step.lower(params, opt_state, *jargs).compile()
        state = {"p": params, "s": opt_state}
        state["p"], state["s"], jloss = compiled(state["p"], state["s"], *jargs)
        jloss = float(jloss)
        compile_s = time.perf_counter() - t0
        rel = abs(jloss - tloss) / max(abs(tloss), 1e-12)
        log(f"{name} [{v}]: first-step loss jaxdiff {jloss:.6f} torch {tloss:.6f} (rel diff {rel:.1e}); "
            f"jax compile + first step {compile_s:.1f} s")
        if rel > 1e-4:
            raise SystemExit(f"{name}: first-step losses disagree ({jloss} vs {tloss}); not the same model")

        def jrun(compiled=compiled, state=state):
            state["p"], state["s"], loss = compiled(state["p"], state["s"], *jargs)
            loss.block_until_ready()
        runners[v] = jrun
        info[v] = {"compile_s": compile_s, "loss": jloss, "rel": rel, "compiled": compiled, "state": state}
    layers.set_conv_grad_impl(before)

    def torch_run(n):
        torch.set_num_threads(n)
        try:
            tstep(*targs)
        finally:
            torch.set_num_threads(threads)
    runners["torch"] = lambda: torch_run(threads)
    for n in extra_threads:
        runners[f"torch_{n}t"] = lambda n=n: torch_run(n)

    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}                 # process CPU time (all threads): robust to the load
    keys = list(runners)
    for i in range(repeats):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:     # rotate who goes first
            t0, c0 = time.perf_counter(), time.process_time()
            runners[k]()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    tt = times["torch"]
    mt = statistics.median(tt)
    out = {"model": name, "batch": batch, "params": count_params(jm), "image": [size, size, ucfg.in_channels],
           "repeats": repeats, "warmup": warmup, "torch_ms": 1e3 * mt, "torch_min_ms": 1e3 * min(tt),
           "torch_runs_ms": [1e3 * v for v in tt], "first_loss_torch": tloss, "variants": [],
           "torch_cpu_ms": cpu_ms["torch"],
           "torch_threads": threads, "torch_other_threads": [
               {"threads": n, "torch_ms": 1e3 * statistics.median(times[f"torch_{n}t"]),
                "torch_min_ms": 1e3 * min(times[f"torch_{n}t"]), "torch_cpu_ms": cpu_ms[f"torch_{n}t"],
                "torch_runs_ms": [1e3 * v for v in times[f"torch_{n}t"]]} for n in extra_threads]}
    for o in out["torch_other_threads"]:
        log(f"{name} b={batch}: torch with {o['threads']} thread(s): {o['torch_ms']:.1f} ms (min {o['torch_min_ms']:.1f}, "
            f"CPU {o['torch_cpu_ms']:.0f})")
    for v in variants:
        tj = times[v]
        mj = statistics.median(tj)
        row = {"variant": v, "conv_grad_impl": VARIANTS[v], "jax_ms": 1e3 * mj, "ratio": mt / mj,
               "jax_min_ms": 1e3 * min(tj), "ratio_min": min(tt) / min(tj), "jax_compile_s": info[v]["compile_s"],
               "jax_cpu_ms": cpu_ms[v], "ratio_cpu": cpu_ms["torch"] / cpu_ms[v],
               "first_loss_jax": info[v]["loss"], "first_loss_rel_diff": info[v]["rel"],
               "jax_runs_ms": [1e3 * x for x in tj]}
        out["variants"].append(row)
        log(f"{name} b={batch} [{v}]: jaxdiff {row['jax_ms']:.1f} ms  torch {out['torch_ms']:.1f} ms  ratio "
            f"{row['ratio']:.2f} | min: jaxdiff {row['jax_min_ms']:.1f} torch {out['torch_min_ms']:.1f} ratio "
            f"{row['ratio_min']:.2f} | CPU: jaxdiff {row['jax_cpu_ms']:.0f} torch {out['torch_cpu_ms']:.0f} ratio "
            f"{row['ratio_cpu']:.2f}  (load {os.getloadavg()[0]:.1f})")
    if profile:
        for v in variants:
            p = profile_ops(info[v]["compiled"], info[v]["state"], jargs)
            next(r for r in out["variants"] if r["variant"] == v)["profile"] = p
            log(f"   profile [{v}]: {p['traced_wall_ms']:.1f} ms per traced step, ops {p['ops_total_ms']:.1f} ms")
            for r in p["by_category"]:
                log(f"   {r['ms_per_step']:8.2f} ms  {r['category']}")
        p = out["torch_profile"] = profile_torch(runners["torch"])
        log(f"   torch profile: {p['traced_wall_ms']:.1f} ms per traced step, ops {p['ops_total_ms']:.1f} ms")
        for r in p["by_category"]:
            log(f"   {r['ms_per_step']:8.2f} ms  {r['category']}")
    return out


# (batch, H, W, C_in, C_out, kernel, stride): the convolutions of the digits (batch 64) and cifar10 (batch 8) UNets
CONV_LAYERS = [(64, 16, 16, 16, 16, 3, 1), (64, 16, 16, 48, 16, 3, 1), (64, 8, 8, 32, 32, 3, 1),
               (64, 16, 16, 16, 16, 3, 2), (64, 4, 4, 64, 32, 3, 1), (64, 16, 16, 48, 16, 1, 1),
               (8, 32, 32, 128, 128, 3, 1), (8, 32, 32, 256, 128, 3, 1), (8, 16, 16, 256, 256, 3, 1),
               (8, 8, 8, 256, 256, 3, 1), (8, 4, 4, 512, 256, 3, 1), (8, 32, 32, 128, 128, 3, 2),
               (8, 16, 16, 512, 256, 1, 1)]


def conv_layer_ab(repeats: int, log) -> list[dict]:
    """Gradient (input and kernel) of one convolution, ``"matmul"`` vs ``"xla"`` kernel gradient, interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.nn import layers
    before, rows = layers.conv_grad_impl(), []
    for (b, h, w, ci, co, k, st) in CONV_LAYERS:
        p = (k - 1) // 2
        pad = ((p, p), (p, p))
        rng = np.random.RandomState(0)
        x = jnp.asarray(rng.randn(b, h, w, ci).astype(np.float32))
        kern = jnp.asarray(0.1 * rng.randn(k, k, ci, co).astype(np.float32))
        fns = {}
        for impl in ("matmul", "xla"):
            layers.set_conv_grad_impl(impl)
            g = jax.jit(jax.grad(lambda x, kern: jnp.sum(layers.conv2d(x, kern, st, pad) ** 2), argnums=(0, 1)))
            fns[impl] = g.lower(x, kern).compile()
            jax.block_until_ready(fns[impl](x, kern))
        times = {i: [] for i in fns}
        for _ in range(repeats):
            for impl, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, kern))
                times[impl].append(time.perf_counter() - t0)
        r = {"shape_bhwc": [b, h, w, ci], "c_out": co, "kernel": k, "stride": st,
             **{f"{i}_ms": 1e3 * statistics.median(v) for i, v in times.items()}}
        r["xla_speedup"] = r["matmul_ms"] / r["xla_ms"]
        rows.append(r)
        log(f"conv grad B{b} {h}x{w} {ci}->{co} k{k} s{st}: matmul {r['matmul_ms']:.2f} ms, xla {r['xla_ms']:.2f} ms "
            f"(xla {r['xla_speedup']:.2f}x)")
    layers.set_conv_grad_impl(before)
    return rows


def machine() -> dict:
    import jax
    m = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
         "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        import diffusers
        m["torch"], m["diffusers"] = torch.__version__, diffusers.__version__
    except ImportError:
        pass
    return m


def write_results(res: dict, out: str) -> None:
    """``<out>.json`` (everything, per-run times included) and ``<out>.md`` (tables and notes)."""
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    m = res["machine"]
    lines = ["# One training step: jaxdiff (jit) vs diffusers/PyTorch (eager), same architecture and weights", "",
             f"Command: `{res['command']}`" + (f" with `XLA_FLAGS={res['xla_flags']}`" if res["xla_flags"] else "")
             + f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(res['time']))}, {res['wall_s']:.0f} s).", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, shared with other engineers' jobs: load average "
             f"{res['loadavg_start']} at the start, {res['loadavg_end']} at the end (1/5/15 min). jax {m['jax']} "
             f"({res['jax_backend']}), torch {m.get('torch')} ({res['torch_threads']} threads), diffusers "
             f"{m.get('diffusers')}, {m['platform']}.", "",
             "One step = forward, MSE against a fixed target, backward, Adam (lr 1e-4) on a fixed batch, dropout 0; "
             "both models start from the same weights (jaxdiff exported into diffusers' `UNet2DModel` with "
             "`jaxdiff.convert`) and their first-step losses agree (column *loss rel. diff*). Each round times every "
             "jaxdiff variant and the PyTorch step back to back, rotating who goes first; "
             f"{res['rows'][0]['warmup'] if res['rows'] else 0} warm-up rounds. *ratio* = PyTorch ms / jaxdiff ms "
             "(> 1: jaxdiff faster), from medians; *ratio (min)* from the fastest round of each; *CPU ms* = median "
             "process CPU time per step (all threads), which the other jobs' load moves least; *ratio (CPU)* compares "
             "the CPU work of the two (with 2 busy threads a step's wall time on an idle machine is about half of it "
             "when both threads stay busy).", "",
             "Variants: *before* = every convolution's kernel gradient as tap matmuls (`conv_grad_impl=\"matmul\"`, "
             "what jaxdiff did before issue 13); *after* = the default (`\"auto\"`: XLA's convolution gradient, "
             "tap matmuls only for 1x1 convolutions on CPU).", "",
             "| model | batch | params | rounds | variant | jaxdiff ms/step | PyTorch ms/step | ratio | jaxdiff min ms "
             "| PyTorch min ms | ratio (min) | jaxdiff CPU ms | PyTorch CPU ms | ratio (CPU) "
             "| jax compile + 1st step (s) | loss rel. diff |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        for v in r["variants"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['params']:,} | {r['repeats']} | {v['variant']} "
                         f"({v['conv_grad_impl']}) | {v['jax_ms']:.1f} | {r['torch_ms']:.1f} | **{v['ratio']:.2f}** | "
                         f"{v['jax_min_ms']:.1f} | {r['torch_min_ms']:.1f} | {v['ratio_min']:.2f} | "
                         f"{v['jax_cpu_ms']:.0f} | {r['torch_cpu_ms']:.0f} | {v['ratio_cpu']:.2f} | "
                         f"{v['jax_compile_s']:.1f} | {v['first_loss_rel_diff']:.1e} |")
    other = [(r, o) for r in res["rows"] for o in r.get("torch_other_threads", [])]
    if other:
        lines += ["", "PyTorch with other thread counts, timed in the same rounds (ratio against jaxdiff *after*):", "",
                  "| model | PyTorch threads | PyTorch ms/step | ratio | PyTorch min ms | ratio (min) | PyTorch CPU ms "
                  "| ratio (CPU) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r, o in other:
            v = r["variants"][-1]
            lines.append(f"| {r['model']} | {o['threads']} | {o['torch_ms']:.1f} | {o['torch_ms'] / v['jax_ms']:.2f} | "
                         f"{o['torch_min_ms']:.1f} | {o['torch_min_ms'] / v['jax_min_ms']:.2f} | "
                         f"{o['torch_cpu_ms']:.0f} | {o['torch_cpu_ms'] / v['jax_cpu_ms']:.2f} |")
    for r in res["rows"]:
        tp = r.get("torch_profile")
        profs = [(v["variant"], v["profile"]) for v in r["variants"] if v.get("profile")]
        if not profs or not tp:
            continue
        cats = []
        for _, p in profs + [("torch", tp)]:
            cats += [c["category"] for c in p["by_category"] if c["category"] not in cats]
        get = lambda p, c: next((x["ms_per_step"] for x in p["by_category"] if x["category"] == c), 0.0)
        lines += ["", f"### Where the time goes: {r['model']}, batch {r['batch']}", "",
                  "ms per step by category: jaxdiff from a `jax.profiler` trace (XLA:CPU thunk events of the "
                  "step's HLO instructions, categorised by the jax op they come from), PyTorch from "
                  "`torch.profiler` (self CPU time per aten op). 3 traced steps each; the machine load makes "
                  "absolute numbers move, compare rows. *traced step* = wall time per step while tracing.", "",
                  "| category | " + " | ".join(f"jaxdiff {n}" for n, _ in profs) + " | PyTorch |",
                  "|---|" + "---:|" * (len(profs) + 1)]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(f"{get(p, c):.1f}" for _, p in profs) + f" | {get(tp, c):.1f} |")
        lines.append("| sum of ops | " + " | ".join(f"{p['ops_total_ms']:.1f}" for _, p in profs)
                     + f" | {tp['ops_total_ms']:.1f} |")
        lines.append("| traced step (wall) | " + " | ".join(f"{p['traced_wall_ms']:.1f}" for _, p in profs)
                     + f" | {tp['traced_wall_ms']:.1f} |")
        p = profs[-1][1]
        lines += ["", f"Top jaxdiff ops ({profs[-1][0]}):", "", "| ms/step | op | jax source |", "|---:|---|---|"]
        lines += [f"| {o['ms_per_step']:.2f} | `{o['op']}` | `{o['source'][-70:]}` |" for o in p["top_ops"][:10]]
        lines += ["", "Top PyTorch ops:", "", "| ms/step | op |", "|---:|---|"]
        lines += [f"| {o['ms_per_step']:.2f} | `{o['op']}` |" for o in tp["top_ops"][:10]]
    if res.get("conv_layers_command"):
        lines += ["", f"Conv layers: `{res['conv_layers_command']}` (load {res.get('conv_layers_load')})."]
    if res.get("conv_layers"):
        lines += ["", "### Conv kernel gradient per layer shape (`--conv-layers`)", "",
                  "Gradient (input and kernel) of one convolution, median of 7 interleaved calls.", "",
                  "| input (B, H, W, C) | C out | kernel | stride | matmul ms | xla ms | xla speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {tuple(r['shape_bhwc'])} | {r['c_out']} | {r['kernel']} | {r['stride']} | {r['matmul_ms']:.2f} | "
                  f"{r['xla_ms']:.2f} | {r['xla_speedup']:.2f} |" for r in res["conv_layers"]]
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


NOTES: list[str] = [
    "Load: the 2 cores were shared with three other engineers' test suites and benchmarks (load average 8-16 "
    "during this run). Wall times of both frameworks move by 2-10x between rounds; PyTorch with 2 threads "
    "suffers most: its OpenMP threads spin at every op's barrier while the other thread is descheduled, so its "
    "step burns 2.4 CPU-s (digits) and 8.9 CPU-s (cifar10) and its rounds spread from 0.66 to 12.8 s (digits). "
    "The PyTorch-2-thread medians are therefore no estimate of an idle machine, and the large *ratio* values "
    "above say more about the load than about the frameworks. Two load-robust comparisons are given: *CPU ms* "
    "(process CPU time per step) and PyTorch with 1 thread, timed in the same rounds (no barriers to stall).",
    "Against PyTorch with 1 thread (oneDNN's CPU work, no spinning), after the change: wall-time ratio 0.99 "
    "(digits) and 1.02 (cifar10) by median, 0.89 and 0.84 by minimum; CPU work: PyTorch needs 0.68x (digits, "
    "86 vs 128 CPU-ms) and 0.83x (cifar10, 1.90 vs 2.28 CPU-s) of jaxdiff's. So on an idle 2-core machine, if "
    "PyTorch's 2 threads scaled well, oneDNN would still be 1.2-1.5x ahead in work per step; issue 13's quiet-"
    "machine numbers (PyTorch 2 threads: 176 ms, 3.34 s) put its 2-thread scaling well below that, and jaxdiff "
    "after the change (digits 124 ms, cifar10 4.4 s minimum at load 15; 2.7 s minimum at load 9 in an earlier "
    "run) is at or past them.",
    "Before/after (same process, interleaved, so the same load for both): the jaxdiff step needs 1.40x less CPU "
    "on digits (179 -> 128 CPU-ms; wall medians 321 -> 232 ms, minima 179 -> 124 ms) and 1.11x less on cifar10 "
    "(2.53 -> 2.28 CPU-s; wall medians 5.12 -> 4.91 s). An earlier run of the same command at load 6-11 gave "
    "digits 200 -> 126 ms and cifar10 8.58 -> 5.01 s (medians). Both variants give the same first-step loss as "
    "PyTorch (relative difference 0 and 1e-7).",
    "Conv kernel gradient (jaxdiff.nn.layers.set_conv_grad_impl, env JAXDIFF_CONV_GRAD): jax 0.10.2's XLA:CPU "
    "runs convolutions through YNNPACK (`ynn_fusion` ops in the profile), and its backward-filter convolution "
    "(two layout transposes + one YNNPACK conv) is cheaper than the old tap-matmul custom_vjp, whose kh*kw "
    "strided input copies cost more than the matmuls themselves (profile: 'tap copies' 243 of 466 ms on "
    "digits, 2.4 of 9.8 s on cifar10). The per-layer table above: XLA's gradient is 1.2-3.2x faster on 8 of "
    "the 11 3x3 convs of the two models, at par on 2, 10% slower at 4x4x512; the tap matmul (one matmul, no "
    "copies) is 1.6-3.5x faster on the 1x1 convs. Default \"auto\": tap matmul "
    "for 1x1 convs on the CPU backend only, XLA's gradient for everything else and on GPU/TPU.",
    "XLA flags (jax 0.10.2, digits step, one process per setting alternating with a defaults process; median "
    "process CPU ms/step, defaults 112-125): --xla_cpu_use_onednn=true ~2x slower (wall 514 vs 260 ms, compile "
    "48 s vs 22 s); --xla_cpu_experimental_onednn_fusion_type=dot 116 vs 112 (no change); "
    "--xla_cpu_experimental_ynn_fusion_type=+eltwise 132 vs 119 (slower); ..._ynn_fusion_type=-reduce 126 vs "
    "117 (slower); --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY 115 vs 125 and "
    "--xla_cpu_multi_thread_eigen=false 119 vs 121 (within the noise). None is recommended: "
    "jaxdiff.nn.cpu_flags.recommended_xla_flags() returns an empty string; the CLI applies it before the "
    "backend starts, so a future measured win reaches train.py/sample.py by editing that one module. Pinning "
    "the jaxdiff process to one core (taskset) made the digits step slower in wall time (214-222 vs 126-160 "
    "ms) at the same CPU time: XLA:CPU's 2 threads do help, unlike PyTorch's under load.",
    "GroupNorm: a one-pass formulation (shifted sums of x and x^2 in float32, one read of x) was 8% slower "
    "than the current two-pass, channels-minor one on the digits step (in-process A/B: 125 vs 116 ms median); "
    "kept the current one. SiLU: `jax.nn.silu` already fuses into the GroupNorm affine pass "
    "(`add_divide_fusion`). Attention (jax.nn.dot_product_attention, XLA implementation): all matmuls together "
    "are 3 ms of the digits step and 3% of cifar10's; not worth another implementation at these sizes.",
    "Where XLA:CPU does not match PyTorch/oneDNN (CPU work 1.5x on digits, 1.2x on cifar10, see above), from "
    "the jaxdiff profile (the 2-thread PyTorch profile is dominated by barrier waits under this load, so it "
    "shows structure, not per-op speed): (1) the conv kernel gradient's two layout transposes "
    "(`transpose_copy_fusion`, activations to channels-major with batch minor) before its YNNPACK convolution: "
    "18 of 156 ms on digits (11%), 0.80 of 9.2 s on cifar10 (9%); oneDNN's backward-weights kernel reads NHWC "
    "directly. (2) memory-bound elementwise passes (GroupNorm statistics and affine, SiLU, residual adds, skip "
    "concatenations; forward and backward): 62 of 156 ms on digits (39%, the largest share at 16-32 channels "
    "where the convs are cheap), 1.5 of 9.2 s on cifar10 (17%). (3) conv backward itself is 2.3x the forward on "
    "cifar10 (4.5 vs 2.0 s: input gradient + kernel gradient, about the expected 2x).",
    "Time to first step, `python train.py --config configs/digits.py --workdir /tmp/x --config.train.steps=1` "
    "(load ~8, the CLI's persistent compilation cache in a fresh folder via JAXDIFF_COMPILATION_CACHE): cold "
    "49.0 s wall (train step compiled in 30.7 s, first step done 42.9 s after start); warm (same folder, second "
    "run) 20.4 s wall (compile 6.1 s, first step 15.1 s after start).",
    "make demo (configs/digits.py now 1,200 steps at batch 64, no in-training sample grid; fresh workdir, cold "
    "compilation cache; two runs, load 7-10): train.py 212 / 234 s (6.4-7.4 steps/s) + sample.py --num 100 "
    "--steps 10 --eval digits 22 / 25 s = 233 / 259 s; class agreement 1.00 both times (the 2,000-step config "
    "took ~13 min on a fresh machine, per issue 13).",
    "Commands: `python benchmarks/train_vs_pytorch.py --profile --conv-layers` (this file); flag A/B: the same "
    "step timed in one process per XLA_FLAGS setting; demo: the two `make demo` commands with a fresh --workdir.",
]


def main(argv=None):
    args = _args(argv)
    if args.from_json:
        with open(args.out + ".json") as f:
            res = json.load(f)
        res["notes"] = NOTES
        write_results(res, args.out)
        return res
    if args.recommended_flags:
        from jaxdiff.nn.cpu_flags import apply_recommended_xla_flags
        apply_recommended_xla_flags()
    import jax
    import torch

    torch.set_num_threads(args.threads)
    res = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + (argv or sys.argv[1:])),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "label": args.label, "machine": machine(),
           "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
           "loadavg_start": [round(v, 2) for v in os.getloadavg()], "rows": []}
    t_start = res["time"] = time.time()
    log = lambda s: print(s, flush=True)
    log(f"load {res['loadavg_start']}  XLA_FLAGS={res['xla_flags']!r}")
    for name in [m for m in args.models.split(",") if m and m != "none"]:
        batch, reps = CASES[name]
        extra = tuple(int(n) for n in args.extra_torch_threads.split(",") if n.strip())
        res["rows"].append(run_model(name, batch, args.repeats or reps, args.warmup, args.variants.split(","),
                                     args.profile, log, args.threads, extra))
    if args.conv_layers:
        res["conv_layers"] = conv_layer_ab(7, log)
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_s"] = time.time() - t_start
    log(f"load at end {res['loadavg_end']}; {res['wall_s']:.0f} s")
    res["notes"] = NOTES
    if not args.no_write:
        write_results(res, args.out)
        log(f"wrote {args.out}.md and .json")
    return res


if __name__ == "__main__":
    main()
