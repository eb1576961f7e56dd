"""Sample quality of a trained digits model per solver, time grid and NFE, scored by the project's digits
classifier: the share of class-conditional samples classified as the class asked for, and the Frechet
distance between classifier features of samples and of the 360 held-out real digits (a Frechet distance
in that classifier's feature space, not Inception FID).

    python benchmarks/digits_quality.py --workdir runs/digits            # after `make demo`
    python benchmarks/digits_quality.py --workdir runs/digits --quick    # 3 solvers x 2 NFE

Writes benchmarks/results/digits_quality.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdiff.sampling import Sampler, SamplerSettings, sample_images  # noqa: E402
from jaxdiff.train_lib.experiment import load_sampling_model  # noqa: E402
from jaxdiff.extractors import digits_quality  # noqa: E402

SOLVERS = {                       # name -> (solver, solver_kwargs)
    "DDIM": ("ddim", {}),
    "Euler": ("euler", {}),
    "iPNDM": ("ipndm", {}),
    "DPM-Solver++(2M)": ("dpm_solver++", {"order": 2}),
    "DPM-Solver++(3M)": ("dpm_solver++", {"order": 3}),
    "UniPC-3": ("unipc", {"order": 3}),
}
GRIDS = ("uniform_logsnr", "time_quadratic", "optimized")
NFES = (5, 10, 20)
GUIDANCE = (None, 1.5, 3.0)


def score(model, mesh, solver, kwargs, grid, steps, guidance, num, seed) -> dict:
    settings = SamplerSettings(solver=solver, solver_kwargs=kwargs, grid=grid, steps=steps, guidance_scale=guidance)
    sampler = Sampler(model, settings, mesh)
    labels = np.arange(num) % model.num_classes
    t0 = time.perf_counter()
    images = sample_images(sampler, labels, num, seed, batch=num)
    seconds = time.perf_counter() - t0
    q = digits_quality(images, labels)
    return {"class_agreement": q["class_agreement"], "frechet_classifier_distance": q["frechet_classifier_distance"],
            "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "digits"))
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_quality"))
    args = parser.parse_args()
    model, mesh = load_sampling_model(args.workdir)
    solvers = {k: SOLVERS[k] for k in (["DDIM", "DPM-Solver++(2M)", "UniPC-3"] if args.quick else SOLVERS)}
    nfes = (10, 20) if args.quick else NFES
    grids = ("uniform_logsnr",) if args.quick else GRIDS
    rows = []
    for name, (solver, kwargs) in solvers.items():
        for grid in grids:
            if grid == "optimized" and solver not in ("dpm_solver++", "unipc"):
                continue
            for nfe in nfes:
                if nfe < kwargs.get("order", 1):
                    continue
                r = score(model, mesh, solver, kwargs, grid, nfe, None, args.num, args.seed)
                rows.append({"solver": name, "grid": grid, "nfe": nfe, "guidance": None, **r})
                print(f"{name:18s} {grid:15s} NFE {nfe:3d}: agreement {r['class_agreement']:.3f} "
                      f"FD {r['frechet_classifier_distance']:8.2f}", flush=True)
    for g in GUIDANCE[1:]:
        for nfe in nfes:
            r = score(model, mesh, "dpm_solver++", {"order": 2}, "uniform_logsnr", nfe, g, args.num, args.seed)
            rows.append({"solver": "DPM-Solver++(2M)", "grid": "uniform_logsnr", "nfe": nfe, "guidance": g, **r})
            print(f"guidance {g}: NFE {nfe}: agreement {r['class_agreement']:.3f} "
                  f"FD {r['frechet_classifier_distance']:.2f}", flush=True)
    real = digits_quality_real()
    meta = {"checkpoint": os.path.abspath(args.workdir), "checkpoint_step": model.step, "samples_per_cell": args.num,
            "seed": args.seed, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "real_train_vs_test": real}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(args.out + ".md", meta, rows)
    print(f"wrote {args.out}.md/.json")


def digits_quality_real() -> dict:
    """The same two scores for 500 real training digits (the ceiling a model can reach)."""
    from jaxdiff.data.digits import load_digits_arrays
    x, y = load_digits_arrays("train", 16)
    x = x[:500].astype(np.float32) / 127.5 - 1
    q = digits_quality(x, y[:500])
    return {"class_agreement": q["class_agreement"], "frechet_classifier_distance": q["frechet_classifier_distance"]}


def write_markdown(path: str, meta: dict, rows: list[dict]) -> None:
    lines = ["# Digits sample quality per solver, grid and NFE", "",
             f"Checkpoint: step {meta['checkpoint_step']} of `{os.path.relpath(meta['checkpoint'], ROOT)}` "
             f"(configs/digits.py); {meta['samples_per_cell']} class-conditional samples per cell (labels 0..9 "
             f"cycled), EMA parameters, seed {meta['seed']}; {meta['machine']}; {meta['date']}.", "",
             "*agreement*: share of samples the digits classifier (98.9% held-out accuracy) assigns to the "
             "requested class. *FD*: Frechet distance between classifier features (64-d) of the samples and of "
             "the 360 held-out test digits; not Inception FID. Real training digits score "
             f"agreement {meta['real_train_vs_test']['class_agreement']:.3f}, "
             f"FD {meta['real_train_vs_test']['frechet_classifier_distance']:.2f}.", ""]
    plain = [r for r in rows if r["guidance"] is None]
    nfes = sorted({r["nfe"] for r in plain})
    lines += ["## No guidance", "", "| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
              "|---|---|" + "---|" * len(nfes)]
    for key in dict.fromkeys((r["solver"], r["grid"]) for r in plain):
        cells = []
        for n in nfes:
            r = next((r for r in plain if (r["solver"], r["grid"], r["nfe"]) == (*key, n)), None)
            cells.append("—" if r is None else f"{r['class_agreement']:.3f} / {r['frechet_classifier_distance']:.1f}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: agreement / FD.", "", "## Classifier-free guidance (DPM-Solver++(2M), uniform-logSNR)", "",
              "| guidance scale | NFE | agreement | FD |", "|---|---|---|---|"]
    base = {r["nfe"]: r for r in plain if r["solver"] == "DPM-Solver++(2M)" and r["grid"] == "uniform_logsnr"}
    for r in [base[n] for n in sorted(base)] + [r for r in rows if r["guidance"] is not None]:
        g = "none" if r["guidance"] is None else f"{r['guidance']:g}"
        lines.append(f"| {g} | {r['nfe']} | {r['class_agreement']:.3f} | {r['frechet_classifier_distance']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
