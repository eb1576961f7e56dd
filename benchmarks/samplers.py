"""Benchmark of jaxdiff's samplers: quality on exact Gaussian mixtures, and per-step overhead vs diffusers.

  (1) Quality. Data = a 16-D random Gaussian mixture (`GaussianMixture.random`, 8 components) and the 2-D
      `GaussianMixture.toy_2d`; process = DDPM's discrete `vp_linear`; the exact eps-denoiser of the mixture.
      Every solver x time grid x NFE in {3, 4, 5, 6, 8, 10, 15, 20, 50}, grids ending at t_min and (full
      run) at sigma = 0. The number of steps is chosen so that the solver's NFE equals the budget (Heun:
      2N on a t_min grid, 2N-1 on a grid ending at sigma = 0; an NFE a solver cannot hit on a grid is
      skipped) and the NFE returned by `sample(..., return_nfe=True)` is recorded and checked.
      Metrics: RMSE to `reference_ode_solution` from the same x_T (deterministic solvers only), mean exact
      NLL -log p_data of the samples, and the sliced Wasserstein-2 distance to exact data samples.
      One compilation per (solver, number of steps); every grid and both final points reuse it (the grid
      is a traced argument). The number of traces is counted and reported.
  (2) Overhead. A 50-step loop with the trivial model eps = 0.1 x on a (64, 3, 32, 32) float32 batch:
      jaxdiff's `sample` (whole loop jitted) vs diffusers' scheduler loop with torch tensors, for DDIM,
      DPM-Solver++(2M), UniPC (bh2, order 2) and Euler. The cost of the model alone (the same loop without
      the solver step) is measured on each side and subtracted; medians of repeats.

    python benchmarks/samplers.py            # full run   -> benchmarks/results/samplers.{md,json,_rmse.png,_2d.png}
    python benchmarks/samplers.py --quick    # < 1 min    -> benchmarks/results/samplers.quick.*
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

# The quality part runs in float64. The overhead part runs float32 in a subprocess without x64: with x64 on,
# `sample` on a float32 x_T fails (the process's float64 alpha/sigma promote the state; see the report).
OVERHEAD_WORKER = "--overhead-worker" in sys.argv
jax.config.update("jax_enable_x64", not OVERHEAD_WORKER)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.analytic import GaussianMixture  # noqa: E402
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.solvers import (DDIM, DDPM, IPNDM, DPMSolverMultistep, DPMSolverSinglestep, Euler,  # noqa: E402
                             Heun, UniPC, sample)
from jaxdiff.timesteps.grids import diffusers_indices, grid_from_indices, make_grid  # noqa: E402
import importlib  # noqa: E402
_sampling = importlib.import_module("jaxdiff.solvers.sampling")   # for the jit cache size of `_sample`


def _cache_size() -> int:
    try:
        return int(_sampling._sample._cache_size())
    except Exception:      # private API: absent in another JAX version
        return -1

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GRIDS = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")
GRID_ABBR = {"uniform_t": "t", "uniform_logsnr": "logSNR", "time_quadratic": "quad", "karras": "karras"}
NFES = (3, 4, 5, 6, 8, 10, 15, 20, 50)

# label -> (solver instance, stochastic)
SOLVERS = {
    "DDIM": DDIM(),
    "Euler": Euler(),
    "Heun": Heun(),
    "iPNDM": IPNDM(),
    "DPM-Solver-2M": DPMSolverMultistep(order=2, prediction="noise"),
    "DPM-Solver-3M": DPMSolverMultistep(order=3, prediction="noise"),
    "DPM-Solver++2M": DPMSolverMultistep(order=2, prediction="data"),
    "DPM-Solver++3M": DPMSolverMultistep(order=3, prediction="data"),
    "DPM-Solver++2S": DPMSolverSinglestep(order=2, prediction="data"),
    "DPM-Solver++3S": DPMSolverSinglestep(order=3, prediction="data"),
    "UniPC-bh1-3": UniPC(order=3, variant="bh1"),
    "UniPC-bh2-3": UniPC(order=3, variant="bh2"),
    "SDE-DPM-Solver++2M": DPMSolverMultistep(order=2, prediction="data", sde=True),
    "DDPM": DDPM(),
}
STOCHASTIC = {k for k, s in SOLVERS.items() if s.stochastic}


def steps_for(label: str, nfe: int, final: str):
    """Number of grid intervals that makes `label` use exactly `nfe` model evaluations, or None."""
    solver = SOLVERS[label]
    if isinstance(solver, Heun):
        if final == "t_min":
            return nfe // 2 if nfe % 2 == 0 else None
        return (nfe + 1) // 2 if nfe % 2 == 1 else None
    steps = nfe
    if isinstance(solver, (DPMSolverMultistep, UniPC)) and steps < solver.order:
        return None
    return steps


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

@jax.jit
def _sorted_proj(x, dirs):
    return jnp.sort(x @ dirs, axis=0)


@jax.jit
def _metrics(mix, x, ref, data_sorted, dirs):
    """(RMSE to ref, mean NLL, sliced W2 to the data, fraction of non-finite rows)."""
    finite = jnp.all(jnp.isfinite(x), axis=-1)
    rmse = jnp.sqrt(jnp.mean((x - ref) ** 2))
    nll = -jnp.mean(mix.log_prob(x))
    sw2 = jnp.sqrt(jnp.mean((jnp.sort(x @ dirs, axis=0) - data_sorted) ** 2))
    return rmse, nll, sw2, 1.0 - jnp.mean(finite)


class Counting:
    """The mixture's exact denoiser; counts how often it is traced (= compilations of `sample`)."""

    def __init__(self, f):
        self.f, self.traces = f, 0

    def __call__(self, x, t):
        if isinstance(x, jax.core.Tracer):
            self.traces += 1
        return self.f(x, t)


def run_quality(name, mix, proc, batch, nfes, finals, labels, grids, seed, n_proj, ref_steps, keep_samples=()):
    """All solver x grid x final x NFE on one mixture. Returns dict with rows, settings, optional samples."""
    kx, kd, kp, ks = jax.random.split(jax.random.key(seed), 4)
    d = mix.dim
    x_T = proc.prior_sample(kx, (batch, d), jnp.float64)
    data = mix.sample(kd, batch)
    data2 = mix.sample(jax.random.fold_in(kd, 1), batch)
    dirs = jax.random.normal(kp, (d, n_proj), jnp.float64)
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    data_sorted = _sorted_proj(data, dirs)
    t_start = float(proc.t_max)
    ends = {"t_min": float(proc.t_min), "zero": float(proc.t_zero)}
    t0 = time.perf_counter()
    refs = {f: mix.reference_ode_solution(proc, x_T, t_start, ends[f], num_steps=ref_steps) for f in finals}
    ref_s = time.perf_counter() - t0
    den = Counting(mix.denoiser(proc, "eps"))
    baselines = {}
    for f in finals:
        r, nll, sw, _ = _metrics(mix, refs[f], refs[f], data_sorted, dirs)
        baselines[f"reference ODE ({f})"] = {"nll": float(nll), "sw2": float(sw)}
    _, nll, sw, _ = _metrics(mix, data2, data2, data_sorted, dirs)
    baselines["exact data (independent draw)"] = {"nll": float(nll), "sw2": float(sw)}
    rows, samples, timing = [], {}, []
    cache0 = _cache_size()
    for label in labels:
        solver = SOLVERS[label]
        for nfe in nfes:
            for final in finals:
                steps = steps_for(label, nfe, final)
                if steps is None:
                    continue
                before, cache_before = den.traces, _cache_size()
                first, later = None, []
                for grid_name in grids:
                    grid = make_grid(grid_name, proc, steps, final=final)
                    key = jax.random.fold_in(ks, 1000 * nfe + len(rows))
                    tc = time.perf_counter()
                    x, got = sample(den, proc, x_T, grid, solver=solver, prediction="eps", key=key, return_nfe=True)
                    x = jax.block_until_ready(x)
                    dt = time.perf_counter() - tc
                    if first is None:
                        first = dt
                    else:
                        later.append(dt)
                    rmse, nll, sw, bad = _metrics(mix, x, refs[final], data_sorted, dirs)
                    row = {"solver": label, "grid": grid_name, "final": final, "nfe_budget": nfe, "steps": steps,
                           "nfe": int(got), "nll": float(nll), "sw2": float(sw), "nonfinite": float(bad)}
                    if label not in STOCHASTIC:
                        row["rmse"] = float(rmse)
                    if int(got) != nfe:
                        row["nfe_mismatch"] = True
                    rows.append(row)
                    if (label, nfe, grid_name, final) in keep_samples or ("*", nfe, grid_name, final) in keep_samples:
                        samples[(label, nfe, grid_name, final)] = np.asarray(x)
                timing.append({"solver": label, "nfe": nfe, "final": final, "steps": steps,
                               "traces": den.traces - before, "compilations": _cache_size() - cache_before,
                               "first_call_s": first,
                               "later_call_s": float(np.median(later)) if later else None})
    settings = {"name": name, "dim": d, "components": mix.num_components, "process": "vp_linear",
                "batch": batch, "t_start": t_start, "t_end": ends, "finals": list(finals), "nfes": list(nfes),
                "grids": list(grids), "sw2_projections": n_proj, "sw2_samples": [batch, batch],
                "reference_ode_steps": ref_steps, "reference_s": ref_s, "seed": seed, "dtype": "float64"}
    return {"settings": settings, "rows": rows, "baselines": baselines, "compile": timing,
            "total_traces": den.traces, "compilations": _cache_size() - cache0}, samples, np.asarray(data)


def best_rows(rows, final="t_min"):
    """{(solver, nfe): best row over grids}: min RMSE (deterministic) or min SW2 (stochastic)."""
    out = {}
    for r in rows:
        if r["final"] != final:
            continue
        k = (r["solver"], r["nfe_budget"])
        metric = "sw2" if r["solver"] in STOCHASTIC else "rmse"
        v = r[metric] if math.isfinite(r[metric]) else math.inf
        if k not in out or v < out[k][1]:
            out[k] = (r, v)
    return {k: v[0] for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# (2) overhead vs diffusers
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _fmt(v, nd=4):
    if v is None:
        return "—"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.{nd}g}"


def _compile_line(q):
    pairs = len({(r["solver"], r["steps"]) for r in q["rows"]})
    n = q.get("compilations")
    if n is None:   # results written before the jit cache was counted
        return (f"{len(q['rows'])} runs over {pairs} (solver, step count) pairs; the denoiser was traced "
                f"{q['total_traces']} times (solvers trace it once per call site). A separate check of "
                "`jaxdiff.solvers.sampling._sample._cache_size()` gives one compilation per (solver, step count) "
                "for all 4 grids x 2 final points.")
    return (f"Compilations of `sample` (jit cache entries): {n} for {len(q['rows'])} runs over {pairs} "
            f"(solver, step count) pairs; grids and final points reuse them (the denoiser was traced "
            f"{q['total_traces']} times: once per call site in a solver).")


def write_md(res, path):
    L = []
    add = L.append
    add(f"# Samplers benchmark ({'quick run' if res['quick'] else 'full run'})\n")
    add(f"Machine: {res['machine']}. JAX {res['jax']}, numpy {res['numpy']}, torch {res.get('torch', '?')}, "
        f"diffusers {res.get('diffusers', '?')}. Command: `{res['command']}`. Total time {res['total_s']:.0f} s.\n")
    add("Generated by `benchmarks/samplers.py`; all numbers are also in the .json next to this file.\n")
    ov = res.get("overhead")
    if ov:
        s = ov["settings"]
        add("## Solver overhead vs diffusers\n")
        if "overhead_remeasured_utc" in res:
            add(f"Re-measured with `{res['overhead_command']}` at {res['overhead_remeasured_utc']} (library "
                f"{res.get('overhead_library')}); the quality sections below are from `{res['command']}`"
                f" (library {res.get('library', 'not recorded')}).\n")
        add(f"{s['steps']}-step loop, trivial model `{s['model']}`, batch {tuple(s['shape'])} {s['dtype']}, CPU "
            f"(torch threads {s['torch_threads']}). jaxdiff: {s['jaxdiff_timing']}. diffusers: "
            f"{s['diffusers_timing']}. Model alone: {s['model_alone']}; it is subtracted on each side. "
            f"Process: {s['process']}. {s['repeats']} repeats, medians.\n")
        add("Per step, model subtracted, medians (minima over repeats in the second table). jaxdiff's net cost is "
            "floored at 1 µs where the subtraction leaves less (marked *): XLA fuses the model into the solver's "
            "kernel, so the model-alone loop already contains the loop's memory pass.\n")
        add("| solver | jaxdiff µs/step | diffusers µs/step (2 threads) | **ratio** | diffusers 1 thread µs/step "
            "| ratio (1 thread) | diffusers earlier (µs/step) | ratio vs earlier | load avg (1 min) |")
        add("|---|---|---|---|---|---|---|---|---|")
        for r in ov["rows"]:
            star = "*" if r["jaxdiff_floored"] else ""
            add(f"| {r['solver']} | {r['jaxdiff_us_per_step']:.1f}{star} | {r['diffusers_us_per_step']:.1f} | "
                f"**{r['ratio']:.1f}x** | {r['diffusers_1thread_us_per_step']:.1f} | {r['ratio_1thread']:.1f}x | "
                f"{r['diffusers_earlier_us_per_step']:.0f} | {r['ratio_vs_earlier']:.1f}x | {r['load_avg_1min']:.1f} |")
        add(f"| **geometric mean** | | | **{ov['geomean_ratio']:.1f}x** | | {ov['geomean_ratio_1thread']:.1f}x | | "
            f"{ov['geomean_ratio_vs_earlier']:.1f}x | |")
        add("")
        add("| solver | jaxdiff total µs/step | jaxdiff model-alone loop µs/step | jaxdiff raw net µs/step "
            "| diffusers total µs/step | diffusers model µs/step | ratio of totals | jaxdiff min net | diffusers min net "
            "| ratio of minima | diffusers 1-thread min net | jaxdiff compile (s) | max rel diff vs diffusers |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in ov["rows"]:
            add(f"| {r['solver']} | {r['jaxdiff_total_us_per_step']:.1f} | {r['jaxdiff_model_us_per_step']:.1f} | "
                f"{r['jaxdiff_us_per_step_raw']:.1f} | {r['diffusers_total_us_per_step']:.1f} | "
                f"{r['diffusers_model_us_per_step']:.1f} | {r['ratio_total']:.1f}x | {r['jaxdiff_min_us_per_step']:.1f} | "
                f"{r['diffusers_min_us_per_step']:.1f} | {r['ratio_min']:.1f}x | "
                f"{r['diffusers_1thread_min_us_per_step']:.1f} | {r['jaxdiff_compile_s']:.2f} | "
                f"{r['max_rel_diff_vs_diffusers']:.1e} |")
        ok = ov["geomean_ratio"] >= 10 and all(r["ratio"] >= 4 for r in ov["rows"])
        add(f"\nGeometric mean of the ratios: **{ov['geomean_ratio']:.1f}x** (totals, model included: "
            f"{ov['geomean_ratio_total']:.1f}x; minima: {ov['geomean_ratio_min']:.1f}x; diffusers with 1 torch thread: "
            f"{ov['geomean_ratio_1thread']:.1f}x; against the earlier diffusers measurements: "
            f"{ov['geomean_ratio_vs_earlier']:.1f}x). Targets (geomean >= 10x, each >= 4x) on the headline ratio: "
            f"{'met' if ok else 'NOT met'}"
            + ("" if ok else " (below 4x: " + ", ".join(r["solver"] for r in ov["rows"] if r["ratio"] < 4) + ")")
            + ".\n")
        for n in ov.get("notes", []):
            add(f"- {n}")
        add("")
    for q in res["quality"]:
        s = q["settings"]
        add(f"## Quality: {s['name']}\n")
        add(f"Mixture: {s['components']} components in {s['dim']}-D; process `{s['process']}` (DDPM discrete, "
            f"linear betas), exact eps-denoiser, {s['dtype']}; {s['batch']} samples from t = {s['t_start']:g}; "
            f"grids end at t_min = {s['t_end']['t_min']:g} (`final='t_min'`)"
            + (" and at sigma = 0 (`final='zero'`)" if "zero" in s["finals"] else "") +
            f". RMSE: to `reference_ode_solution` (RK4, {s['reference_ode_steps']} steps) from the same x_T, over all "
            f"coordinates (deterministic solvers only). NLL: mean -log p_data of the samples. SW2: sliced "
            f"Wasserstein-2 with {s['sw2_projections']} random unit directions, {s['sw2_samples'][0]} samples vs "
            f"{s['sw2_samples'][1]} exact data samples. " + _compile_line(q) + "\n")
        add("Baselines: " + "; ".join(f"{k}: NLL {v['nll']:.3f}, SW2 {v['sw2']:.4f}" for k, v in q["baselines"].items())
            + ".\n")
        nfes = s["nfes"]
        labels = list(dict.fromkeys(r["solver"] for r in q["rows"]))
        for final in s["finals"]:
            best = best_rows(q["rows"], final)
            add(f"### Best grid per solver and NFE, final = {final}: RMSE (grid) — stochastic solvers: SW2\n")
            add("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
            add("|---|" + "---|" * len(nfes))
            for lab in labels:
                cells = []
                for n in nfes:
                    r = best.get((lab, n))
                    if r is None:
                        cells.append("—")
                        continue
                    m = r["sw2"] if lab in STOCHASTIC else r["rmse"]
                    cells.append(f"{_fmt(m)} ({GRID_ABBR[r['grid']]})")
                add(f"| {lab}{' (SW2)' if lab in STOCHASTIC else ''} | " + " | ".join(cells) + " |")
            add("")
            add(f"Best overall per NFE (final = {final}, deterministic, by RMSE): " + "; ".join(
                f"NFE {n}: {b['solver']} / {b['grid']} {_fmt(b['rmse'])}" for n in nfes
                for b in [min((r for (lab, nn), r in best.items() if nn == n and lab not in STOCHASTIC),
                              key=lambda r: r["rmse"] if math.isfinite(r["rmse"]) else math.inf, default=None)]
                if b is not None) + ".\n")
        add(f"### Full tables ({s['name']}): RMSE / NLL / SW2 per grid\n")
        for lab in labels:
            add(f"#### {lab}\n")
            add("| grid | final | metric | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
            add("|---|---|---|" + "---|" * len(nfes))
            for final in s["finals"]:
                for g in s["grids"]:
                    rr = {r["nfe_budget"]: r for r in q["rows"] if r["solver"] == lab and r["grid"] == g
                          and r["final"] == final}
                    if not rr:
                        continue
                    for metric in (("sw2", "nll") if lab in STOCHASTIC else ("rmse", "nll", "sw2")):
                        add(f"| {g} | {final} | {metric.upper()} | "
                            + " | ".join(_fmt(rr[n][metric]) if n in rr else "—" for n in nfes) + " |")
            add("")
    for n in res.get("notes", []):
        add(f"- {n}")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def plot_rmse(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    q = res["quality"][0]
    labels = list(dict.fromkeys(r["solver"] for r in q["rows"]))
    det = [lab for lab in labels if lab not in STOCHASTIC]
    cmap = plt.get_cmap("tab20")
    color = {lab: cmap(i % 20) for i, lab in enumerate(labels)}
    style = {lab: ("--" if "3" in lab or "bh" in lab else "-") for lab in labels}
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    best = best_rows(q["rows"], "t_min")
    ax = axes[0, 0]
    for lab in det:
        pts = sorted((n, r["rmse"]) for (l2, n), r in best.items() if l2 == lab and math.isfinite(r["rmse"]))
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], style[lab], marker="o", ms=3, color=color[lab], label=lab)
    ax.set(title=f"{q['settings']['name']}: best grid per solver/NFE", xlabel="NFE", ylabel="RMSE to reference ODE")
    ax.legend(fontsize=7)
    for k, g in enumerate(GRIDS):
        ax = axes.flat[1 + k]
        for lab in det:
            pts = sorted((r["nfe_budget"], r["rmse"]) for r in q["rows"] if r["solver"] == lab and r["grid"] == g
                         and r["final"] == "t_min" and math.isfinite(r["rmse"]))
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style[lab], marker="o", ms=3, color=color[lab],
                      label=lab)
        ax.set(title=f"grid {g} (final t_min)", xlabel="NFE", ylabel="RMSE")
    ax = axes[1, 2]
    for lab in labels:
        pts = sorted((n, r["sw2"]) for (l2, n), r in best_rows_by(q["rows"], "sw2").items() if l2 == lab)
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], style[lab], marker="s" if lab in STOCHASTIC else "o",
                  ms=3, color=color[lab], label=lab)
    floor = q["baselines"]["exact data (independent draw)"]["sw2"]
    ax.axhline(floor, color="k", lw=0.8, ls=":", label="exact data vs exact data")
    ax.set(title="SW2 to data, best grid (incl. stochastic)", xlabel="NFE", ylabel="sliced W2")
    ax.legend(fontsize=6)
    ys = [a.get_ylim() for a in axes.flat[:5]]
    lo, hi = min(y[0] for y in ys), max(y[1] for y in ys)
    for a in axes.flat[:5]:
        a.set_ylim(lo, hi)
        a.grid(True, which="both", lw=0.3)
    axes[1, 2].grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def best_rows_by(rows, metric, final="t_min"):
    out = {}
    for r in rows:
        if r["final"] != final or metric not in r:
            continue
        k = (r["solver"], r["nfe_budget"])
        v = r[metric] if math.isfinite(r[metric]) else math.inf
        if k not in out or v < out[k][metric]:
            out[k] = r
    return out


def plot_2d(q2, samples, data, nfes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["solver"] for r in q2["rows"]))
    best = best_rows_by(q2["rows"], "sw2")
    fig, axes = plt.subplots(len(nfes), len(labels) + 1, figsize=(1.7 * (len(labels) + 1), 1.9 * len(nfes)),
                             squeeze=False)
    lim = 3.2
    for i, n in enumerate(nfes):
        ax = axes[i, 0]
        ax.scatter(data[:, 0], data[:, 1], s=0.5, c="k", alpha=0.5, lw=0)
        ax.set_title("exact data" if i == 0 else "", fontsize=7)
        ax.set_ylabel(f"NFE {n}", fontsize=8)
        for j, lab in enumerate(labels):
            ax = axes[i, j + 1]
            r = best.get((lab, n))
            if r is not None and (lab, n, r["grid"], "t_min") in samples:
                x = samples[(lab, n, r["grid"], "t_min")]
                ax.scatter(x[:, 0], x[:, 1], s=0.5, c="C0", alpha=0.5, lw=0)
                ax.text(0.02, 0.02, f"{GRID_ABBR[r['grid']]} SW2 {r['sw2']:.3f}", transform=ax.transAxes, fontsize=5)
            if i == 0:
                ax.set_title(lab, fontsize=6)
    for ax in axes.flat:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.suptitle("toy_2d, vp_linear: samples per solver at its best grid by SW2 (final t_min)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _git_state():
    """HEAD and whether jaxdiff/ has uncommitted changes (other engineers edit the same tree)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "jaxdiff"], cwd=root, capture_output=True,
                               text=True).stdout.split("\n")
        return {"head": head, "uncommitted_jaxdiff_files": [d[3:] for d in dirty if d.strip()]}
    except Exception as e:   # no git
        return {"error": str(e)}


def _overhead_subprocess(quick):
    """Run the overhead part in a fresh interpreter without x64 (float32 end to end)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "overhead.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--overhead-worker", "--repeats",
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


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="< 1 min smoke run")
    ap.add_argument("--out", default=RESULTS, help="output folder (default benchmarks/results)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the overhead part")
    ap.add_argument("--overhead-only", action="store_true",
                    help="re-measure only the overhead part and update an existing samplers[.quick].json/.md")
    ap.add_argument("--overhead-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=15, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.overhead_worker:
        with open(args.json, "w") as fh:
            json.dump(run_overhead(repeats=args.repeats), fh, default=float)
        return
    warnings.simplefilter("ignore", UserWarning)
    quick = args.quick
    t_all = time.perf_counter()
    if args.overhead_only:
        stem = os.path.join(args.out, "samplers" + (".quick" if quick else ""))
        with open(stem + ".json") as fh:
            res = json.load(fh)
        t0 = time.perf_counter()
        res["overhead"] = _overhead_subprocess(quick)
        res["overhead_s"] = time.perf_counter() - t0
        res["overhead_command"] = "python benchmarks/samplers.py --overhead-only" + (" --quick" if quick else "")
        res["overhead_remeasured_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        res["overhead_library"] = _git_state()
        with open(stem + ".json", "w") as fh:
            json.dump(res, fh, indent=1, default=float)
        write_md(res, stem + ".md")
        print(f"overhead re-measured in {res['overhead_s']:.0f} s -> {stem}.md/.json")
        _print_overhead(res["overhead"])
        return
    import torch
    import diffusers
    import matplotlib
    res = {"quick": quick, "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.platform()}, "
                                      f"python {platform.python_version()}",
           "jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
           "numpy": np.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "matplotlib": matplotlib.__version__,
           "command": "python benchmarks/samplers.py" + (" --quick" if quick else ""),
           "solvers": {k: repr(v) for k, v in SOLVERS.items()}, "library": _git_state(), "notes": []}
    proc = make_process("vp_linear")
    labels = list(SOLVERS) if not quick else ["DDIM", "DPM-Solver++3M", "UniPC-bh2-3", "DDPM"]
    # (2) overhead first, while nothing else of ours is resident
    if not args.no_overhead:
        t0 = time.perf_counter()
        res["overhead"] = _overhead_subprocess(quick)
        res["overhead_s"] = time.perf_counter() - t0
        print(f"overhead: {res['overhead_s']:.0f} s", flush=True)
    # (1) 16-D mixture
    t0 = time.perf_counter()
    mix16 = GaussianMixture.random(jax.random.key(0), 8, 16)
    nfes16 = (5,) if quick else NFES
    q16, _, _ = run_quality("16-D random mixture (8 components)", mix16, proc, batch=256 if quick else 4096,
                            nfes=nfes16, finals=("t_min",) if quick else ("t_min", "zero"), labels=labels,
                            grids=GRIDS, seed=1, n_proj=64 if quick else 256, ref_steps=512 if quick else 4096)
    q16["seconds"] = time.perf_counter() - t0
    print(f"16-D mixture: {q16['seconds']:.0f} s, {q16['compilations']} compilations, {len(q16['rows'])} runs",
          flush=True)
    # (1) 2-D toy mixture: scatter plots
    t0 = time.perf_counter()
    nfes2 = (5,) if quick else (5, 10, 20)
    keep = {("*", n, g, "t_min") for n in nfes2 for g in GRIDS}
    q2, samples2, data2 = run_quality("2-D toy mixture (toy_2d)", GaussianMixture.toy_2d(), proc,
                                      batch=256 if quick else 2000, nfes=nfes2, finals=("t_min",), labels=labels,
                                      grids=GRIDS, seed=2, n_proj=32 if quick else 128,
                                      ref_steps=512 if quick else 4096, keep_samples=keep)
    q2["seconds"] = time.perf_counter() - t0
    print(f"2-D mixture: {q2['seconds']:.0f} s", flush=True)
    res["quality"] = [q16, q2]
    res["notes"] += quality_notes(res["quality"])
    res["total_s"] = time.perf_counter() - t_all
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "samplers" + (".quick" if quick else ""))
    _write_all(res, stem, q2, samples2, data2, nfes2)
    print(f"\n== samplers benchmark ({'quick' if quick else 'full'}) done in {time.perf_counter() - t_all:.0f} s "
          f"-> {stem}.md/.json/_rmse.png/_2d.png")
    _summary(res, q16)


def quality_notes(quality):
    """Places where the error does not fall with NFE: on the best grid (> 5 % rise), or on one grid
    (a rise by more than 2x from one NFE to the next), and any NFE mismatch or non-finite sample."""
    notes = []
    for q in quality:
        labels = list(dict.fromkeys(r["solver"] for r in q["rows"]))
        name = q["settings"]["name"]
        for final in q["settings"]["finals"]:
            best = best_rows(q["rows"], final)
            for lab in labels:
                if lab in STOCHASTIC:
                    continue
                seq = [(n, best[(lab, n)]["rmse"]) for n in q["settings"]["nfes"] if (lab, n) in best]
                for (n1, e1), (n2, e2) in zip(seq, seq[1:]):
                    if e2 > 1.05 * e1:
                        notes.append(f"{name}: {lab} best-grid RMSE (final {final}) rises from NFE {n1} "
                                     f"({e1:.3g}) to NFE {n2} ({e2:.3g})")
                for g in q["settings"]["grids"]:
                    seq = sorted((r["nfe_budget"], r["rmse"]) for r in q["rows"] if r["solver"] == lab
                                 and r["grid"] == g and r["final"] == final)
                    for (n1, e1), (n2, e2) in zip(seq, seq[1:]):
                        if not e2 <= 2 * e1:
                            notes.append(f"{name}: {lab} on {g} (final {final}): RMSE rises from {e1:.3g} at NFE "
                                         f"{n1} to {e2:.3g} at NFE {n2}")
        bad = [r for r in q["rows"] if r.get("nfe_mismatch") or r["nonfinite"] > 0]
        for r in bad:
            notes.append(f"{name}: {r['solver']} {r['grid']} {r['final']} NFE {r['nfe_budget']}: "
                         f"returned NFE {r['nfe']}, non-finite fraction {r['nonfinite']}")
    return notes


def _write_all(res, stem, q2, samples2, data2, nfes2):
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    write_md(res, stem + ".md")
    plot_rmse(res, stem + "_rmse.png")
    plot_2d(q2, samples2, data2, nfes2, stem + "_2d.png")


def _summary(res, q16):
    if "overhead" in res:
        _print_overhead(res["overhead"])
    best = best_rows(q16["rows"], "t_min")
    for n in q16["settings"]["nfes"]:
        b = min((r for (lab, nn), r in best.items() if nn == n and lab not in STOCHASTIC),
                key=lambda r: r["rmse"] if math.isfinite(r["rmse"]) else math.inf)
        print(f"16-D best at NFE {n:>2}: {b['solver']:<16} {b['grid']:<15} RMSE {b['rmse']:.4g}  NLL {b['nll']:.3f}  "
              f"SW2 {b['sw2']:.4f}")
    for n in res["notes"]:
        print("note:", n)


if __name__ == "__main__":
    main()
