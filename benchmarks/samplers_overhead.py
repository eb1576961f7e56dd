"""Part (2) of the samplers benchmark: jaxdiff's per-step solver overhead vs diffusers.

A 50-step loop with the trivial model eps = 0.1 x on a (64, 3, 32, 32) float32 batch: jaxdiff's `sample`
(whole loop jitted) vs diffusers' scheduler loop with torch tensors, for DDIM, DPM-Solver++(2M), UniPC
(bh2, order 2) and Euler. The cost of the model alone (the same loop without the solver step) is measured on
each side and subtracted; medians of repeats.

The measurement runs float32 end to end in a fresh interpreter without x64 (`_overhead_subprocess` re-invokes
`benchmarks/samplers.py --overhead-worker`, which calls `run_overhead`). Used by `benchmarks/samplers.py`;
not meant to be run on its own.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.solvers import DDIM, DPMSolverMultistep, Euler, UniPC, sample  # noqa: E402
from jaxdiff.timesteps.grids import diffusers_indices, grid_from_indices, make_grid  # noqa: E402

# the script whose hidden `--overhead-worker` mode runs `run_overhead` (it turns x64 off before JAX is used)
SAMPLERS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samplers.py")


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def run_overhead(repeats, steps=50, shape=(64, 3, 32, 32)):
    import torch
    import diffusers
    torch.set_num_threads(2)
    proc = make_process("vp_linear")
    configs = {
        "DDIM": (DDIM(), diffusers.DDIMScheduler, {"clip_sample": False}, ("leading", "ddim")),
        "DPM-Solver++(2M)": (DPMSolverMultistep(order=2, prediction="data"), diffusers.DPMSolverMultistepScheduler,
                             {}, ("linspace", "multistep")),
        "UniPC (bh2, order 2)": (UniPC(order=2, variant="bh2"), diffusers.UniPCMultistepScheduler, {},
                                 ("linspace", "multistep")),
        "Euler": (Euler(), diffusers.EulerDiscreteScheduler, {}, ("linspace", "multistep")),
    }
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape).astype(np.float32)
    x_j = jnp.asarray(x_np, jnp.float32)

    def model_j(x, t):
        return 0.1 * x

    def model_t(x):
        return 0.1 * x

    # model alone, jaxdiff side: the same scan with the solver step removed (x <- model(x, t))
    # (x rescale by a traced factor 10: keeps values out of denormals and cannot be folded into 0.1 by XLA)
    @jax.jit
    def model_loop_j(x, grid, scale):
        def body(x, t):
            return model_j(x, jnp.broadcast_to(t, (x.shape[0],))) * scale, None
        x, _ = jax.lax.scan(body, x, grid[:-1].astype(x.dtype))
        return x

    grid0 = make_grid("uniform_t", proc, steps, final="zero")
    ten = jnp.asarray(10.0, jnp.float32)
    jax.block_until_ready(model_loop_j(x_j, grid0, ten))

    # model alone, diffusers side: the python loop over 50 timesteps with the model call only
    xt = torch.from_numpy(x_np)

    def model_loop_t():
        for _ in range(steps):
            model_t(xt)

    def run_model_j():
        return jax.block_until_ready(model_loop_j(x_j, grid0, ten))

    earlier = {"DDIM": 130.0, "DPM-Solver++(2M)": 300.0, "UniPC (bh2, order 2)": 1270.0, "Euler": 130.0}
    rows = []
    for label, (solver, sched_cls, kw, (spacing, style)) in configs.items():
        sched = sched_cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          timestep_spacing=spacing, **kw)
        grid = grid_from_indices(proc, diffusers_indices(steps, spacing, style=style), final="zero")
        # jaxdiff
        tc = time.perf_counter()
        out_j = jax.block_until_ready(sample(model_j, proc, x_j, grid, solver=solver, prediction="eps"))
        compile_s = time.perf_counter() - tc

        def run_j():
            return jax.block_until_ready(sample(model_j, proc, x_j, grid, solver=solver, prediction="eps"))

        # diffusers
        def run_t():
            sched.set_timesteps(steps)
            x = xt * sched.init_noise_sigma
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)
                eps = model_t(xin)
                x = sched.step(eps, t, x).prev_sample
            return x

        load0 = os.getloadavg()[0]
        # one side at a time (no JAX thread pool spinning while torch runs), twice, alternating; the model-alone
        # loops are timed next to the solver loops so that both see the same machine load
        tj, mj = [], []
        tt = {2: [], 1: []}
        mt = {2: [], 1: []}
        with torch.no_grad():
            out_t = run_t()
            for _ in range(2 if repeats > 2 else 1):
                mj += _median_time(run_model_j, repeats)[1]
                tj += _median_time(run_j, repeats)[1]
                for nt in (2, 1):
                    torch.set_num_threads(nt)
                    mt[nt] += _median_time(model_loop_t, max(repeats // 2, 1))[1]
                    tt[nt] += _median_time(run_t, max(repeats // 2, 1))[1]
            torch.set_num_threads(2)
        med = lambda v: float(np.median(v))  # noqa: E731
        us = 1e6 / steps
        # parity (same grid, same math; DDIM with clip_sample=False): at sigma = 0 both states are x0
        diff = float(np.max(np.abs(np.asarray(out_j) - out_t.numpy())) / np.max(np.abs(out_t.numpy())))
        j_net = us * (med(tj) - med(mj))
        r = {
            "solver": label, "steps": steps,
            "jaxdiff_total_us_per_step": us * med(tj), "diffusers_total_us_per_step": us * med(tt[2]),
            "jaxdiff_model_us_per_step": us * med(mj), "diffusers_model_us_per_step": us * med(mt[2]),
            "jaxdiff_us_per_step_raw": j_net,
            "jaxdiff_us_per_step": max(j_net, 1.0), "jaxdiff_floored": j_net < 1.0,
            "diffusers_us_per_step": us * (med(tt[2]) - med(mt[2])),
            "diffusers_1thread_us_per_step": us * (med(tt[1]) - med(mt[1])),
            "diffusers_1thread_model_us_per_step": us * med(mt[1]),
            "jaxdiff_min_us_per_step": max(us * (min(tj) - min(mj)), 1.0),
            "diffusers_min_us_per_step": us * (min(tt[2]) - min(mt[2])),
            "diffusers_1thread_min_us_per_step": us * (min(tt[1]) - min(mt[1])),
            "diffusers_earlier_us_per_step": earlier[label],
            "jaxdiff_compile_s": compile_s, "max_rel_diff_vs_diffusers": diff, "load_avg_1min": load0,
            "jaxdiff_repeats_s": tj, "jaxdiff_model_repeats_s": mj,
            "diffusers_repeats_s": tt[2], "diffusers_model_repeats_s": mt[2],
            "diffusers_1thread_repeats_s": tt[1], "diffusers_1thread_model_repeats_s": mt[1],
        }
        rows.append(r)
        r["ratio"] = r["diffusers_us_per_step"] / r["jaxdiff_us_per_step"]
        r["ratio_total"] = r["diffusers_total_us_per_step"] / r["jaxdiff_total_us_per_step"]
        r["ratio_min"] = r["diffusers_min_us_per_step"] / r["jaxdiff_min_us_per_step"]
        r["ratio_1thread"] = r["diffusers_1thread_us_per_step"] / r["jaxdiff_us_per_step"]
        r["ratio_1thread_min"] = r["diffusers_1thread_min_us_per_step"] / r["jaxdiff_min_us_per_step"]
        r["ratio_vs_earlier"] = earlier[label] / r["jaxdiff_us_per_step"]
        print(f"  overhead {label}: jaxdiff {r['jaxdiff_us_per_step']:.1f} us/step, diffusers "
              f"{r['diffusers_us_per_step']:.1f} (1 thread {r['diffusers_1thread_us_per_step']:.1f}), load {load0:.1f}",
              flush=True)
    geo = float(np.exp(np.mean([np.log(max(r["ratio"], 1e-9)) for r in rows])))
    geo_total = float(np.exp(np.mean([np.log(r["ratio_total"]) for r in rows])))
    def gm(k):
        return float(np.exp(np.mean([np.log(max(r[k], 1e-9)) for r in rows])))
    geo_min = gm("ratio_min")
    settings = {"shape": list(shape), "dtype": "float32", "steps": steps, "model": "eps = 0.1 x",
                "torch_threads": torch.get_num_threads(), "repeats": repeats,
                "jaxdiff_timing": f"median of {(2 if repeats > 2 else 1) * repeats} calls of the public `sample` (block_until_ready, "
                                  "after a compiling call)",
                "diffusers_timing": f"median of {(2 if repeats > 2 else 1) * max(repeats // 2, 1)} runs of set_timesteps(50) + the python "
                                    "step loop (scale_model_input, model, step) under torch.no_grad(); default "
                                    "scheduler settings except DDIM clip_sample=False (jaxdiff does not clip)",
                "model_alone": "jaxdiff: jitted lax.scan of 50 steps x <- 10 * model(x, t) (x10 keeps values "
                               "out of denormals); diffusers: 50 python calls of the torch model",
                "process": "vp_linear (beta 1e-4..0.02 linear, 1000 steps); diffusers default spacings "
                           "(DDIM 'leading', others 'linspace'), final sigma = 0 on both sides",
                "torch": torch.__version__, "diffusers": diffusers.__version__}
    return {"settings": settings, "rows": rows, "geomean_ratio": geo, "geomean_ratio_total": geo_total,
            "geomean_ratio_min": geo_min, "geomean_ratio_1thread": gm("ratio_1thread"),
            "geomean_ratio_1thread_min": gm("ratio_1thread_min"), "geomean_ratio_vs_earlier": gm("ratio_vs_earlier")}


def _overhead_subprocess(quick):
    """Run the overhead part in a fresh interpreter without x64 (float32 end to end)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "overhead.json")
        subprocess.run([sys.executable, SAMPLERS_SCRIPT, "--overhead-worker", "--repeats",
                        str(2 if quick else 10), "--json", out], check=True)
        with open(out) as fh:
            return json.load(fh)


def _print_overhead(ov):
    print("overhead per step (model subtracted), jaxdiff vs diffusers:")
    for r in ov["rows"]:
        print(f"  {r['solver']:<22} {r['jaxdiff_us_per_step']:8.1f} us  {r['diffusers_us_per_step']:8.1f} us  "
              f"ratio {r['ratio']:6.1f}x")
    print(f"  geometric mean ratio {ov['geomean_ratio']:.1f}x (totals incl. model: {ov['geomean_ratio_total']:.1f}x; "
          f"diffusers 1 thread: {ov['geomean_ratio_1thread']:.1f}x; vs earlier diffusers numbers: "
          f"{ov['geomean_ratio_vs_earlier']:.1f}x)")
