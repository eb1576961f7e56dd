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

This file holds the settings, the solver table, the quality runs and `main`; the overhead measurement is in
`samplers_overhead.py` and the Markdown/plot writers are in `samplers_report.py` (both next to this file).
"""
from __future__ import annotations

import argparse
import json
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
from jaxdiff.timesteps.grids import make_grid  # noqa: E402
import importlib  # noqa: E402
_sampling = importlib.import_module("jaxdiff.solvers.sampling")   # for the jit cache size of `_sample`
# siblings in benchmarks/ (the script's folder, on sys.path when run as `python benchmarks/samplers.py`)
from samplers_overhead import _overhead_subprocess, _print_overhead, run_overhead  # noqa: E402
from samplers_report import _summary, _write_all, quality_notes, write_md  # noqa: E402


def _cache_size() -> int:
    try:
        return int(_sampling._sample._cache_size())
    except Exception:      # private API: absent in another JAX version
        return -1

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GRIDS = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")
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
        write_md(res, stem + ".md", STOCHASTIC)
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
    res["notes"] += quality_notes(res["quality"], STOCHASTIC)
    res["total_s"] = time.perf_counter() - t_all
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "samplers" + (".quick" if quick else ""))
    _write_all(res, stem, q2, samples2, data2, nfes2, STOCHASTIC, GRIDS)
    print(f"\n== samplers benchmark ({'quick' if quick else 'full'}) done in {time.perf_counter() - t_all:.0f} s "
          f"-> {stem}.md/.json/_rmse.png/_2d.png")
    _summary(res, q16, STOCHASTIC)


if __name__ == "__main__":
    main()
