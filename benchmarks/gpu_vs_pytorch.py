"""jaxdiff against diffusers/PyTorch on one GPU: the UNet training step and a 50-step sampling loop.

    python benchmarks/gpu_vs_pytorch.py                      # what results/gpu_vs_pytorch.* holds
    python benchmarks/gpu_vs_pytorch.py --train digits:64 --sample none --repeats 5 --out /tmp/x

Same architecture and the same weights on both sides (``train_vs_pytorch.build_pair``: a jaxdiff ``UNet``
from the training config, exported into a diffusers ``UNet2DModel``), on the same GPU in one process.

* Train step (``--train NAME:BATCH,...``): forward on a fixed noisy batch, MSE, backward, Adam -- ``jax.jit``
  with donated state against PyTorch eager (what diffusers' training scripts run). Precision modes: ``tf32``
  (each framework's GPU default for float32: JAX's default matmul/conv precision, PyTorch with
  ``allow_tf32`` on for matmuls and cuDNN) and ``fp32`` (JAX ``default_matmul_precision="highest"``,
  PyTorch ``allow_tf32`` off). The first-step losses must agree (relative difference below 1e-4 in fp32,
  1e-2 in tf32) or the run stops.
* Sampling (``--sample NAME:BATCH,...``): 50 DDIM steps from the same start noise -- jaxdiff's ``Sampler``
  (one compiled program) against diffusers' ``DDIMScheduler`` loop calling the PyTorch UNet under
  ``torch.no_grad()``; both with the start noise on the host and the images copied back, so both time the
  whole call. The outputs are compared (max abs difference over max abs value).

Timing: ``--warmup`` calls of each, then ``--repeats`` rounds alternating which side goes first; every call
ends with a device synchronisation; medians reported with the ratio ``torch_ms / jax_ms`` (> 1: jaxdiff
faster). Results go to ``<out>.json`` and ``<out>.md`` as each case finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cuda")      # JAX_PLATFORMS=cpu: a smoke test of this script on CPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

from train_vs_pytorch import _config, build_pair, jax_step_fn, make_batch, torch_step_fn  # noqa: E402


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default="digits:64,digits:512,cifar10:8,cifar10:128",
                    help="NAME:BATCH cases of the training step ('none': skip)")
    ap.add_argument("--fp32", default="digits:512,cifar10:128", help="cases also timed in full fp32")
    ap.add_argument("--sample", default="digits:1024,cifar10:128", help="NAME:BATCH cases of 50-step DDIM")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--sample-repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(RESULTS, "gpu_vs_pytorch"))
    return ap.parse_args(argv)


def _cases(text):
    return [] if text in ("", "none") else [(c.split(":")[0], int(c.split(":")[1])) for c in text.split(",")]


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_precision(mode: str):
    import jax
    import torch
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    jax.config.update("jax_default_matmul_precision", None if tf32 else "highest")


def interleaved(runners: dict, repeats: int, warmup: int) -> dict:
    """``{name: [seconds]}``: ``warmup`` calls of each runner, then ``repeats`` rounds, rotating who goes first."""
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    times, keys = {k: [] for k in runners}, list(runners)
    for i in range(repeats):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            t0 = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def train_case(name: str, batch: int, mode: str, repeats: int, warmup: int, log) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxdiff.nn.unet import count_params

    set_precision(mode)
    size = int(_config(name).data.image_size)
    jm, tm, ucfg = build_pair(name)
    dev = _device()
    tm = tm.to(dev)
    x, t, labels, target = make_batch(ucfg, batch, size)
    jargs = jax.device_put((jnp.asarray(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels),
                            jnp.asarray(target)))
    targs = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev), torch.from_numpy(t.astype(np.int64)).to(dev),
             None if labels is None else torch.from_numpy(labels.astype(np.int64)).to(dev),
             torch.from_numpy(target.transpose(0, 3, 1, 2).copy()).to(dev))
    tstep = torch_step_fn(tm)
    tloss = float(tstep(*targs).detach())
    step, params, opt_state = jax_step_fn(jm)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, *jargs).compile()
    state = {}
    state["p"], state["s"], jloss = compiled(params, opt_state, *jargs)
    jloss = float(jloss)
    compile_s = time.perf_counter() - t0
    rel = abs(jloss - tloss) / max(abs(tloss), 1e-12)
    tol = 1e-4 if mode == "fp32" else 1e-2
    if rel > tol:
        raise SystemExit(f"{name} b{batch} {mode}: first-step losses disagree ({jloss} vs {tloss}, rel {rel:.1e})")

    def jrun():
        state["p"], state["s"], loss = compiled(state["p"], state["s"], *jargs)
        loss.block_until_ready()

    def trun():
        tstep(*targs)
        _sync()

    times = interleaved({"jax": jrun, "torch": trun}, repeats, warmup)
    mj, mt = statistics.median(times["jax"]), statistics.median(times["torch"])
    row = {"kind": "train", "model": name, "batch": batch, "precision": mode, "params": count_params(jm),
           "jax_ms": 1e3 * mj, "torch_ms": 1e3 * mt, "ratio": mt / mj,
           "jax_min_ms": 1e3 * min(times["jax"]), "torch_min_ms": 1e3 * min(times["torch"]),
           "jax_compile_s": compile_s, "first_loss_jax": jloss, "first_loss_torch": tloss, "first_loss_rel": rel,
           "images_per_s_jax": batch / mj, "images_per_s_torch": batch / mt}
    log(f"train {name} b{batch} {mode}: jaxdiff {row['jax_ms']:.2f} ms torch {row['torch_ms']:.2f} ms "
        f"ratio {row['ratio']:.2f} (compile {compile_s:.1f} s, loss rel diff {rel:.1e})")
    del tm, tstep
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def sample_case(name: str, batch: int, repeats: int, warmup: int, log, steps: int = 50) -> dict:
    import diffusers
    import jax
    import numpy as np
    import torch

    from jaxdiff.nn.functional import make_apply, split_model
    from jaxdiff.noise import make_process
    from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel
    from jaxdiff.timesteps.grids import diffusers_indices, grid_from_indices

    set_precision("tf32")
    size = int(_config(name).data.image_size)
    jm, tm, ucfg = build_pair(name)
    dev = _device()
    tm = tm.to(dev).eval()
    graphdef, params, rest = split_model(jm)
    from flax import nnx
    proc = make_process("vp_linear")
    model = SamplingModel(apply=make_apply(graphdef, rest), params=nnx.to_pure_dict(params), process=proc,
                          prediction="eps", shape=(size, size, ucfg.in_channels), num_classes=ucfg.num_classes,
                          class_null=ucfg.class_null)
    grid = grid_from_indices(proc, diffusers_indices(steps, "leading", style="ddim"), final="zero")
    sampler = Sampler(model, SamplerSettings(solver="ddim", steps=steps), grid=np.asarray(grid))
    rng = np.random.RandomState(0)
    x_np = rng.randn(batch, size, size, ucfg.in_channels).astype(np.float32)
    labels = rng.randint(0, ucfg.num_classes, batch).astype(np.int32) if ucfg.num_classes else None
    jparams = jax.device_put(model.params)
    key = jax.random.key(0)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", clip_sample=False, timestep_spacing="leading")
    tlabels = None if labels is None else torch.from_numpy(labels.astype(np.int64)).to(dev)

    def jrun():
        return sampler(jparams, labels, key, num=batch, x_T=x_np)

    def trun():
        with torch.no_grad():
            sched.set_timesteps(steps)
            x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(dev)
            for t in sched.timesteps:
                eps = tm(x, t.to(dev), class_labels=tlabels).sample
                x = sched.step(eps, t, x).prev_sample
            return x.cpu().numpy().transpose(0, 2, 3, 1)

    t0 = time.perf_counter()
    out_j = jrun()
    compile_s = time.perf_counter() - t0
    out_t = trun()
    diff = float(np.max(np.abs(out_j - out_t)) / np.max(np.abs(out_t)))
    times = interleaved({"jax": jrun, "torch": trun}, repeats, warmup=1)
    mj, mt = statistics.median(times["jax"]), statistics.median(times["torch"])
    row = {"kind": "sample", "model": name, "batch": batch, "steps": steps, "solver": "DDIM", "precision": "tf32",
           "jax_ms": 1e3 * mj, "torch_ms": 1e3 * mt, "ratio": mt / mj, "jax_compile_s": compile_s,
           "max_rel_diff": diff, "images_per_s_jax": batch / mj, "images_per_s_torch": batch / mt}
    log(f"sample {name} b{batch} DDIM-{steps}: jaxdiff {row['jax_ms']:.1f} ms torch {row['torch_ms']:.1f} ms "
        f"ratio {row['ratio']:.2f} (compile {compile_s:.1f} s, max rel diff {diff:.1e})")
    del tm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def machine() -> dict:
    import diffusers
    import flax
    import jax
    import torch
    return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "jax_devices": [str(d) for d in jax.devices()], "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU smoke test)",
            "cpu_cores": os.cpu_count()}


def write(res: dict, out: str) -> None:
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    m = res["machine"]
    lines = ["# jaxdiff vs diffusers/PyTorch on one GPU", "",
             f"Written by `{res['command']}`. Machine: {m['gpu']}, jax {m['jax']} (flax {m['flax']}), torch "
             f"{m['torch']}, diffusers {m['diffusers']}. Same architecture and weights on both sides; ratio = "
             "PyTorch time / jaxdiff time (> 1: jaxdiff faster); medians of interleaved rounds. How each side is "
             "timed: the docstring of `benchmarks/gpu_vs_pytorch.py`.", "",
             "## Training step (forward, MSE, backward, Adam)", "",
             "| model | batch | precision | jaxdiff ms | PyTorch ms | ratio | jaxdiff img/s | compile s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["kind"] == "train":
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['jax_ms']:.2f} | {r['torch_ms']:.2f} | "
                         f"**{r['ratio']:.2f}x** | {r['images_per_s_jax']:.0f} | {r['jax_compile_s']:.1f} |")
    lines += ["", "## Sampling: 50 DDIM steps, start noise from the host, images back to the host", "",
              "| model | batch | jaxdiff ms | PyTorch ms | ratio | jaxdiff img/s | compile s | max rel diff |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["kind"] == "sample":
            lines.append(f"| {r['model']} | {r['batch']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | "
                         f"**{r['ratio']:.2f}x** | {r['images_per_s_jax']:.0f} | {r['jax_compile_s']:.1f} | "
                         f"{r['max_rel_diff']:.1e} |")
    if res.get("errors"):
        lines += ["", "## Cases that failed", ""] + [f"- {e}" for e in res["errors"]]
    lines += ["", res.get("notes", "")]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = _args(argv)
    res = {"command": " ".join(["benchmarks/gpu_vs_pytorch.py"] + (argv or sys.argv[1:])), "machine": machine(),
           "rows": [], "errors": [], "time": time.time()}
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(json.dumps(res["machine"]))
    jobs = [(train_case, (n, b, "tf32", args.repeats, args.warmup)) for n, b in _cases(args.train)]
    jobs += [(train_case, (n, b, "fp32", args.repeats, args.warmup)) for n, b in _cases(args.fp32)]
    jobs += [(sample_case, (n, b, args.sample_repeats, 1)) for n, b in _cases(args.sample)]
    for fn, a in jobs:
        try:
            res["rows"].append(fn(*a, log=log))
        except Exception as e:  # one broken case must not lose the others' results
            res["errors"].append(f"{fn.__name__}{a[:3]}: {type(e).__name__}: {e}")
            log(res["errors"][-1])
        write(res, args.out)
    return res


if __name__ == "__main__":
    main()
