"""Learned time grids on the trained digits model: classifier-space Frechet distance, class agreement and
RMSE to a many-step solution, learned grid vs the hand-made grids and Xue's optimized grid, at NFE 4-8.

    python train.py --config digits --workdir runs/digits                 # or `make demo`
    python benchmarks/learned_grid_digits.py --workdir runs/digits        # what results/learned_grid_digits.* holds

For each solver and NFE: `learn_grid` (init "best", `--calibration` noises with labels 0..9 in turn, the
teacher shared by all NFEs) and, with `--stf`, the same with LD3's soft teacher forcing (radius "ld3").
Every grid -- the four hand-made ones as `sample.py --grid NAME` builds them, Xue's ("optimized"), the learned
ones -- is scored on the same `--num` held-out noises per `--seeds` seed (never the calibration set): RMSE to
the teacher solution of those noises, and the digits classifier's class agreement and Frechet distance to the
360 held-out real digits. The noise floor of the Frechet distance is the spread of the teacher's own value
over the seeds. Results: <out>.json (raw, written as cells finish) and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdiff.extractors import digits_quality  # noqa: E402
from jaxdiff.sampling import make_denoiser, time_grid  # noqa: E402
from jaxdiff.solvers import learn_grid, make_solver, sample  # noqa: E402
from jaxdiff.solvers.learned_grid import steps_for_nfe, teacher_solution  # noqa: E402
from jaxdiff.timesteps import tree_hash  # noqa: E402
from jaxdiff.train_lib.experiment import load_sampling_model  # noqa: E402

HAND = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")
SOLVERS = {"dpm_solver++_2m": ("dpm_solver++", {"order": 2}), "unipc_3": ("unipc", {"order": 3}),
           "ddim": ("ddim", {})}


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "digits"))
    ap.add_argument("--solvers", default="dpm_solver++_2m", help=f"comma-separated of {sorted(SOLVERS)}")
    ap.add_argument("--nfes", default="4,5,6,8")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--learn-steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--teacher-steps", type=int, default=100)
    ap.add_argument("--num", type=int, default=500, help="held-out samples per seed and cell")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--stf", action="store_true", help="also learn with LD3's soft teacher forcing")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "learned_grid_digits"))
    return ap.parse_args(argv)


def main(argv=None):
    args = _args(argv)
    model, _ = load_sampling_model(args.workdir, mesh=None)
    params = jax.device_get(model.params)
    proc, pred = model.process, model.prediction
    den = make_denoiser(model.apply, params, proc)
    shape = tuple(model.shape)
    res = {"command": " ".join(["benchmarks/learned_grid_digits.py"] + (argv or sys.argv[1:])),
           "workdir": args.workdir, "step": model.step, "model_hash": tree_hash(params),
           "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "jax": jax.__version__},
           "loadavg_start": os.getloadavg(), "settings": vars(args), "learn": [], "cells": [], "floor": {}}
    log = lambda s: print(s, flush=True)  # noqa: E731

    def noise(key, n):
        return jax.random.normal(jax.random.key(key), (n,) + shape, jnp.float32) * proc.prior_std

    labels_of = lambda n: jnp.asarray(np.arange(n) % model.num_classes, jnp.int32)  # noqa: E731
    cal, cal_labels = noise(1000, args.calibration), labels_of(args.calibration)
    t0 = time.perf_counter()
    teacher_cal = jax.block_until_ready(teacher_solution(den, proc, cal, proc.t_max, proc.t_min,
                                                         steps=args.teacher_steps, prediction=pred, cond=cal_labels))
    res["teacher_calibration_s"] = time.perf_counter() - t0

    seeds = [int(s) for s in args.seeds.split(",")]
    held = {s: noise(2000 + s, args.num) for s in seeds}
    held_labels = labels_of(args.num)
    teacher_held = {s: np.asarray(teacher_solution(den, proc, held[s], proc.t_max, proc.t_min, steps=args.teacher_steps,
                                                   prediction=pred, cond=held_labels)) for s in seeds}
    for s in seeds:
        q = digits_quality(np.clip(teacher_held[s], -1, 1), np.asarray(held_labels))
        res["floor"][str(s)] = {"agreement": q["class_agreement"], "fd": q["frechet_classifier_distance"]}
    fds = [v["fd"] for v in res["floor"].values()]
    log(f"teacher ({args.teacher_steps} steps DPM-Solver++(3M)): FD {fds}, agreement "
        f"{[v['agreement'] for v in res['floor'].values()]}")

    def write():
        res["loadavg_end"] = os.getloadavg()
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1, default=float)
        write_markdown(res, args.out + ".md")

    for sname in args.solvers.split(","):
        solver_name, kw = SOLVERS[sname]
        solver = make_solver(solver_name, **kw)
        for nfe in [int(n) for n in args.nfes.split(",")]:
            steps = steps_for_nfe(solver, proc, nfe)
            grids = {g: time_grid(proc, g, steps, solver_name, kw.get("order")) for g in HAND}
            if solver_name in ("dpm_solver++", "unipc"):
                grids["xue (optimized)"] = time_grid(proc, "optimized", steps, solver_name, kw.get("order"))
            variants = [("learned", None)] + ([("learned + soft teacher forcing", "ld3")] if args.stf else [])
            for label, stf in variants:
                r = learn_grid(den, proc, solver, nfe, cal, teacher=teacher_cal, init="best", steps=args.learn_steps,
                               lr=args.lr, prediction=pred, cond=cal_labels, remat=True, model=res["model_hash"],
                               soft_teacher_forcing=stf)
                grids[label] = r.grid
                res["learn"].append({"solver": sname, "nfe": nfe, "variant": label, "init": r.init_name,
                                     "loss_init": r.loss_init, "loss": r.loss, "compile_s": r.compile_s,
                                     "learn_s": r.learn_s, "grid": r.grid.tolist()})
                log(f"{sname} NFE {nfe} {label}: calibration loss {r.loss_init:.3g} -> {r.loss:.3g} (init "
                    f"{r.init_name}); compile {r.compile_s:.0f} s, learn {r.learn_s:.0f} s")
            run = jax.jit(lambda x, g: sample(den, proc, x, g, solver=solver, prediction=pred, cond=held_labels))
            for gname, g in grids.items():
                for s in seeds:
                    x = np.asarray(run(held[s], jnp.asarray(g)))
                    rmse = float(np.sqrt(np.mean((x - teacher_held[s]) ** 2)))
                    q = digits_quality(np.clip(x, -1, 1), np.asarray(held_labels))
                    res["cells"].append({"solver": sname, "nfe": nfe, "grid": gname, "seed": s, "rmse": rmse,
                                         "agreement": q["class_agreement"], "fd": q["frechet_classifier_distance"]})
                    log(f"  {gname:32s} seed {s}: RMSE {rmse:.4f} agreement {q['class_agreement']:.3f} "
                        f"FD {q['frechet_classifier_distance']:.2f}")
                write()
    write()
    return res


def write_markdown(res: dict, path: str) -> None:
    s = res["settings"]
    floor = res["floor"]
    fds = [v["fd"] for v in floor.values()]
    lines = ["# Learned time grids on the trained digits model", "",
             f"Written by `{res['command']}` on {res['machine']['platform']} ({res['machine']['cores']} cores, "
             f"JAX {res['machine']['jax']}); load average at start {res['loadavg_start'][0]:.1f}, at end "
             f"{res.get('loadavg_end', [float('nan')])[0]:.1f}. Model: `{res['workdir']}` step {res['step']} "
             f"(EMA; parameters hash {res['model_hash'][:12]}).", "",
             f"Learned grids: `learn_grid(init='best', steps={s['learn_steps']}, lr={s['lr']}, remat=True)` on "
             f"{s['calibration']} calibration noises (labels 0-9 in turn), teacher DPM-Solver++(3M) with "
             f"{s['teacher_steps']} uniform-logSNR steps. Every grid is scored on {s['num']} held-out noises per "
             f"seed ({s['seeds']}), labels 0-9 in turn: RMSE to the teacher from the same noises, class agreement "
             "and Frechet distance (FD) in the digits classifier's feature space against the 360 held-out real "
             "digits. Cells: mean over seeds.", "",
             f"**Noise floor**: the teacher itself scores FD {', '.join(f'{v:.2f}' for v in fds)} on the seeds "
             f"(agreement {', '.join(format(v['agreement'], '.3f') for v in floor.values())}): FD differences smaller than "
             f"about {max(fds) - min(fds) if len(fds) > 1 else float('nan'):.2f} are within sampling noise.", ""]
    by = {}
    for c in res["cells"]:
        by.setdefault((c["solver"], c["nfe"], c["grid"]), []).append(c)
    for solver in dict.fromkeys(c["solver"] for c in res["cells"]):
        nfes = sorted({c["nfe"] for c in res["cells"] if c["solver"] == solver})
        names = list(dict.fromkeys(c["grid"] for c in res["cells"] if c["solver"] == solver))
        for metric, title, fmt in (("rmse", "RMSE to the teacher", "{:.4f}"), ("fd", "Frechet distance", "{:.2f}"),
                                   ("agreement", "class agreement", "{:.3f}")):
            lines += [f"## {solver}: {title}", "", "| grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                      "|---|" + "---|" * len(nfes)]
            best = {}
            for n in nfes:
                vals = {g: np.mean([c[metric] for c in by.get((solver, n, g), [])]) for g in names
                        if by.get((solver, n, g))}
                best[n] = (max if metric == "agreement" else min)(vals, key=vals.get) if vals else None
            for g in names:
                cells = []
                for n in nfes:
                    v = by.get((solver, n, g))
                    txt = "-" if not v else fmt.format(np.mean([c[metric] for c in v]))
                    cells.append(f"**{txt}**" if best[n] == g else txt)
                lines.append(f"| {g} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Learning cost", "", "| solver | NFE | variant | init | calibration loss init -> learned | compile s | "
              "learn s |", "|---|---|---|---|---|---|---|"]
    for r in res["learn"]:
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['variant']} | {r['init']} | {r['loss_init']:.4g} -> "
                     f"{r['loss']:.4g} | {r['compile_s']:.0f} | {r['learn_s']:.0f} |")
    lines += ["", res.get("notes", "")]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
