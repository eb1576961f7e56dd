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

from step_profile import profile_ops, profile_torch  # noqa: E402
from train_vs_pytorch_report import NOTES, write_results  # noqa: E402


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
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from jaxdiff.convert import export_state_dict, unet_config_to_diffusers
    from jaxdiff.nn import UNet

    ucfg = unet_config(_config(name))
    jm = UNet(ucfg, rngs=nnx.Rngs(seed))
    # every parameter moved off its initial value (the output conv starts at zero, which would make the
    # prediction 0 and the first-step loss mean(target^2) on both sides, whatever the rest of the network)
    params = nnx.state(jm, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(jm, jax.tree.unflatten(treedef, [v + 0.02 * jax.random.normal(k, v.shape, v.dtype)
                                                for v, k in zip(leaves, keys)]))
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
