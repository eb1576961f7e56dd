"""Prompt following of the text-conditioned digits model (configs/text_digits.py) on held-out phrasings, against
the class-conditional digits model (configs/digits.py) -> benchmarks/results/text_digits.md / .json.

    python train.py --config configs/text_digits.py --workdir runs/text_digits          # one per training seed
    python train.py --config configs/digits.py --workdir runs/digits                    # the baseline
    python benchmarks/text_digits.py --text runs/text_digits --baseline runs/digits --seeds 0 1 2

Prompts: every class x {thin, thick} x {slanted left, slanted right} in each of the held-out phrasings
(``captions.HELD_OUT_TEMPLATES``, which no training caption uses; their extra words are unknown to the word
tokenizer). Each sampling seed draws one sample per prompt. Scored on every sample:

* class agreement: the shipped digits classifier's prediction equals the prompt's digit;
* thickness / slant agreement: the measured stroke thickness / slant (``captions.measure_attributes``) lies on the
  prompt's side of the training digits' per-class median (thick vs thin, right vs left; chance 0.5). The
  class-conditional baseline cannot know the attributes: its agreement is the chance level of the measure.
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

THICKNESS_BINS, SLANT_BINS = (0, 2), (0, 2)        # thin / thick, slanted left / slanted right


def prompt_table():
    """``(labels, thickness, slant, template) (P,)`` of the held-out prompts and the prompts themselves."""
    from jaxdiff.data.captioned_digits import held_out_prompts
    from jaxdiff.data.captions import HELD_OUT_TEMPLATES
    rows = [(c, t, s, k) for k in range(len(HELD_OUT_TEMPLATES)) for c in range(10) for t in THICKNESS_BINS
            for s in SLANT_BINS]
    labels, thick, slant, tmpl = (np.asarray(v) for v in zip(*rows))
    prompts = []
    for k in range(len(HELD_OUT_TEMPLATES)):
        sel = tmpl == k
        prompts += held_out_prompts(labels[sel], thick[sel], slant[sel], template=k)
    return labels, thick, slant, tmpl, prompts


def class_medians():
    """Per-class medians ``{"thickness": (10,), "slant": (10,)}`` of the 16x16 training digits."""
    from jaxdiff.data.captions import measure_attributes
    from jaxdiff.data.digits import load_digits_arrays
    images, labels = load_digits_arrays("train", 16)
    a = measure_attributes(images)
    return {k: np.asarray([np.median(a[k][labels == c]) for c in range(10)]) for k in ("thickness", "slant")}


def score(images, labels, thick, slant, medians) -> dict:
    """Agreements of samples ``images (N, 16, 16, 1)`` in [-1, 1] with their prompts."""
    from jaxdiff.data.captions import measure_attributes
    from jaxdiff.extractors import digits_classifier
    from jaxdiff.metrics.features import extract
    _, logits = extract(digits_classifier(16), images, batch_size=200)
    a = measure_attributes(np.clip((np.asarray(images) + 1) / 2, 0, 1))
    want_thick, want_right = thick == 2, slant == 2
    return {"class": float(np.mean(logits.argmax(-1) == labels)),
            "thickness": float(np.mean((a["thickness"] > medians["thickness"][labels]) == want_thick)),
            "slant": float(np.mean((a["slant"] > medians["slant"][labels]) == want_right))}


def sampler_for(workdir, guidance, steps):
    """``(model, Sampler)`` of a run's EMA checkpoint at ``guidance`` (None: unguided)."""
    from jaxdiff.sampling import Sampler, SamplerSettings
    from jaxdiff.train_lib.experiment import load_sampling_model
    model, mesh = load_sampling_model(workdir)
    d = SamplerSettings.resolve(model.defaults, steps=steps)
    settings = SamplerSettings(d.solver, d.solver_kwargs, d.grid, d.steps, guidance)
    return model, Sampler(model, settings, mesh)


def sample_text(model, sampler, prompts, seed):
    from jaxdiff.sampling import sample_images
    negative = model.encode_prompts([""]) if sampler.settings.guidance_scale is not None else None
    return sample_images(sampler, None, len(prompts), seed, 500, context=model.encode_prompts(prompts),
                         negative_context=negative)


def training_phrasing_prompts(labels, thick, slant, template: int = 3) -> list[str]:
    """The same attribute requests in a training phrasing (default ``"{digit}, {thickness}, {slant}"``)."""
    from jaxdiff.data.captions import TRAIN_TEMPLATES, caption
    return [caption(labels[i], thick[i], slant[i], 0, TRAIN_TEMPLATES[template]) for i in range(len(labels))]


def held_out_seen_in_training(run: str, prompts: list[str]) -> dict:
    """How much of the held-out prompts' token sequences the run's training saw: replays the run's caption draws
    (its data iterator and the word noise of every step, as its train step drew them) and returns the share of
    ``prompts`` whose exact token sequence (``<unk>`` for the held-out words) occurred among them."""
    import jax
    from jaxdiff.data.words import SPECIAL
    from jaxdiff.train_lib.experiment import restore_run
    from jaxdiff.train_lib.loop import data_iterator
    from jaxdiff.train_lib.text_diffusion import WORD_NOISE_KEY_TAG
    from jaxdiff.train_lib.word_noise import add_word_noise
    exp, _, step = restore_run(run)
    c, tok = exp.config, exp.tokenizer
    noise = jax.jit(lambda k, t: add_word_noise(
        k, t, drop=c.text.word_dropout, insert=c.text.unknown_words, unk_id=tok.unk_token_id,
        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, first_word_id=len(SPECIAL)))
    base = jax.random.key(c.seed)
    seen = set()
    with data_iterator(c, c.seed, tokenize=exp.tokenize) as it:
        for s in range(int(step)):
            tokens = next(it)["tokens"]
            if c.text.word_dropout > 0 or c.text.unknown_words > 0:
                key = jax.random.fold_in(jax.random.fold_in(base, s), WORD_NOISE_KEY_TAG)
                tokens = np.asarray(noise(key, tokens))
            seen.update(map(tuple, tokens.tolist()))
    wanted = [tuple(r) for r in exp.tokenize(prompts).tolist()]
    return {"steps": int(step), "distinct_training_sequences": len(seen),
            "held_out_seen": float(np.mean([w in seen for w in wanted]))}


def summarize(cells: list[dict]) -> dict:
    out = {}
    for key in ("class", "thickness", "slant"):
        v = np.asarray([c[key] for c in cells])
        out[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
    return out


LABELS = {"text|held_out": "text model, held-out phrasings", "text|training_phrasing": "text model, a training "
          "phrasing (\"{digit}, {thickness}, {slant}\")", "class|labels": "class-conditional baseline"}


def write_markdown(result: dict, path: str) -> None:
    """The report: setup, the table of agreements (mean +- std over sampling seeds, min..max), notes."""
    a = result["args"]
    rows = []
    for key, s in result["summary"].items():
        model, phrasing, guidance = key.split("|")
        label = LABELS[f"{model}|{phrasing}"] + (", no guidance" if guidance == "None" else f", guidance {guidance}")
        cells = [f"{s[k]['mean']:.3f} +- {s[k]['std']:.3f} ({s[k]['min']:.3f}..{s[k]['max']:.3f})"
                 for k in ("class", "thickness", "slant")]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {s['class']['n']} |")
    per_template = {}
    for c in result["cells"]:
        if c["model"] == "text":
            for k, v in c.get("class_per_template", {}).items():
                per_template.setdefault((c["phrasing"], c["guidance"], k), []).append(v)
    tmpl_rows = [f"| {ph} | {gd} | {k} | {np.mean(v):.3f} |" for (ph, gd, k), v in sorted(
        per_template.items(), key=lambda x: (x[0][0], str(x[0][1]), x[0][2]))]
    text = NOTES_HEAD.format(**result, steps=a["steps"], seeds=a["seeds"], runs=", ".join(a["text"]),
                             baseline=a["baseline"])
    text += "| samples | class agreement | thick vs thin agreement | slant left vs right agreement | seeds |\n"
    text += "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
    text += "Class agreement per prompt template (`template` indexes the prompts' phrasing: held-out phrasings "
    text += "`HELD_OUT_TEMPLATES[0]` / `[1]` for `held_out`; for `training_phrasing` both halves use the same training "
    text += "phrasing), mean over sampling seeds:\n\n"
    text += "| phrasing | guidance | template | class agreement |\n|---|---|---|---|\n"
    text += "\n".join(tmpl_rows) + "\n\n"
    per_run = {}
    for c in result["cells"]:
        if c["model"] == "text":
            per_run.setdefault((c["run"], c["phrasing"], str(c["guidance"])), []).append(c)
    if len({r for r, _, _ in per_run}) > 1:
        text += "Per training run (mean over sampling seeds):\n\n| run | phrasing | guidance | class | thickness | slant |\n"
        text += "|---|---|---|---|---|---|\n" + "\n".join(
            f"| {r} | {ph} | {gd} | " + " | ".join(f"{np.mean([c[k] for c in v]):.3f}" for k in ("class", "thickness",
                                                                                                 "slant")) + " |"
            for (r, ph, gd), v in sorted(per_run.items())) + "\n\n"
    for run, v in result.get("held_out_seen", {}).items():
        text += (f"Training captions of {run} (replayed: its data iterator and word noise over {v['steps']} steps): "
                 f"{v['distinct_training_sequences']} distinct token sequences; {v['held_out_seen']:.3f} of the held-out "
                 f"prompts' token sequences (held-out words as `<unk>`) occur among them.\n\n")
    text += result.get("notes", "") + "\n"
    with open(path, "w") as f:
        f.write(text)


NOTES_HEAD = """# Text-conditioned digits: prompt following (issue 14)

**Claim (the issue's target, after LDM's text-to-image model):** a text-conditioned model trained here follows
its prompts: for held-out phrasings the shipped digits classifier agrees with the prompted digit in >= 95% of the
samples with guidance, and the measured thickness and slant agree with the prompt, against the class-conditional
digits model as the baseline.

**Setup.** Text model(s): {runs} (configs/text_digits.py: pixel 16x16, a 2-layer width-64 CLIP-style text
transformer trained jointly with the UNet, word tokenizer, 10% caption dropout; captions: the six fixed training
phrasings and the caption grammar's, 32 per image, with word noise: 10% of words -> `<unk>`, `<unk>` runs
inserted at rate 0.15), EMA parameters of the final checkpoint. Baseline: {baseline} (configs/digits.py, class-conditional, 10% label dropout). {prompts} prompts per
sampling seed: every class x {{thin, thick}} x {{slanted left, slanted right}} in each of the two held-out phrasings
(`captions.HELD_OUT_TEMPLATES`, in no training caption; their words "an", "image", "of", "written", "in", "ink" are
unknown to the tokenizer); the baseline gets the same classes as labels. DPM-Solver++(2M), {steps} steps,
uniform-logSNR grid; sampling seeds {seeds}. Attribute agreement: the measured stroke thickness / slant
(`captions.measure_attributes`) lies on the prompt's side of the 16x16 training digits' per-class median
(chance 0.5). Class agreement: the shipped digits classifier (98.9% held-out accuracy). Measured {date} on
{machine} (other agents' jobs running beside it), {seconds:.0f} s for the whole benchmark.

"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", nargs="+", required=True, help="text-conditioned runs (one per training seed)")
    p.add_argument("--baseline", required=True, help="a class-conditional digits run (configs/digits.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 6.0], help="text guidance scales (the "
                   "training-phrasing check uses the first)")
    p.add_argument("--baseline_guidance", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/text_digits")
    p.add_argument("--from_json", action="store_true", help="only rewrite the .md from the .json (+ its notes)")
    p.add_argument("--seen", action="store_true", help="also replay each text run's training captions and report "
                   "the share of held-out prompts whose token sequence it saw (with --from_json: add it to the .json)")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.out + ".json") as f:
            result = json.load(f)
        if args.seen:
            result["held_out_seen"] = {run: held_out_seen_in_training(run, prompt_table()[-1])
                                       for run in result["args"]["text"]}
            with open(args.out + ".json", "w") as f:
                json.dump(result, f, indent=1)
        write_markdown(result, args.out + ".md")
        return 0
    labels, thick, slant, tmpl, prompts = prompt_table()
    medians = class_medians()
    t0 = time.time()
    cells = []
    train_prompts = training_phrasing_prompts(labels, thick, slant)
    for run in args.text:
        for g in [None] + list(args.guidance):
            model, sampler = sampler_for(run, g, args.steps)
            sets = [("held_out", prompts)] + ([("training_phrasing", train_prompts)] if g == args.guidance[0] else [])
            for phrasing, texts in sets:
                for seed in args.seeds:
                    images = sample_text(model, sampler, texts, seed)
                    s = score(images, labels, thick, slant, medians)
                    per_template = {int(k): score(images[tmpl == k], labels[tmpl == k], thick[tmpl == k],
                                                  slant[tmpl == k], medians)["class"] for k in np.unique(tmpl)}
                    cells.append({"model": "text", "phrasing": phrasing, "run": run, "step": model.step,
                                  "guidance": g, "seed": seed, **s, "class_per_template": per_template})
                    print(json.dumps(cells[-1]), flush=True)
    for g in (None, args.baseline_guidance):
        model, sampler = sampler_for(args.baseline, g, args.steps)
        for seed in args.seeds:
            from jaxdiff.sampling import sample_images
            images = sample_images(sampler, labels.astype(np.int32), len(labels), seed, 500)
            cells.append({"model": "class", "phrasing": "labels", "run": args.baseline, "step": model.step,
                          "guidance": g, "seed": seed, **score(images, labels, thick, slant, medians)})
            print(json.dumps(cells[-1]), flush=True)
    groups = {}
    for c in cells:
        groups.setdefault(f"{c['model']}|{c['phrasing']}|{c['guidance']}", []).append(c)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.0f}",
              "prompts": len(prompts), "templates": sorted(set(int(k) for k in tmpl)), "args": vars(args),
              "seconds": time.time() - t0, "cells": cells, "notes": "",
              "summary": {k: summarize(v) for k, v in groups.items()}}
    if args.seen:
        result["held_out_seen"] = {run: held_out_seen_in_training(run, prompts) for run in args.text}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(result, args.out + ".md")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
