"""Benchmark of optimized time steps (Xue et al. CVPR 2024) in jaxdiff.

  (a) time: first call (trace + XLA compile + run) and time per optimization after compilation of
      `jaxdiff.timesteps.optimize`, next to scipy `trust-constr` on the same objective (linear constraints
      as the official DM-NonUniform code; scipy's 2-point finite-difference gradient as the official code,
      and, in the full run, the exact JAX gradient), same initial grid, same machine, same run;
  (b) the exact objective each reaches;
  (c) on an analytic Gaussian mixture: RMSE to the reference probability-flow ODE solution and the NLL of
      the samples under the data density, for UniPC-3 (bh1) and DPM-Solver++(3M), optimized grid against
      uniform-t, uniform-logSNR, time-quadratic and Karras grids at NFE 5, 6, 8, 10.

    python benchmarks/optimized_steps.py            # full run  -> benchmarks/results/optimized_steps.*
    python benchmarks/optimized_steps.py --quick    # < 1 min smoke run (fewer NFE, smaller batch)
    python benchmarks/optimized_steps.py --write-cache   # regenerate jaxdiff/timesteps/optimized_grids.json
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

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.timesteps import grids  # noqa: E402
import importlib  # noqa: E402
opt = importlib.import_module("jaxdiff.timesteps.optimize")   # the module (the package re-exports the function)
from jaxdiff.timesteps._scipy_reference import trust_constr  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HAND = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")


# ------------------------------------------------------------------------------------------------
# cache generation
# ------------------------------------------------------------------------------------------------

CACHE_PROCESSES = ("vp_linear", "vp_continuous_linear", "edm")


def write_cache(path=None, nfes=range(5, 16)):
    path = path or opt.DEFAULT_CACHE
    n = 0
    t0 = time.perf_counter()
    for name in CACHE_PROCESSES:
        proc = make_process(name)
        for nfe in nfes:
            for solver in ("dpm_solver++", "unipc"):
                for order in (3, 2):
                    for p in (1.0, 2.0):
                        with warnings.catch_warnings(record=True) as w:
                            warnings.simplefilter("always")
                            opt.optimized_grid(proc, solver, order, nfe, p=p, cache_path=path, write=False,
                                               label=name)
                        if w:
                            print(f"  warning {name} {solver} {order} {nfe} {p}: {w[-1].message}")
                        n += 1
            print(f"{name} nfe {nfe}: {n} grids, {time.perf_counter() - t0:.0f} s", flush=True)
    opt._write_cache(path, opt.load_cache(path))
    print(f"wrote {n} grids to {path}")


# ------------------------------------------------------------------------------------------------
# (a), (b): time and objective, ours vs scipy trust-constr
# ------------------------------------------------------------------------------------------------

def bench_optimizer(nfes, analytic_scipy: bool, settings):
    proc = make_process(settings["process"])
    other = make_process("vp_continuous_linear")
    rows = []
    for nfe in nfes:
        kw = dict(p=settings["p"], variant=settings["variant"])
        row = {"nfe": nfe}
        # ours, single init (same as scipy): first call compiles
        before = opt.trace_count()
        t0 = time.perf_counter()
        g, info = opt.optimize(proc, settings["solver"], settings["order"], nfe, init=settings["init"],
                               return_info=True, **kw)
        row["ours_first_call_s"] = time.perf_counter() - t0
        row["ours_compiles"] = opt.trace_count() - before
        times = []
        for k in range(3):          # new grids of the same NFE: other process / p / end point, no recompile
            pr = (proc, other, proc)[k]
            t0 = time.perf_counter()
            opt.optimize(pr, settings["solver"], settings["order"], nfe, init=settings["init"],
                         p=(settings["p"], 1.0, settings["p"])[k], variant=settings["variant"],
                         t_end=(None, None, 2e-3)[k])
            times.append(time.perf_counter() - t0)
        row["ours_recompiles_after_first"] = opt.trace_count() - before - row["ours_compiles"]
        row["ours_run_s"] = float(np.median(times))
        row["ours_objective"] = info.objective
        row["ours_converged"] = info.converged
        row["init_objective"] = float(info.init_objectives[0])
        # ours, all four initial grids in one vmapped call
        t0 = time.perf_counter()
        opt.optimize(proc, settings["solver"], settings["order"], nfe, init="all", **kw)
        row["ours_all_first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, info4 = opt.optimize(proc, settings["solver"], settings["order"], nfe, init="all", return_info=True,
                                **kw)
        row["ours_all_run_s"] = time.perf_counter() - t0
        row["ours_all_objective"] = info4.objective
        row["ours_all_best_init"] = str(info4.best_init)
        # scipy
        r = trust_constr(proc, settings["solver"], settings["order"], nfe, init=settings["init"],
                         gradient="2-point", **kw)
        row.update(scipy_fd_s=r["seconds"], scipy_fd_objective=r["objective"], scipy_fd_nit=r["nit"])
        if analytic_scipy:
            r = trust_constr(proc, settings["solver"], settings["order"], nfe, init=settings["init"],
                             gradient="analytic", **kw)
            row.update(scipy_grad_s=r["seconds"], scipy_grad_objective=r["objective"], scipy_grad_nit=r["nit"])
        rows.append(row)
        print(f"(a,b) nfe {nfe}: ours first {row['ours_first_call_s']:.2f}s run {row['ours_run_s']:.3f}s "
              f"obj {row['ours_objective']:.6g} | scipy-fd {row['scipy_fd_s']:.2f}s obj {row['scipy_fd_objective']:.6g}"
              + (f" | scipy-grad {row['scipy_grad_s']:.2f}s obj {row['scipy_grad_objective']:.6g}"
                 if analytic_scipy else ""), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# (c): effect on an analytic Gaussian mixture
# ------------------------------------------------------------------------------------------------

def bench_mixture(nfes, batch, settings_c):
    from jaxdiff.analytic import GaussianMixture
    from jaxdiff.solvers import make_solver, sample

    proc = make_process(settings_c["process"])
    mix = GaussianMixture.random(jax.random.key(settings_c["seed"]), settings_c["components"], settings_c["dim"])
    x_T = proc.prior_sample(jax.random.key(1), (batch, mix.dim), jnp.float64)
    t_start, t_end = float(proc.t_max), float(proc.t_min)
    ref = mix.reference_ode_solution(proc, x_T, t_start, t_end)
    ref_nll = float(-jnp.mean(mix.log_prob(ref)))
    den = mix.denoiser(proc, "eps")
    solvers = {"unipc": make_solver("unipc", order=3), "dpm_solver++": make_solver("dpm_solver++", order=3)}
    out = {"reference_nll": ref_nll, "rows": []}
    for sname, solver in solvers.items():
        for nfe in nfes:
            assert tuple(solver.orders(nfe)) == opt.order_pattern(sname, 3, nfe), "order pattern mismatch"
            cand = {name: np.asarray(grids.make_grid(name, proc, nfe), np.float64) for name in HAND}
            for label, kw in settings_c["optimized"].items():
                cand[label] = opt.optimized_grid(proc, sname, 3, nfe, **kw)
            for gname, g in cand.items():
                x = sample(den, proc, x_T, jnp.asarray(g), solver=solver, prediction="eps")
                rmse = float(jnp.sqrt(jnp.mean((x - ref) ** 2)))
                nll = float(-jnp.mean(mix.log_prob(x)))
                obj = opt.objective(proc, g, solver=sname, order=3, p=1.0)
                out["rows"].append({"solver": sname, "nfe": nfe, "grid": gname, "rmse": rmse, "nll": nll,
                                    "objective_p1_official": obj, "times": [float(v) for v in g]})
            best_hand = min((r for r in out["rows"] if r["solver"] == sname and r["nfe"] == nfe
                             and r["grid"] in HAND), key=lambda r: r["rmse"])
            ours = [r for r in out["rows"] if r["solver"] == sname and r["nfe"] == nfe and r["grid"] == "optimized"]
            print(f"(c) {sname} nfe {nfe}: optimized rmse {ours[0]['rmse']:.4g} vs best hand-made "
                  f"{best_hand['grid']} {best_hand['rmse']:.4g}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def write_report(res, stem):
    os.makedirs(RESULTS, exist_ok=True)
    with open(stem + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    L = [f"# Optimized time steps — benchmark ({'quick' if res['quick'] else 'full'} run)", "",
         f"Machine: {res['machine']}. JAX {res['jax']}, float64. Command: `{res['command']}`.", ""]
    s = res["settings_ab"]
    L += ["## (a) time and (b) objective: jaxdiff vs scipy trust-constr", "",
          f"Objective: {s['solver']} order {s['order']}, p={s['p']}, variant '{s['variant']}', process "
          f"{s['process']}, both from the {s['init']} grid. Ours: jit L-BFGS (continuation + exact polish); "
          "'first call' includes tracing and XLA compilation for that NFE, 'run' is the median of 3 later calls "
          "with new grids (other process, p or end time: no recompilation). 'all inits' = the 4 hand-made "
          "grids optimized together (vmap) and the best kept. scipy: `minimize(method='trust-constr')` with "
          "the official code's LinearConstraint and default options (maxiter 1000), gradient by 2-point finite "
          "differences as the official code (`fd`)" + (", and with the exact JAX gradient (`grad`)"
                                                       if res["analytic_scipy"] else "") + ".", ""]
    hdr = "| NFE | ours first call (s) | ours run (s) | ours all inits run (s) | scipy fd (s) |"
    sep = "|---|---|---|---|---|"
    if res["analytic_scipy"]:
        hdr += " scipy grad (s) |"
        sep += "---|"
    hdr += " init obj | ours obj | ours all-inits obj | scipy fd obj |"
    sep += "---|---|---|---|"
    if res["analytic_scipy"]:
        hdr += " scipy grad obj |"
        sep += "---|"
    L += [hdr, sep]
    for r in res["optimizer"]:
        line = (f"| {r['nfe']} | {r['ours_first_call_s']:.2f} | {r['ours_run_s']:.3f} | {r['ours_all_run_s']:.3f} | "
                f"{r['scipy_fd_s']:.2f} |")
        if res["analytic_scipy"]:
            line += f" {r['scipy_grad_s']:.2f} |"
        line += (f" {r['init_objective']:.6g} | **{r['ours_objective']:.8g}** | {r['ours_all_objective']:.8g} | "
                 f"{r['scipy_fd_objective']:.8g} |")
        if res["analytic_scipy"]:
            line += f" {r['scipy_grad_objective']:.8g} |"
        L.append(line)
    worse = [r["nfe"] for r in res["optimizer"] if r["ours_objective"] > r["scipy_fd_objective"] * (1 + 1e-7)]
    L += ["", "Ours reaches a lower or equal objective than scipy-fd at every NFE." if not worse else
          f"Ours is WORSE than scipy-fd at NFE {worse}.", ""]
    if "mixture" in res:
        m = res["mixture"]
        c = res["settings_c"]
        L += ["## (c) effect on an analytic Gaussian mixture", "",
              f"Mixture: `GaussianMixture.random(key({c['seed']}), {c['components']} components, dim {c['dim']})`, "
              f"process {c['process']}, {c['batch']} samples from t={c['t_start']} to t={c['t_end']}, "
              "eps-prediction by the exact denoiser; reference = `reference_ode_solution` (RK4, 4096 steps). "
              "RMSE to the reference over all coordinates; NLL = mean -log p_data(x) of the samples "
              f"(reference solution: {m['reference_nll']:.4f}). Solvers: UniPC-3 (bh1) and DPM-Solver++(3M), "
              "multistep with warm-up and lower_order_final as in jaxdiff.solvers. Optimized grids: "
              + "; ".join(f"`{k}` = {v}" for k, v in c["optimized"].items()) + ".", ""]
        for sname in ("unipc", "dpm_solver++"):
            rows = [r for r in m["rows"] if r["solver"] == sname]
            names = list(dict.fromkeys(r["grid"] for r in rows))
            nfes = sorted(set(r["nfe"] for r in rows))
            L += [f"### {sname} order 3 — RMSE (NLL)", "", "| grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
            for gname in names:
                cells = []
                for n in nfes:
                    r = next(r for r in rows if r["grid"] == gname and r["nfe"] == n)
                    best = min(x["rmse"] for x in rows if x["nfe"] == n)
                    cell = f"{r['rmse']:.4g} ({r['nll']:.3f})"
                    cells.append(f"**{cell}**" if r["rmse"] == best else cell)
                L.append(f"| {gname} | " + " | ".join(cells) + " |")
            L.append("")
        L += ["### optimized vs best hand-made grid (RMSE)", "", "| solver | NFE | optimized | best hand-made | "
              "ratio | verdict |", "|---|---|---|---|---|---|"]
        for v in res["verdict"]:
            L.append(f"| {v['solver']} | {v['nfe']} | {v['optimized']:.4g} | {v['best_hand']} {v['best_hand_rmse']:.4g} | "
                     f"{v['ratio']:.3f} | {'beats' if v['beats'] else 'LOSES'} |")
        L.append("")
    if res.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(L))
    try:
        plot(res, stem + ".png")
    except Exception as e:    # plotting is optional
        print("plot failed:", e)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = 3 if "mixture" in res else 2
    fig, ax = plt.subplots(1, n, figsize=(5 * n, 4))
    o = res["optimizer"]
    nf = [r["nfe"] for r in o]
    ax[0].semilogy(nf, [r["ours_run_s"] for r in o], "o-", label="ours (after compile)")
    ax[0].semilogy(nf, [r["ours_first_call_s"] for r in o], "o--", label="ours first call (compile)")
    ax[0].semilogy(nf, [r["scipy_fd_s"] for r in o], "s-", label="scipy trust-constr (fd)")
    if res["analytic_scipy"]:
        ax[0].semilogy(nf, [r["scipy_grad_s"] for r in o], "s--", label="scipy trust-constr (grad)")
    ax[0].set(xlabel="NFE", ylabel="seconds", title="time per optimization")
    ax[0].legend(fontsize=8)
    ax[1].plot(nf, [r["ours_objective"] for r in o], "o-", label="ours")
    ax[1].plot(nf, [r["scipy_fd_objective"] for r in o], "s-", label="scipy fd")
    ax[1].plot(nf, [r["init_objective"] for r in o], "x:", label="initial grid")
    ax[1].set_yscale("log")
    ax[1].set(xlabel="NFE", ylabel="objective", title="objective reached")
    ax[1].legend(fontsize=8)
    if "mixture" in res:
        rows = res["mixture"]["rows"]
        for sname, ls in (("unipc", "-"), ("dpm_solver++", "--")):
            for gname in dict.fromkeys(r["grid"] for r in rows):
                rr = sorted((r for r in rows if r["solver"] == sname and r["grid"] == gname), key=lambda r: r["nfe"])
                ax[2].semilogy([r["nfe"] for r in rr], [r["rmse"] for r in rr], ls, marker="o", ms=3,
                               label=f"{sname} {gname}")
        ax[2].set(xlabel="NFE", ylabel="RMSE to reference ODE", title="Gaussian mixture")
        ax[2].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-cache", action="store_true")
    ap.add_argument("--no-mixture", action="store_true")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/optimized_steps)")
    args = ap.parse_args(argv)
    if args.write_cache:
        write_cache()
        return
    warnings.simplefilter("ignore", UserWarning)
    quick = args.quick
    settings_ab = {"process": "vp_linear", "solver": "unipc", "order": 3, "p": 2.0, "variant": "official",
                   "init": "uniform_logsnr"}
    res = {"quick": quick, "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.platform()}",
           "jax": jax.__version__, "command": "python benchmarks/optimized_steps.py" + (" --quick" if quick else ""),
           "settings_ab": settings_ab, "analytic_scipy": not quick, "notes": []}
    t0 = time.perf_counter()
    res["optimizer"] = bench_optimizer([5, 8] if quick else [5, 6, 7, 8, 10, 12, 15], not quick, settings_ab)
    if not args.no_mixture:
        proc = make_process("vp_linear")
        settings_c = {"process": "vp_linear", "seed": 0, "components": 8, "dim": 16, "batch": 64 if quick else 1024,
                      "t_start": float(proc.t_max), "t_end": float(proc.t_min),
                      "optimized": {"optimized": {"p": 1.0},
                                    "optimized_p2": {"p": 2.0},
                                    "optimized_paper": {"p": 1.0, "variant": "paper"}}}
        if quick:
            settings_c["optimized"] = {"optimized": {"p": 1.0}}
        res["settings_c"] = settings_c
        m = bench_mixture([5] if quick else [5, 6, 8, 10], settings_c["batch"], settings_c)
        res["mixture"] = m
        verdict = []
        for sname in ("unipc", "dpm_solver++"):
            for nfe in sorted(set(r["nfe"] for r in m["rows"])):
                rows = [r for r in m["rows"] if r["solver"] == sname and r["nfe"] == nfe]
                ours = next(r for r in rows if r["grid"] == "optimized")
                best = min((r for r in rows if r["grid"] in HAND), key=lambda r: r["rmse"])
                verdict.append({"solver": sname, "nfe": nfe, "optimized": ours["rmse"], "best_hand": best["grid"],
                                "best_hand_rmse": best["rmse"], "ratio": ours["rmse"] / best["rmse"],
                                "beats": ours["rmse"] < best["rmse"]})
        res["verdict"] = verdict
    res["total_s"] = time.perf_counter() - t0
    stem = args.out or os.path.join(RESULTS, "optimized_steps" + (".quick" if quick else ""))
    write_report(res, stem)
    print(f"done in {res['total_s']:.1f} s -> {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
