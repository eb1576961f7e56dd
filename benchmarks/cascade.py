"""Cascaded diffusion with noise-conditioning augmentation (CDM, Ho et al. 2022) on the embedded digits: a
base model at 8x8 plus a super-resolution model 8 -> 16, against a direct 16x16 model of comparable training
compute, and the effect of the augmentation level at training and at sampling time.

    python benchmarks/cascade.py --seeds 0,1 --workdir runs/cascade_bench      # trains, samples, writes
    python benchmarks/cascade.py --seeds 0,1 --report-only      # merge the seeds' result files into the .json/.md

Per training seed: configs/cascade_digits_base8.py, configs/cascade_digits_sr16.py (augmentation s ~ U[0, 0.5])
and its ``noaug`` variant (s = 0), and configs/digits.py (the direct 16x16 model, same UNet as the
super-resolution one less its low-res input) trained for as many steps as the base + super-resolution pair
cost in XLA's FLOP estimate of the train steps (the SR models train 400 steps here, not the configs' 1,000:
the shared machine allowed no more). Each is sampled (DPM-Solver++(2M), 10 steps per stage, no guidance, 360
samples, classes cycled) and scored with the shipped 16x16 digits classifier against the
held-out split (class agreement, Frechet distance in its feature space). Writes
benchmarks/results/cascade.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "cascade")
SAMPLE_LEVELS = (0.0, 0.1, 0.2, 0.35, 0.5)
TRUNCATED_LEVELS = (0.35,)
NUM, STEPS = 360, 10          # 360 = the held-out split, so the oracle rows reuse the compiled samplers
SR_STEPS = 400                # the shipped SR configs train 1,000 steps; the loaded 2-core machine allowed 400


def train(config: str, workdir: str, seed: int, extra=()) -> dict:
    """Train (unless finished) and return ``{"gflop_per_step", "seconds", "steps"}`` from its log."""
    log_path = os.path.join(workdir, "train.log")
    while _training_elsewhere(workdir):     # another process trains it: wait, then read its log
        time.sleep(15)
    if not os.path.exists(os.path.join(workdir, "done.json")) and _finished(log_path):
        _write_done(workdir, log_path, None)
    if not os.path.exists(os.path.join(workdir, "done.json")):
        os.makedirs(workdir, exist_ok=True)
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
        t0 = time.time()
        with open(log_path, "w") as log:
            subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config,
                            "--workdir", workdir, f"--config.seed={seed}", *extra],
                           env=env, stderr=log, stdout=log, check=True)
        _write_done(workdir, log_path, time.time() - t0)
    return json.load(open(os.path.join(workdir, "done.json")))


def _training_elsewhere(workdir: str) -> bool:
    """Whether a train.py process of ``workdir`` is running (one this benchmark started earlier)."""
    out = subprocess.run(["pgrep", "-f", f"train.py .*--workdir {workdir} "], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _finished(log_path: str) -> bool:
    if not os.path.exists(log_path):
        return False
    done = re.findall(r"step (\d+)/(\d+) loss", open(log_path).read())
    return bool(done) and done[-1][0] == done[-1][1]


def _write_done(workdir: str, log_path: str, seconds) -> None:
    text = open(log_path).read()
    gflop = float(re.search(r"\(([\d.]+) GFLOP/step\)", text).group(1))
    steps = int(re.findall(r"step (\d+)/\d+ loss", text)[-1])
    if seconds is None:      # from the log's timestamps: the first line to the last
        stamps = re.findall(r"^(\d\d):(\d\d):(\d\d) ", text, re.M)
        sec = [int(h) * 3600 + int(m) * 60 + int(x) for h, m, x in stamps]
        seconds = sec[-1] - sec[0] if sec else float("nan")
    with open(os.path.join(workdir, "done.json"), "w") as f:
        json.dump({"gflop_per_step": gflop, "seconds": seconds, "steps": steps}, f)


def score(images, labels) -> dict:
    from jaxdiff.extractors import digits_quality
    q = digits_quality(images, labels)
    return {"class_agreement": float(q["class_agreement"]), "fd": float(q["frechet_classifier_distance"])}


def evaluate_seed(root: str, seed: int) -> dict:
    """Train the four models of ``seed`` under ``root`` and score every sampling condition."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.cascade import CascadeStage, cascade_samplers, downsample, sample_cascade
    from jaxdiff.data.digits import load_digits_arrays
    from jaxdiff.sampling import Sampler, SamplerSettings, sample_images
    from jaxdiff.train_lib.experiment import load_sampling_model
    w = {k: os.path.join(root, f"seed{seed}", k) for k in ("base8", "sr16", "sr16_noaug", "direct16")}
    cost = {"base8": train("configs/cascade_digits_base8.py", w["base8"], seed),
            "sr16": train("configs/cascade_digits_sr16.py", w["sr16"], seed, [f"--config.train.steps={SR_STEPS}"]),
            "sr16_noaug": train("configs/cascade_digits_sr16.py:noaug", w["sr16_noaug"], seed,
                                [f"--config.train.steps={SR_STEPS}"])}
    cascade_gflop = (cost["base8"]["gflop_per_step"] * cost["base8"]["steps"]
                     + cost["sr16"]["gflop_per_step"] * cost["sr16"]["steps"])
    # the direct model's FLOP/step is that of the SR UNet less its low-res input: measured on the first run
    probe = os.path.join(root, "direct16_gflop.json")
    if not os.path.exists(probe):
        train("configs/digits.py", os.path.join(root, "probe"), seed, ["--config.train.steps=1"])
        json.dump(json.load(open(os.path.join(root, "probe", "done.json"))), open(probe, "w"))
    direct_steps = int(round(cascade_gflop / json.load(open(probe))["gflop_per_step"]))

    labels = (np.arange(NUM) % 10).astype(np.int32)
    settings = SamplerSettings(solver="dpm_solver++", steps=STEPS)
    models = {k: load_sampling_model(v)[0] for k, v in w.items() if k != "direct16"}
    out = {"seed": seed, "cost": cost, "cascade_gflop": cascade_gflop, "direct_steps": direct_steps, "rows": []}

    def row(name, images, **extra):
        r = {"name": name, **extra, **score(images, labels)}
        out["rows"].append(r)
        print(json.dumps({"seed": seed, **r}), flush=True)

    t0 = time.time()
    base = sample_images(Sampler(models["base8"], settings), labels, NUM, seed, NUM)
    up = jax.image.resize(jnp.asarray(base), (NUM, 16, 16, 1), "cubic")
    row("base 8x8 + bicubic upsampling", np.asarray(up))
    samplers = {}
    for sr, levels in (("sr16", SAMPLE_LEVELS), ("sr16_noaug", (0.0,))):
        for s in levels:
            stages = [CascadeStage(models["base8"], settings), CascadeStage(models[sr], settings, aug_level=s)]
            samplers.setdefault(sr, cascade_samplers(stages))
            row(f"cascade, SR trained {'with' if sr == 'sr16' else 'without'} augmentation",
                sample_cascade(stages, labels, NUM, seed, NUM, samplers=samplers[sr])[-1], train_aug=sr == "sr16",
                sample_aug=s)
    for s in TRUNCATED_LEVELS:
        stages = [CascadeStage(models["base8"], settings), CascadeStage(models["sr16"], settings, aug_level=s,
                                                                         truncate=True)]
        row("cascade, truncated augmentation", sample_cascade(stages, labels, NUM, seed, NUM)[-1],
            train_aug=True, sample_aug=s)
    # oracle: the super-resolution models conditioned on real held-out 8x8 images (no base model errors)
    real16, real_labels = load_digits_arrays("test", 16)
    low = np.asarray(downsample(jnp.asarray(real16.astype(np.float32) / 127.5 - 1.0), 8))
    for sr in ("sr16", "sr16_noaug"):
        sampler = samplers[sr][1]
        images = sampler(models[sr].params, real_labels.astype(np.int32), jax.random.key(seed), low_res=low,
                         aug_level=0.0)
        from jaxdiff.extractors import digits_quality
        q = digits_quality(images, real_labels.astype(np.int32))
        r = {"name": f"SR trained {'with' if sr == 'sr16' else 'without'} augmentation, on real 8x8 test images",
             "train_aug": sr == "sr16", "sample_aug": 0.0, "class_agreement": float(q["class_agreement"]),
             "fd": float(q["frechet_classifier_distance"])}
        out["rows"].append(r)
        print(json.dumps({"seed": seed, **r}), flush=True)
    cost["direct16"] = train("configs/digits.py", w["direct16"], seed, [f"--config.train.steps={direct_steps}"])
    models["direct16"] = load_sampling_model(w["direct16"])[0]
    row("direct 16x16", sample_images(Sampler(models["direct16"], settings), labels, NUM, seed, NUM))
    out["sampling_seconds"] = time.time() - t0
    return out


def _stat(values):
    v = np.asarray(values, np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}" if len(v) else "-"


def report(data: dict) -> str:
    seeds = data["seeds"]
    keys = []
    for s in seeds:
        for r in s["rows"]:
            k = (r["name"], r.get("sample_aug"))
            if k not in keys:
                keys.append(k)
    lines = [
        "# Cascaded diffusion with noise-conditioning augmentation (CDM) on the digits",
        "",
        "Produced by `benchmarks/cascade.py` (raw numbers: `cascade.json`). Method: docs/cascade.md.",
        "",
        "**Paper claim** (Ho et al., JMLR 2022, arXiv 2106.15282): a cascade (base model + super-resolution models",
        "conditioned on the upsampled low-resolution image) gives high-fidelity samples, and its quality relies",
        "crucially on conditioning augmentation of the low-resolution input: without it, errors of the base model",
        "compound in the super-resolution stage.",
        "",
        "**Setup** (this run): embedded sklearn digits; base model 8x8 (`configs/cascade_digits_base8.py`), super-",
        "resolution 8->16 trained with Gaussian augmentation s ~ U[0, 0.5] (vp_cosine times) and without (s = 0)",
        "(`configs/cascade_digits_sr16.py[:noaug]`), a direct 16x16 model (`configs/digits.py`, same UNet as the",
        "SR model less its low-res input) trained for as many steps as base + SR cost in XLA's FLOP estimate of the",
        "train steps (base 1,000 steps, SR 400 steps, batch 64). All class-conditional, v-prediction; sampled with "
        "DPM-Solver++(2M), 10 steps per stage, no",
        f"guidance, {NUM} samples (classes cycled); scored with the shipped 16x16 digits classifier against the 360",
        "held-out digits: class agreement (fraction classified as the requested class) and Frechet distance (FD)",
        "in its 64-d feature space (lower is better; 360 *real* training digits score FD 3.32 against the held-out",
        "ones, measured: the floor of this metric at this sample size). Mean ± std over training seeds "
        + ", ".join(str(s["seed"]) for s in seeds)
        + " (sample seed = training seed). Machine: the shared 2-core CPU, under load from other jobs.",
        "",
        "| condition | sampling aug level s | class agreement | FD (classifier features) |",
        "|---|---|---|---|",
    ]
    for name, s in keys:
        vals = [r for seed in seeds for r in seed["rows"] if (r["name"], r.get("sample_aug")) == (name, s)]
        lines.append(f"| {name} | {'' if s is None else s} | {_stat([r['class_agreement'] for r in vals])} | "
                     f"{_stat([r['fd'] for r in vals])} |")
    lines += ["", "Training cost per seed (XLA FLOP estimate x steps; wall time on the loaded machine):", "",
              "| seed | base8 | sr16 | sr16 noaug | direct16 (steps) |", "|---|---|---|---|---|"]
    for s in seeds:
        c = s["cost"]
        cell = lambda k: f"{c[k]['gflop_per_step'] * c[k]['steps']:.0f} GFLOP, {c[k]['seconds']:.0f} s"
        lines.append(f"| {s['seed']} | {cell('base8')} | {cell('sr16')} | {cell('sr16_noaug')} | "
                     f"{cell('direct16')} ({c['direct16']['steps']}) |")
    lines += ["", data.get("discussion", "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "cascade_bench"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:     # one result file per seed (seeds may run as parallel processes)
        for seed in seeds:
            result = evaluate_seed(args.workdir, seed)
            with open(os.path.join(args.workdir, f"seed{seed}", "result.json"), "w") as f:
                json.dump(result, f, indent=1)
    done = [os.path.join(args.workdir, f"seed{s}", "result.json") for s in seeds]
    data = {"seeds": [json.load(open(p)) for p in done if os.path.exists(p)]}
    if os.path.exists(RESULTS + ".json"):
        data["discussion"] = json.load(open(RESULTS + ".json")).get("discussion", "")
    with open(RESULTS + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(RESULTS + ".md", "w") as f:
        f.write(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
