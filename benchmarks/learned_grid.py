"""Benchmark of time grids learned through the sampler (`jaxdiff.solvers.learn_grid`, issue 19).

On the analytic 16-D Gaussian mixture (exact denoiser, vp_linear, t = 1 -> 1e-3): RMSE to the exact
probability-flow ODE solution on *held-out* noise of the learned grid against every hand-made grid
(uniform-t, uniform-logSNR, time-quadratic, Karras) and the Xue et al. grids (p = 1 and p = 2, official
objective; p = 1 paper objective), at NFE 5, 6, 8, 10 for DPM-Solver++(2M), DPM-Solver++(3M), UniPC-3 (bh1)
and DDIM. Learned grids: calibration sets of 1024 noises (several seeds, disjoint from the held-out set),
teacher DPM-Solver++(3M) with 512 uniform-logSNR steps, init "best" (the hand-made and Xue p=1 grids, the
lowest calibration loss kept), Adam 500 steps, lr 0.05 (cosine). Also timed: the teacher, the compilation
of the optimizer loop and the loop itself.

    python benchmarks/learned_grid.py              # full run -> benchmarks/results/learned_grid.{md,json}
    python benchmarks/learned_grid.py --quick      # smoke run (NFE 5, one solver, one seed, small sets)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one fresh persistent compilation cache for this run: the optimizer loop of a (solver, NFE) compiles once
# and the other calibration seeds reuse it (compile times below are those of the first seed)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxdiff-learned-grid-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.analytic import GaussianMixture  # noqa: E402
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.solvers import DDIM, DPMSolverMultistep, UniPC, learn_grid, sample, teacher_solution  # noqa: E402
from jaxdiff.timesteps import make_grid, optimized_grid  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HAND = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")
XUE = {"xue_p1": {"p": 1.0}, "xue_p2": {"p": 2.0}, "xue_paper_p1": {"p": 1.0, "variant": "paper"}}
SOLVERS = {"dpm_solver++_2m": DPMSolverMultistep(2), "dpm_solver++_3m": DPMSolverMultistep(3),
           "unipc_3": UniPC(3), "ddim": DDIM()}


def _xue(proc, solver, nfe, kw):
    if isinstance(solver, UniPC):
        name, order, lof = "unipc", solver.order, True
    elif isinstance(solver, DPMSolverMultistep):
        name, order, lof = "dpm_solver++", solver.order, solver.lower_final_below or "always"
    else:
        name, order, lof = "dpm_solver++", 1, True          # DDIM = DPM-Solver++ of order 1
    return np.asarray(optimized_grid(proc, name, order, nfe, lower_order_final=lof, **kw), np.float64)


def run(nfes, solvers, seeds, n_cal, n_held, opt_steps, lr, teacher_steps):
    proc = make_process("vp_linear")
    mix = GaussianMixture.random(jax.random.key(0), 8, 16)
    den = mix.denoiser(proc, "eps")
    t0, t1 = float(proc.t_max), float(proc.t_min)
    held = proc.prior_sample(jax.random.key(1), (n_held, 16), jnp.float64)      # as optimized_steps.py
    ref = mix.reference_ode_solution(proc, held, t0, t1)
    cals, teachers, teacher_s = {}, {}, {}
    for seed in seeds:
        cals[seed] = proc.prior_sample(jax.random.key(1000 + seed), (n_cal, 16), jnp.float64)
        s = time.perf_counter()
        teachers[seed] = jax.block_until_ready(teacher_solution(den, proc, cals[seed], t0, t1, steps=teacher_steps))
        teacher_s[seed] = time.perf_counter() - s
        tref = mix.reference_ode_solution(proc, cals[seed], t0, t1)
        print(f"teacher seed {seed}: {teacher_s[seed]:.2f} s, RMSE to exact "
              f"{float(jnp.sqrt(jnp.mean((teachers[seed] - tref) ** 2))):.2e}", flush=True)

    def rmse(solver, g):
        x = sample(den, proc, held, jnp.asarray(g), solver=solver, prediction="eps")
        return float(jnp.sqrt(jnp.mean((x - ref) ** 2)))

    rows = []
    for sname in solvers:
        solver = SOLVERS[sname]
        for nfe in nfes:
            row = {"solver": sname, "nfe": nfe, "rmse": {}, "grids": {}, "learned": []}
            for g in HAND:
                grid = np.asarray(make_grid(g, proc, nfe), np.float64)
                row["rmse"][g], row["grids"][g] = rmse(solver, grid), grid.tolist()
            for label, kw in XUE.items():
                grid = _xue(proc, solver, nfe, kw)
                row["rmse"][label], row["grids"][label] = rmse(solver, grid), grid.tolist()
            for k, seed in enumerate(seeds):
                runs = [("best", "best")] + ([("uniform_logsnr", "uniform_logsnr")] if k == 0 else [])
                for tag, init in runs:
                    r = learn_grid(den, proc, solver, nfe, cals[seed], teacher=teachers[seed], init=init,
                                   steps=opt_steps, lr=lr)
                    row["learned"].append({
                        "seed": seed, "init": tag, "init_chosen": r.init_name, "rmse": rmse(solver, r.grid),
                        "init_rmse": rmse(solver, r.init_grid), "cal_loss_init": r.loss_init, "cal_loss": r.loss,
                        "compile_s": r.compile_s, "learn_s": r.learn_s, "teacher_s": teacher_s[seed],
                        "grid": r.grid.tolist()})
            best = [d for d in row["learned"] if d["init"] == "best"]
            lr_ = np.array([d["rmse"] for d in best])
            alt = min(row["rmse"], key=row["rmse"].get)
            print(f"{sname} NFE {nfe}: learned {lr_.mean():.4g} (+- {lr_.std():.2g}, inits "
                  f"{[d['init_chosen'] for d in best]}), best other {alt} {row['rmse'][alt]:.4g}; compile "
                  f"{best[0]['compile_s']:.1f} s, learn {np.mean([d['learn_s'] for d in best]):.2f} s", flush=True)
            rows.append(row)
    return {"rows": rows, "teacher_s": teacher_s}


def _fmt(x):
    return f"{x:.4g}"


def write_report(res, stem, settings):
    with open(stem + ".json", "w") as fh:
        json.dump({"settings": settings, **res}, fh, indent=1)
    rows = res["rows"]
    nfes = sorted({r["nfe"] for r in rows})
    others = list(HAND) + list(XUE)
    out = ["# Learned time grids - benchmark", "",
           f"Machine: {platform.machine()} {os.cpu_count()} CPU cores, {platform.platform()}. JAX {jax.__version__}, "
           f"float64. Command: `{settings['command']}`. Load average at start {settings['load_start']}, at end "
           f"{settings['load_end']} (shared machine: absolute times are inflated by other jobs).", "",
           "Mixture `GaussianMixture.random(key(0), 8 components, dim 16)`, process vp_linear, t = 1 -> 1e-3, "
           "eps-prediction by the exact denoiser. **Held-out** noise: "
           f"{settings['n_held']} samples (key 1, as benchmarks/optimized_steps.py); reference = exact "
           "probability-flow ODE solution (RK4, 4096 steps). Learned grids: calibration sets of "
           f"{settings['n_cal']} noises per seed (keys 1000 + seed, seeds {settings['seeds']}), teacher "
           f"DPM-Solver++(3M) with {settings['teacher_steps']} uniform-logSNR steps from the same noise, "
           f"`learn_grid(..., init='best', steps={settings['opt_steps']}, lr={settings['lr']})`: init 'best' "
           "evaluates the four hand-made grids and Xue p=1 on the calibration set and starts from the lowest. "
           "Solvers as jaxdiff runs them (warm-up, final orders lowered). Xue grids from "
           "`timesteps.optimized_grid` (official objective p=1 and p=2; the paper objective at p=1).", ""]
    for sname in dict.fromkeys(r["solver"] for r in rows):
        out += [f"## {sname} - RMSE to the exact solution (held-out)", "",
                "| grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                "|---|" + "---|" * len(nfes)]
        srows = {r["nfe"]: r for r in rows if r["solver"] == sname}
        for g in others:
            cells = []
            for n in nfes:
                r = srows.get(n)
                if r is None:
                    cells.append("")
                    continue
                v = r["rmse"][g]
                cells.append(f"**{_fmt(v)}**" if v == min(r["rmse"].values()) else _fmt(v))
            out.append(f"| {g} | " + " | ".join(cells) + " |")
        for tag, label in (("best", "learned (init best), mean +- sd over seeds"),
                           ("uniform_logsnr", "learned (init uniform_logsnr), seed 0")):
            cells = []
            for n in nfes:
                r = srows.get(n)
                v = np.array([d["rmse"] for d in r["learned"] if d["init"] == tag]) if r else np.array([])
                cells.append("" if v.size == 0 else (f"{_fmt(v.mean())} +- {v.std():.2g}" if v.size > 1 else _fmt(v[0])))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Learned grid vs the best alternative (held-out RMSE)", "",
            "Best alternative = the lowest of the 4 hand-made and 3 Xue grids. Learned = init 'best', mean over "
            "seeds (worst seed in brackets). 'beats' needs the worst seed below the best alternative.", "",
            "| solver | NFE | learned mean (worst) | best alternative | ratio (mean) | init chosen | verdict |",
            "|---|---|---|---|---|---|---|"]
    losses = []
    for r in rows:
        best = [d for d in r["learned"] if d["init"] == "best"]
        v = np.array([d["rmse"] for d in best])
        alt = min(r["rmse"], key=r["rmse"].get)
        verdict = "beats" if v.max() < r["rmse"][alt] else ("beats on mean only" if v.mean() < r["rmse"][alt]
                                                             else "DOES NOT BEAT")
        if verdict != "beats":
            losses.append(f"{r['solver']} NFE {r['nfe']}")
        inits = sorted({d["init_chosen"] for d in best})
        out.append(f"| {r['solver']} | {r['nfe']} | {_fmt(v.mean())} ({_fmt(v.max())}) | {alt} {_fmt(r['rmse'][alt])} "
                   f"| {v.mean() / r['rmse'][alt]:.3f} | {', '.join(inits)} | {verdict} |")
    out += ["", ("Where the learned grid does not beat the best alternative on every seed: " + "; ".join(losses) + ".")
            if losses else "The learned grid beats the best alternative at every solver and NFE, on every seed.", ""]

    out += ["## Cost", "",
            "Teacher: DPM-Solver++(3M) solve of the calibration set, compilation included (once per seed, shared "
            "by all solvers and NFEs): " + ", ".join(f"seed {k}: {v:.2f} s" for k, v in res["teacher_s"].items())
            + ". Compile: trace + XLA compilation of the optimizer loop (value and gradient through the sampler "
            "inside the Adam scan), first seed (later seeds hit the persistent compilation cache). Learn: the "
            "compiled loop, mean over seeds. Total = teacher + compile + learn (the calibration losses of the "
            "candidate inits add one forward compilation, included in no column).", "",
            "| solver | NFE | compile (s) | learn (s) | calibration loss: init -> learned (seed 0) |",
            "|---|---|---|---|---|"]
    for r in rows:
        best = [d for d in r["learned"] if d["init"] == "best"]
        out.append(f"| {r['solver']} | {r['nfe']} | {best[0]['compile_s']:.1f} | "
                   f"{np.mean([d['learn_s'] for d in best]):.2f} | {best[0]['cal_loss_init']:.3g} -> "
                   f"{best[0]['cal_loss']:.3g} |")
    out.append("")
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(out))
    print("\n".join(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--nfes", default="5,6,8,10")
    ap.add_argument("--n-cal", type=int, default=1024, help="calibration noises per seed")
    ap.add_argument("--opt-steps", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if args.quick:
        settings = dict(nfes=[5], solvers=["dpm_solver++_2m"], seeds=[0], n_cal=64, n_held=256, opt_steps=100,
                        lr=0.05, teacher_steps=128)
        stem = args.out or os.path.join(tempfile.gettempdir(), "learned_grid.quick")
    else:
        settings = dict(nfes=[int(x) for x in args.nfes.split(",")], solvers=args.solvers.split(","),
                        seeds=list(range(args.seeds)), n_cal=args.n_cal, n_held=2048, opt_steps=args.opt_steps, lr=0.05,
                        teacher_steps=512)
        stem = args.out or os.path.join(RESULTS, "learned_grid")
    t = time.perf_counter()
    res = run(**settings)
    settings.update(command="python benchmarks/learned_grid.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
                    load_start=load_start, load_end=", ".join(f"{x:.1f}" for x in os.getloadavg()),
                    wall_s=time.perf_counter() - t)
    write_report(res, stem, settings)


if __name__ == "__main__":
    main()
