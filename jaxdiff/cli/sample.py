"""Draw samples from a trained model: ``jaxdiff-sample`` / ``python -m jaxdiff sample`` / ``python sample.py``.

    jaxdiff-sample --workdir runs/digits --num 100 --solver unipc --steps 10 --guidance_scale 2
    jaxdiff-sample --workdir runs/digits --grid optimized --steps 8 --labels 3,3,3,7,7,7
    jaxdiff-sample --workdir runs/digits --eval digits     # class agreement + Frechet distance (digits classifier)
    jaxdiff-sample --diffusers path/to/ddpm-cifar10-32 --num 64 --solver unipc --steps 10 --out out/
    jaxdiff-sample --diffusers path/to/stable-diffusion --prompt "a cat" --negative_prompt blurry \
        --num 4 --steps 20 --guidance_scale 7.5            # a text-to-image folder (model_index.json)
    jaxdiff-sample --workdir runs/text_digits --prompt "a thick seven" --num 10 --guidance_scale 3
                                                           # a text-conditioned training run
    jaxdiff-sample --cascade runs/base8,runs/sr16 --stage steps=20 --stage steps=10,aug_level=0.2 --eval digits

The model is a training run's checkpoint (EMA parameters unless ``--raw``; its ``config.sample`` gives the
defaults) or a diffusers folder (converted on load; the scheduler config gives the noise process and
prediction kind), or a cascade (``--cascade``: a base run then super-resolution runs, each stage sampled with
its own ``--stage`` settings, docs/cascade.md). The batch is sharded over every device; the same seed gives the same samples on any
number of devices and in any chunking. Writes ``<out>/samples.png`` (a grid), ``<out>/samples.npz``
(``images`` float32 (N, H, W, C) in [-1, 1], ``labels`` (N,)) and ``<out>/sample.json`` (``eval.json`` with
``--eval``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from jaxdiff import cli

log = logging.getLogger("jaxdiff.sample")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxdiff-sample", description=__doc__.split("\n")[0])
    source = cli.add_source_arguments(parser)
    source.add_argument("--cascade", default=None, help="comma-separated training runs: a base model, then "
                        "super-resolution models (each conditioned on the one before)")
    parser.add_argument("--stage", action="append", default=None,
                        help="--cascade: settings of one stage, in order (repeat per stage), e.g. "
                             "'solver=unipc,steps=10,guidance_scale=2,aug_level=0.2,truncate=1'; unset keys: the "
                             "run's config.sample (the --solver/--steps/... flags do not apply to a cascade)")
    parser.add_argument("--out", default=None, help="output folder (default: <workdir or diffusers folder>/"
                                                    "sample_<solver>_<grid>_<steps>)")
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500, help="samples per device call")
    cli.add_sampling_arguments(parser)
    parser.add_argument("--prompt", action="append", default=None,
                        help="text-to-image folders and text-conditioned runs: a prompt (repeat for several; --num "
                             "images cycle over them)")
    parser.add_argument("--negative_prompt", default=None, help="text-to-image: the negative prompt of guidance")
    parser.add_argument("--eval", choices=["digits"], default=None,
                        help="score the samples: 'digits' = digits-classifier agreement and Frechet distance")
    parser.add_argument("--distrifusion", choices=["sync", "displaced", "naive"], default=None,
                        help="patch-parallel sampling of each image over --patches devices (research.distrifusion)")
    parser.add_argument("--patches", type=int, default=None, help="--distrifusion: row patches (default: all devices)")
    parser.add_argument("--warmup", type=int, default=4, help="--distrifusion displaced: synchronous steps after the first")
    parser.add_argument("--distrifusion_group_norm", default="corrected",
                        choices=["corrected", "stale", "separate", "sync"], help="--distrifusion: GroupNorm after warm-up")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from tqdm import tqdm

    from jaxdiff.sampling import Sampler, make_labels, sample_chunks
    if args.num < 1 or args.batch < 1:
        raise ValueError(f"--num and --batch must be positive, got {args.num}, {args.batch}")
    if args.cascade:
        return run_cascade(args)
    if args.stage:
        raise ValueError("--stage applies to --cascade")
    from jaxdiff.convert.text_to_image import is_text_to_image_folder
    if args.diffusers and is_text_to_image_folder(args.diffusers):
        return run_text_to_image(args)
    if (args.prompt or args.negative_prompt) and not args.workdir:
        raise ValueError("--prompt / --negative_prompt need a diffusers text-to-image folder (with model_index.json "
                         "naming text_encoder, tokenizer, unet, vae, scheduler) or a text-conditioned --workdir run")
    model, mesh = cli.load_model(args)
    if model.encode_prompts is not None and not args.distrifusion:
        return run_text_workdir(args, model, mesh)
    if args.prompt or args.negative_prompt:
        raise ValueError(f"--prompt / --negative_prompt: the run {args.workdir} is not text-conditioned "
                         "(or --distrifusion was given, which text-conditioned runs do not support)")
    if args.distrifusion:       # the devices hold patches of each image, not batch shards
        from jaxdiff.research.distrifusion import DistriConfig, patch_parallel_sampling_model
        model, mesh = patch_parallel_sampling_model(model, DistriConfig(
            args.patches or jax.device_count(), args.distrifusion, args.warmup, args.distrifusion_group_norm)), None
    settings = cli.sampler_settings(model.defaults, args)
    labels = make_labels(args.labels, args.num, model.num_classes)
    size, _, ch = model.image_shape
    if args.eval == "digits" and (labels is None or size not in (16, 32) or ch != 1):
        raise ValueError("--eval digits needs a class-conditional 16x16 or 32x32 grey model")
    sampler = Sampler(model, settings, mesh)
    t0 = time.perf_counter()
    chunks = []
    with tqdm(total=args.num, desc="sample", unit="img", disable=not sys.stderr.isatty()) as bar:
        for _, chunk in sample_chunks(sampler, labels, args.num, args.seed, args.batch):
            chunks.append(chunk)
            bar.update(len(chunk))
    images = np.concatenate(chunks)
    seconds = time.perf_counter() - t0
    s = settings
    out = args.out or os.path.join(model.source, f"sample_{s.solver}_{s.grid}_{s.steps}"
                                   + (f"_cfg{s.guidance_scale:g}" if s.guidance_scale else ""))
    result = {"checkpoint_step": model.step, "source": model.source, **s.as_dict(), "num": args.num,
              "seed": args.seed, "ema": not args.raw, "seconds": seconds, "devices": jax.device_count()}
    if args.distrifusion:
        result.update(distrifusion=args.distrifusion, patches=args.patches or jax.device_count(), warmup=args.warmup,
                      distrifusion_group_norm=args.distrifusion_group_norm)
    if args.eval == "digits":
        from jaxdiff.extractors import digits_quality
        quality = digits_quality(images, labels)
        result.update({k: v for k, v in quality.items() if isinstance(v, (int, float, str))})
    k = model.num_classes
    nrow = k if k and args.num % k == 0 and args.labels is None else None
    write_outputs(out, images, labels, result, nrow=nrow, eval_name="eval.json" if args.eval else "sample.json")
    return 0


STAGE_KEYS = {"solver": str, "grid": str, "steps": int, "guidance_scale": float, "aug_level": float,
              "truncate": lambda v: v.lower() in ("1", "true", "yes")}


def parse_stage(text: str) -> dict:
    """``'steps=10,aug_level=0.2'`` -> ``{"steps": 10, "aug_level": 0.2}`` (keys: ``STAGE_KEYS``)."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in STAGE_KEYS:
            raise ValueError(f"--stage item {item!r} must be KEY=VALUE with KEY one of {sorted(STAGE_KEYS)}")
        try:
            out[key] = STAGE_KEYS[key](value)
        except ValueError:
            raise ValueError(f"--stage {key}={value!r} is not a valid {key}") from None
    return out


def run_cascade(args: argparse.Namespace) -> int:
    """``--cascade base,sr1,...``: sample each stage in turn (``jaxdiff.cascade.sample_cascade``)."""
    import jax
    import numpy as np

    from jaxdiff.cascade import CascadeStage, sample_cascade
    from jaxdiff.sampling import SamplerSettings, make_labels
    from jaxdiff.train_lib.experiment import load_sampling_model
    workdirs = [w for w in args.cascade.split(",") if w]
    options = [parse_stage(t) for t in (args.stage or [])]
    if options and len(options) != len(workdirs):
        raise ValueError(f"give one --stage per cascade stage ({len(workdirs)}), got {len(options)}")
    if args.solver or args.grid or args.steps or args.guidance_scale is not None or args.solver_kwargs:
        raise ValueError("with --cascade give sampling settings per stage with --stage, not --solver/--steps/...")
    options = options or [{} for _ in workdirs]
    stages, mesh = [], None
    for workdir, opt in zip(workdirs, options):
        model, mesh = load_sampling_model(workdir, step=args.step, ema=not args.raw, mesh=mesh)
        settings = SamplerSettings.resolve(model.defaults, solver=opt.get("solver"), grid=opt.get("grid"),
                                           steps=opt.get("steps"), guidance_scale=opt.get("guidance_scale"))
        stages.append(CascadeStage(model, settings, opt.get("aug_level"), opt.get("truncate", False)))
    top = stages[-1].model
    labels = make_labels(args.labels, args.num, top.num_classes)
    size, _, ch = top.image_shape
    if args.eval == "digits" and (labels is None or size not in (16, 32) or ch != 1):
        raise ValueError("--eval digits needs a class-conditional cascade ending at 16x16 or 32x32 grey images")
    t0 = time.perf_counter()
    images = sample_cascade(stages, labels, args.num, args.seed, args.batch, mesh)[-1]
    result = {"cascade": workdirs, "stages": [{**st.resolved_settings.as_dict(), "aug_level": st.level,
                                               "truncate": st.truncate, "checkpoint_step": st.model.step}
                                              for st in stages],
              "num": args.num, "seed": args.seed, "ema": not args.raw, "seconds": time.perf_counter() - t0,
              "devices": jax.device_count()}
    if args.eval == "digits":
        from jaxdiff.extractors import digits_quality
        quality = digits_quality(images, labels)
        result.update({k: v for k, v in quality.items() if isinstance(v, (int, float, str))})
    k = top.num_classes
    nrow = k if k and args.num % k == 0 and args.labels is None else None
    out = args.out or os.path.join(workdirs[-1], "sample_cascade")
    write_outputs(out, images, labels if labels is not None else np.zeros((0,), np.int32), result, nrow=nrow,
                  eval_name="eval.json" if args.eval else "sample.json")
    return 0


def run_text_to_image(args: argparse.Namespace) -> int:
    """``--diffusers`` names a text-to-image folder: ``--num`` images for the ``--prompt``s (cycled)."""
    import math

    import jax
    import numpy as np

    from jaxdiff import parallel
    from jaxdiff.convert.text_to_image import load_text_to_image
    if not args.prompt:
        raise ValueError(f"{args.diffusers} is a text-to-image folder: give --prompt")
    if args.distrifusion:
        raise ValueError("--distrifusion applies to --workdir runs and diffusers UNet folders, not text-to-image folders")
    if args.labels or args.eval or args.step is not None or args.raw:
        raise ValueError("--labels, --eval, --step and --raw do not apply to a text-to-image folder")
    pipe = load_text_to_image(args.diffusers)
    defaults = {"solver": "dpm_solver++", "grid": "uniform_logsnr", "steps": 20, "guidance_scale": 7.5}
    settings = cli.sampler_settings(defaults, args)
    per_prompt = math.ceil(args.num / len(args.prompt))
    t0 = time.perf_counter()
    images = pipe(args.prompt, args.negative_prompt, solver=settings.solver, solver_kwargs=settings.solver_kwargs,
                  grid=settings.grid, steps=settings.steps, guidance_scale=settings.guidance_scale, seed=args.seed,
                  num_images_per_prompt=per_prompt, mesh=parallel.make_mesh())[:args.num]
    s = settings
    out = args.out or os.path.join(args.diffusers, f"sample_{s.solver}_{s.grid}_{s.steps}"
                                   + (f"_cfg{s.guidance_scale:g}" if s.guidance_scale else ""))
    result = {"source": args.diffusers, "prompt": args.prompt, "negative_prompt": args.negative_prompt,
              **s.as_dict(), "num": int(len(images)), "seed": args.seed, "seconds": time.perf_counter() - t0,
              "devices": jax.device_count()}
    prompt_index = np.repeat(np.arange(len(args.prompt)), per_prompt)[:args.num].astype(np.int32)
    write_outputs(out, np.asarray(images) * 2.0 - 1.0, prompt_index, result, nrow=per_prompt,
                  eval_name="sample.json")
    return 0


def run_text_workdir(args: argparse.Namespace, model, mesh) -> int:
    """A text-conditioned training run: ``--num`` images for the ``--prompt``s (cycled), guided towards them and
    away from ``--negative_prompt`` (default the empty caption) when ``--guidance_scale`` is set."""
    import jax
    import numpy as np

    from jaxdiff.sampling import Sampler, sample_images
    if not args.prompt:
        raise ValueError(f"{args.workdir} is a text-conditioned run: give --prompt")
    if args.labels or args.eval:
        raise ValueError("--labels and --eval do not apply to a text-conditioned run (see benchmarks/text_digits.py)")
    settings = cli.sampler_settings(model.defaults, args)
    if args.negative_prompt is not None and settings.guidance_scale is None:
        raise ValueError("--negative_prompt is the unconditional branch of guidance: give --guidance_scale")
    prompt_index = (np.arange(args.num) % len(args.prompt)).astype(np.int32)
    context = model.encode_prompts([args.prompt[i] for i in prompt_index])
    negative = None if settings.guidance_scale is None else model.encode_prompts([args.negative_prompt or ""])
    t0 = time.perf_counter()
    images = sample_images(Sampler(model, settings, mesh), None, args.num, args.seed, args.batch, context=context,
                           negative_context=negative)
    s = settings
    out = args.out or os.path.join(model.source, f"sample_{s.solver}_{s.grid}_{s.steps}"
                                   + (f"_cfg{s.guidance_scale:g}" if s.guidance_scale else ""))
    result = {"checkpoint_step": model.step, "source": model.source, "prompt": args.prompt,
              "negative_prompt": args.negative_prompt, **s.as_dict(), "num": args.num, "seed": args.seed,
              "ema": not args.raw, "seconds": time.perf_counter() - t0, "devices": jax.device_count()}
    nrow = len(args.prompt) if args.num % len(args.prompt) == 0 and len(args.prompt) > 1 else None
    write_outputs(out, images, prompt_index, result, nrow=nrow, eval_name="sample.json")
    return 0


def write_outputs(out: str, images, labels, result: dict, *, nrow: int | None, eval_name: str) -> None:
    """``samples.png`` (a grid), ``samples.npz`` (``images`` (N, H, W, C) in [-1, 1], ``labels``) and the
    JSON record, from process 0."""
    import jax
    import numpy as np

    from jaxdiff.train_lib.images import save_grid
    if jax.process_index() != 0:
        return
    os.makedirs(out, exist_ok=True)
    save_grid(images, os.path.join(out, "samples.png"), nrow=nrow, scale=2)
    np.savez(os.path.join(out, "samples.npz"), images=images,
             labels=labels if labels is not None else np.zeros((0,), np.int32))
    with open(os.path.join(out, eval_name), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
    log.info("wrote %s/samples.png and samples.npz", out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.start()
    return cli.run(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
