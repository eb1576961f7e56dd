"""Draw samples from a trained model with any solver, time grid, NFE and guidance scale.

    python sample.py --workdir runs/digits --num 100 --solver unipc --steps 10 --guidance_scale 2
    python sample.py --workdir runs/digits --grid optimized --steps 8 --labels 3,3,3,7,7,7
    python sample.py --workdir runs/digits --eval digits     # class agreement + Frechet distance (digits classifier)
    python sample.py --diffusers path/to/ddpm-cifar10-32 --num 64 --solver unipc --steps 10 --out out/

Reads the config and parameters (EMA by default) of the newest readable checkpoint in
``<workdir>/checkpoints`` (or ``--step``), or a diffusers UNet folder with its scheduler config (converted
on load; the beta schedule and prediction type come from ``scheduler_config.json``), shards the batch over every available device, and writes
``<out>/samples.png`` (a grid) and ``<out>/samples.npz`` (``images`` float32 (N, H, W, C) in [-1, 1],
``labels`` (N,)), plus ``<out>/eval.json`` with ``--eval``. The same seed gives the same samples on any
number of devices and in any chunking.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from jaxdiff import parallel
from jaxdiff.train_lib import checkpoint as ckpt
from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib.experiment import restore_run
from jaxdiff.train_lib.images import save_grid
from jaxdiff.train_lib.sampling import Sampler


def load_checkpoint(workdir: str, step: int | None = None, mesh=None):
    """``(experiment, state, step)`` from the newest readable (or the given) checkpoint of a diffusion run."""
    return restore_run(workdir, task="diffusion", step=step, mesh=mesh)


def load_diffusers_model(folder: str, mesh=None) -> dict:
    """A diffusers pipeline folder (``unet/`` + ``scheduler/``) or UNet folder (+ ``scheduler_config.json``)
    as the pieces ``Sampler`` needs: apply, params, process, prediction, image shape, classes, mesh."""
    from flax import nnx

    from jaxdiff.convert import load_unet
    from jaxdiff.convert.scheduler import process_from_scheduler_config, read_scheduler_config
    from jaxdiff.convert.diffusers_io import read_config
    from jaxdiff.train_lib.model import make_apply, split_model
    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    process, prediction = process_from_scheduler_config(read_scheduler_config(folder))
    size = read_config(unet_dir).get("sample_size")
    if not isinstance(size, int):
        raise ValueError(f"the UNet config in {unet_dir} has no integer sample_size; cannot size the samples")
    unet = load_unet(unet_dir)
    graphdef, params, rest = split_model(unet)
    c = unet.config
    return dict(apply=make_apply(graphdef, rest), params=nnx.to_pure_dict(params), process=process,
                prediction=prediction, image_shape=(size, size, c.in_channels), num_classes=c.num_classes,
                class_null=c.class_null, mesh=mesh if mesh is not None else parallel.make_mesh(), step=None)


def parse_labels(text: str | None, num: int, num_classes: int | None) -> np.ndarray | None:
    """``"3,3,7"`` -> those labels (repeated to ``num``); None -> ``i % num_classes``; unconditional -> None."""
    if num_classes is None:
        if text:
            raise ValueError("--labels given but the model is unconditional")
        return None
    if not text:
        return np.arange(num) % num_classes
    try:
        labels = np.asarray([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--labels must lie in [0, {num_classes}), got {text!r}")
    return np.resize(labels, num)


def draw_chunks(sampler: Sampler, params, labels, num: int, seed: int, batch: int):
    """Yield ``(start, images (n, H, W, C) float32)`` for ``num`` samples in chunks of ``batch``; any
    chunking gives the same samples (see ``Sampler``)."""
    key = jax.random.key(seed)
    for start in range(0, num, batch):
        n = min(batch, num - start)
        chunk_labels = None if labels is None else labels[start:start + n]
        yield start, sampler(params, chunk_labels, key, num=n, offset=start)


def draw(sampler: Sampler, params, labels, num: int, seed: int, batch: int) -> np.ndarray:
    """``num`` samples ``(num, H, W, C)`` drawn in chunks of ``batch`` (see :func:`draw_chunks`)."""
    return np.concatenate([images for _, images in draw_chunks(sampler, params, labels, num, seed, batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training run folder")
    source.add_argument("--diffusers", help="diffusers pipeline or UNet folder (with a scheduler config)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    parser.add_argument("--out", default=None, help="output folder (default: <workdir or diffusers folder>/"
                                                    "sample_<solver>_<grid>_<steps>)")
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500, help="samples per device call")
    parser.add_argument("--solver", default=None, help="a name of jaxdiff.solvers.SOLVERS (default: the config's)")
    parser.add_argument("--solver_kwargs", default=None, help='JSON, e.g. \'{"order": 3}\'')
    parser.add_argument("--grid", default=None, help="uniform_t | uniform_logsnr | time_quadratic | karras | optimized")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (NFE for multistep solvers)")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--labels", default=None, help="comma-separated class labels, cycled to --num")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the raw parameters instead of the EMA")
    parser.add_argument("--eval", choices=["digits"], default=None,
                        help="score the samples: 'digits' = digits-classifier agreement and Frechet distance")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    parallel.initialize_distributed()
    try:
        if args.workdir:
            exp, state, step = load_checkpoint(args.workdir, args.step)
            model = dict(params=state.params if args.raw else state.ema_params,
                         image_shape=(exp.config.data.image_size,) * 2 + (exp.config.data.channels,),
                         num_classes=exp.config.model.num_classes if exp.conditional else None, step=step)
            cfg = exp.config.sample
        else:
            model = load_diffusers_model(args.diffusers)
            cfg = config_lib.default_config().sample
        solver = args.solver or cfg.solver
        solver_kwargs = json.loads(args.solver_kwargs) if args.solver_kwargs else (
            dict(cfg.solver_kwargs) if args.solver is None else {})
        grid, steps = args.grid or cfg.grid, args.steps or cfg.steps
        if args.num < 1 or args.batch < 1:
            raise ValueError(f"--num and --batch must be positive, got {args.num}, {args.batch}")
        num_classes = model["num_classes"]
        labels = parse_labels(args.labels, args.num, num_classes)
        settings = dict(solver=solver, solver_kwargs=solver_kwargs, grid=grid, steps=steps,
                        guidance_scale=args.guidance_scale)
        if args.workdir:     # the experiment's sampler (latent models decode)
            sampler = exp.sampler(**settings)
        else:
            sampler = Sampler(model["apply"], model["process"], prediction=model["prediction"],
                              image_shape=model["image_shape"], num_classes=num_classes,
                              class_null=model["class_null"], mesh=model["mesh"], **settings)
    except (ValueError, FileNotFoundError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size, ch = model["image_shape"][1:]
    params, step = model["params"], model["step"]
    t0 = time.perf_counter()
    images = draw(sampler, params, labels, args.num, args.seed, args.batch)
    seconds = time.perf_counter() - t0
    out = args.out or os.path.join(args.workdir or args.diffusers, f"sample_{solver}_{grid}_{steps}"
                                   + (f"_cfg{args.guidance_scale:g}" if args.guidance_scale else ""))
    result = {"checkpoint_step": step, "source": args.workdir or args.diffusers, "solver": solver, "solver_kwargs": solver_kwargs, "grid": grid,
              "steps": steps, "guidance_scale": args.guidance_scale, "num": args.num, "seed": args.seed,
              "ema": not args.raw, "seconds": seconds, "devices": jax.device_count()}
    if args.eval == "digits":
        if labels is None or size not in (16, 32) or ch != 1:
            print("error: --eval digits needs a class-conditional 16x16 or 32x32 grey model", file=sys.stderr)
            return 2
        from jaxdiff.extractors import digits_quality
        quality = digits_quality(images, labels)
        result.update({k: v for k, v in quality.items() if isinstance(v, (int, float, str))})
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        nrow = num_classes if num_classes and args.num % num_classes == 0 and args.labels is None else None
        save_grid(images, os.path.join(out, "samples.png"), nrow=nrow, scale=2)
        np.savez(os.path.join(out, "samples.npz"), images=images,
                 labels=labels if labels is not None else np.zeros((0,), np.int32))
        with open(os.path.join(out, "eval.json" if args.eval else "sample.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)
        print(f"wrote {out}/samples.png and samples.npz", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
