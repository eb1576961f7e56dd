"""DreamBooth-style LoRA + new token on the text-conditioned digits model (configs/lora_text_digits.py): does the
new token learn the concept, and does prior preservation keep the class prompt where the base had it?
-> benchmarks/results/lora_text_digits.md / .json.

    python train.py --config configs/lora_text_digits.py --workdir runs/lora_prior_s0 --config.lora.base=runs/text_digits
    python train.py --config configs/lora_text_digits.py --workdir runs/lora_noprior_s0 \\
        --config.lora.base=runs/text_digits --config.lora.class_prompt=None --config.lora.num_class_images=0
    python benchmarks/lora_text_digits.py --runs runs/lora_prior_s0 runs/lora_noprior_s0 --seeds 0 1 2

The concept (the config): "<v1>" = thick sevens slanted left, 8 training examples, instance prompt
"a <v1> seven"; the class prompt of prior preservation "a regular seven". For each run and sampling seed,
``--num`` samples of each prompt are scored:

* class: the shipped digits classifier says 7;
* thickness / slant: the measured stroke thickness / slant (``captions.measure_attributes``) lies on the concept's
  side of the 16x16 training sevens' median (thick: above; slanted left: below); concept: both.

"before" is the same run's network at its start (adapters zero, i.e. exactly the frozen base, and the new token's
random first row); "after" its final EMA parameters. Concept fidelity: the concept rate of "a <v1> seven" after vs
before. Prior drift: the concept rate (and class) of "a regular seven" after vs before; DreamBooth's claim is that
prior preservation keeps it near the base's while fine-tuning without it lets the class prompt drift towards the
instances.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DIGIT = 7


def concept_bins(config) -> dict:
    """``{"thickness": 0 | 2, "slant": 0 | 2}``: the concept's attribute bins (from ``lora.instance_filter``)."""
    from jaxdiff.train_lib.lora_data import parse_filter
    where = parse_filter(config.lora.instance_filter)
    bins = {k: where.get(k) for k in ("thickness", "slant")}
    if where.get("label") != DIGIT or any(v not in (0, 2) for v in bins.values()):
        raise ValueError(f"this benchmark scores sevens with an extreme thickness and slant bin, got {where}")
    return bins


def score(images: np.ndarray, medians: dict, bins: dict) -> dict:
    """Rates over samples ``images (N, 16, 16, 1)`` in [-1, 1]: class 7; thickness / slant on the concept's side
    of the training sevens' median (bin 2: above, bin 0: below); concept: both."""
    from jaxdiff.data.captions import measure_attributes
    from jaxdiff.extractors import digits_classifier
    from jaxdiff.metrics.features import extract
    _, logits = extract(digits_classifier(16), images, batch_size=200)
    a = measure_attributes(np.clip((np.asarray(images) + 1) / 2, 0, 1))
    side = {k: (a[k] > medians[k][DIGIT]) == (bins[k] == 2) for k in ("thickness", "slant")}
    return {"class": float(np.mean(logits.argmax(-1) == DIGIT)), "thickness": float(np.mean(side["thickness"])),
            "slant": float(np.mean(side["slant"])),
            "concept": float(np.mean(side["thickness"] & side["slant"]))}


def instance_images(config) -> np.ndarray:
    """The run's instance images ``(n, 16, 16, 1)`` in [-1, 1] (its data filter, first ``num_instance_images``)."""
    from jaxdiff.data import pipeline, transforms
    from jaxdiff.train_lib.lora_data import instance_indices
    source = pipeline.open_source(config.data.name, config.data.split, config.data.data_dir)
    idx = instance_indices(source, tuple(config.lora.instance_filter), config.lora.num_instance_images)
    return transforms.to_unit_range(np.stack([source[i]["image"] for i in idx]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=[], help="task='lora' workdirs of configs/lora_text_digits.py")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--num", type=int, default=100, help="samples per prompt, run and seed")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--class_prompt", default="a regular seven", help="the prompt whose drift is measured")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--from_json", default=None, help="only rewrite the .md of this result .json")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "lora_text_digits"))
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            write_markdown(json.load(f), args.from_json[:-len(".json")] + ".md")
        return 0
    if not args.runs:
        p.error("give --runs (or --from_json)")
    from text_digits import class_medians

    from jaxdiff.sampling import Sampler, SamplerSettings, sample_images
    from jaxdiff.train_lib.experiment import restore_run
    t0 = time.time()
    medians = class_medians()
    cells, runs = [], []
    for workdir in args.runs:
        exp, state, step = restore_run(workdir, task="lora")
        c = exp.config
        prompts = {"instance": c.lora.instance_prompt, "class": args.class_prompt}
        run = {"workdir": workdir, "step": int(step), "seed": int(c.seed), "prior": bool(c.lora.class_prompt),
               "prior_loss_weight": float(c.lora.prior_loss_weight), "prompts": prompts,
               "bins": concept_bins(c)}
        run["instances"] = score(instance_images(c), medians, run["bins"])
        if run["prior"]:
            with np.load(os.path.join(workdir, "class_images", "images.npz")) as f:
                run["class_images"] = score(f["images"], medians, run["bins"])
        runs.append(run)
        d = SamplerSettings.resolve(c.sample, steps=args.steps)
        settings = SamplerSettings(d.solver, d.solver_kwargs, d.grid, d.steps, args.guidance)
        for when, params in (("before", exp.init_params), ("after", state.ema_params)):
            model = exp.sampling_model(params)
            sampler = Sampler(model, settings, exp.mesh)
            negative = model.encode_prompts([""])
            for which, prompt in prompts.items():
                context = model.encode_prompts([prompt] * args.num)
                for seed in args.seeds:
                    images = sample_images(sampler, None, args.num, seed, 500, context=context,
                                           negative_context=negative)
                    cells.append({"workdir": workdir, "prior": run["prior"], "train_seed": run["seed"],
                                  "when": when, "prompt": which, "seed": seed,
                                  **score(images, medians, run["bins"])})
                    print(json.dumps(cells[-1]), flush=True)
    summary = {}
    for prior in sorted({c["prior"] for c in cells}, reverse=True):
        for when in ("before", "after"):
            for which in ("instance", "class"):
                sel = [c for c in cells if c["prior"] == prior and c["when"] == when and c["prompt"] == which]
                summary[f"{'prior' if prior else 'no_prior'}|{when}|{which}"] = {
                    k: {"mean": float(np.mean([c[k] for c in sel])),
                        "std": float(np.std([c[k] for c in sel], ddof=1)) if len(sel) > 1 else 0.0,
                        "n": len(sel)} for k in ("class", "thickness", "slant", "concept")}
    result = {"args": vars(args), "runs": runs, "cells": cells, "summary": summary,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.0f}",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, args.out + ".md")
    print(open(args.out + ".md").read())
    return 0


CLAIM = ("**Claim (DreamBooth, Ruiz et al. 2023, with a new token as in textual inversion):** fine-tuning a "
         "text-to-image model on a few images of a subject captioned \"a [V] [class noun]\" binds the subject to the "
         "rare token [V]; fine-tuning alone also drifts the class noun towards the subject (language drift), and the "
         "class-specific prior-preservation loss on the base's own samples of \"a [class noun]\" keeps the class "
         "prompt where the base had it, at no cost to subject fidelity. Reproduced here as a mechanism at 16x16, not "
         "the paper's numbers.")


def _verdict(summary: dict) -> list[str]:
    """Sentences comparing the arms, computed from the table (means and spreads over the cells)."""
    get = lambda k, m="concept": summary.get(k, {}).get(m)  # noqa: E731
    out = []
    if get("prior|after|class") and get("no_prior|after|class"):
        p, q = get("prior|after|class"), get("no_prior|after|class")
        b = get("prior|before|class")
        spread = max(p["std"], q["std"])
        held = q["mean"] - p["mean"] > 2 * spread
        out.append(f"Language drift: the class prompt's concept rate goes from {b['mean']:.3f} (base) to "
                   f"{q['mean']:.3f} +- {q['std']:.3f} without prior preservation and {p['mean']:.3f} +- "
                   f"{p['std']:.3f} with it: the claim {'held' if held else 'did NOT hold'} (difference "
                   f"{q['mean'] - p['mean']:.3f}, largest spread {spread:.3f}).")
        pi, qi, bi = get("prior|after|instance"), get("no_prior|after|instance"), get("prior|before|instance")
        out.append(f"Subject fidelity: the instance prompt's concept rate goes from {bi['mean']:.3f} (the new token's "
                   f"random start) to {qi['mean']:.3f} +- {qi['std']:.3f} without and {pi['mean']:.3f} +- "
                   f"{pi['std']:.3f} with prior preservation.")
        pt, bt = get("prior|after|class", "thickness"), get("prior|before|class", "thickness")
        out.append(f"Not held exactly at the base: with prior preservation the class prompt's share of samples on "
                   f"the thick side goes from {bt['mean']:.3f} (base) to {pt['mean']:.3f} +- {pt['std']:.3f}, so the "
                   "class prompt is pushed away from the concept (thinner) rather than kept at the base's "
                   "distribution (the class images themselves are the base's, see the table above). Possible reason, "
                   "not tested here: the two prompts differ by one word and share the adapters, so the fine-tuning "
                   "separates them along the concept's attributes; 100 fixed class images may also be fitted "
                   "rather than the base's distribution.")
    return out


def write_markdown(result: dict, path: str) -> None:
    """The claim, the setup, the table of rates (mean +- std over training runs x sampling seeds), the verdict."""
    a = result["args"]
    lines = ["# LoRA + new token + prior preservation on the text digits model (issue 15)", "", CLAIM, "",
             "**Setup.** Base: the text-conditioned digits model (configs/text_digits.py, 16x16 pixels, a 2-layer "
             "CLIP-style text encoder trained with it, word tokenizer). Fine-tuning: configs/lora_text_digits.py "
             "(rank-4 adapters on every attention layer, a new token \"<v1>\" with a random first row, 300 steps at "
             "batch 16 + 16, lr 2e-3), the concept = the first 8 thick, left-slanted sevens of captioned_digits/16 "
             "(instance prompt \"a <v1> seven\"), prior preservation: 100 base samples of \"a regular seven\", "
             "weight 1.0, against the same runs without it. Generated by benchmarks/lora_text_digits.py (the .json "
             "holds every cell).", "",
             f"Runs: {', '.join(r['workdir'] + (' (prior)' if r['prior'] else ' (no prior)') for r in result['runs'])}; "
             f"{a['num']} samples per prompt and sampling seed {a['seeds']}, guidance {a['guidance']}, {a['steps']} "
             f"DPM-Solver++ steps. Measured {result['date']} on {result['machine']}, {result['seconds']:.0f} s.", "",
             "Rates: class 7 (the shipped digits classifier); thickness / slant on the concept's side of the 16x16 "
             "training sevens' median (thick: above, slanted left: below); concept: both. \"before\": the run's "
             "network at its start (adapters zero = the frozen base; the new token's random row). Mean +- std over "
             "training seeds x sampling seeds.", "",
             "| run | prompt | when | class 7 | thickness as concept | slant as concept | concept | cells |",
             "|---|---|---|---|---|---|---|---|"]
    for key, s in result["summary"].items():
        prior, when, which = key.split("|")
        prompt = result["runs"][0]["prompts"][which]
        f = lambda k: f"{s[k]['mean']:.3f} +- {s[k]['std']:.3f}"  # noqa: E731
        lines.append(f"| {prior.replace('_', ' ')} | \"{prompt}\" | {when} | {f('class')} | {f('thickness')} | "
                     f"{f('slant')} | {f('concept')} | {s['class']['n']} |")
    lines += ["", "Instance images (the 8 training examples) and the class images, same measures:", "",
              "| run | images | class 7 | thickness | slant | concept |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for name in ("instances", "class_images"):
            if name in r:
                s = r[name]
                lines.append(f"| {r['workdir']} | {name} | {s['class']:.3f} | {s['thickness']:.3f} | {s['slant']:.3f} | "
                             f"{s['concept']:.3f} |")
    lines += ["", "**Result.**"]
    for sentence in _verdict(result["summary"]):
        lines += ["", sentence]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
