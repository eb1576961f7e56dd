"""Score a model's samples: ``jaxdiff-evaluate`` / ``python -m jaxdiff evaluate`` / ``python evaluate.py``.

Score a trained model's samples (FID / KID / precision / recall / IS), or write reference statistics.

    # reference statistics (+ features, for KID and precision/recall) of a dataset split
    jaxdiff-evaluate --write_ref_stats refs/digits16_test.npz --dataset digits/16 --split test --features digits
    jaxdiff-evaluate --write_ref_stats refs/cifar10_train.npz --dataset cifar10 --split train \\
        --features inception --inception_weights ~/weights/pt_inception-2015-12-05-6726825d.pth

    # N samples from a training run's checkpoint (or --diffusers FOLDER), scored against them
    jaxdiff-evaluate --workdir runs/digits --num 10000 --solver unipc --grid uniform_logsnr --steps 10 \\
        --guidance_scale 2 --features digits --ref_stats refs/digits16_test.npz \\
        --ref_features refs/digits16_test_features.npz --clip

    # images already drawn (jaxdiff-sample's samples.npz)
    jaxdiff-evaluate --samples runs/digits/demo/samples.npz --features digits --ref_stats refs/digits16_test.npz

Samples are drawn chunk by chunk (``--batch``; the same samples as ``sample.py`` with the same seed,
solver, grid and steps), quantized to uint8 as a PNG writer would (:func:`jaxdiff.metrics.quantize_uint8`,
torchvision's ``save_image`` convention) and passed through the feature extractor; only the features
``(N, D)`` are kept (streamed into :class:`~jaxdiff.metrics.FeatureStats`), never the N images.

Features (``--features``): ``inception`` = pytorch-fid's FID InceptionV3 (2048-d pool3; needs its weight
file, see ``docs/metrics.md``; grey images are repeated to RGB as pytorch-fid's ``convert("RGB")``);
``digits`` = the project's digits classifier (64-d; 16x16 / 32x32 grey; for small data and CI).

The reference: ``--ref_stats`` (pytorch-fid / clean-fid ``.npz`` with ``mu``, ``sigma``) gives the
Fréchet distance; ``--ref_features`` (``.npz`` with key ``features`` ``(M, D)``, written next to the
statistics by ``--write_ref_stats`` as ``<stem>_features.npz``) adds KID and precision/recall. The
result is printed and written as JSON (``--out``, default ``<workdir>/eval_<features>_<solver>_<grid>_<steps>.json``).
Single host (the features are gathered on process 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from jaxdiff import cli


def _scorer(args, image_shape):
    """Build the extractor and read the reference for images ``(H, W, C)`` (both checked before any sampling);
    returns ``score(chunks, num) -> dict`` (``jaxdiff.evaluation.score_chunks`` with the command line's options)."""
    from jaxdiff import evaluation as ev
    size, _, ch = image_shape
    extractor = ev.build_extractor(args.features, image_size=size, channels=ch,
                                   inception_weights=args.inception_weights)
    reference = ev.load_reference(extractor, args.ref_stats, args.ref_features)

    def score(chunks, num: int) -> dict:
        return ev.score_chunks(chunks, num, extractor, batch=args.batch, reference=reference, clip=args.clip,
                               range_tolerance=args.range_tolerance, kid_subsets=args.kid_subsets,
                               kid_subset_size=args.kid_subset_size, k=args.k, seed=args.seed,
                               progress=not args.quiet)
    return score


def _record(args, num: int, image_shape) -> dict:
    return {"num": num, "image_size": image_shape[0], "channels": image_shape[2], "ref_stats": args.ref_stats,
            "ref_features": args.ref_features}


def evaluate_model(args) -> dict:
    """Sample ``args.num`` images from ``--workdir`` or ``--diffusers`` and score them."""
    import jax

    from jaxdiff.evaluation import EvalError
    from jaxdiff.sampling import Sampler, make_labels, sample_chunks
    if args.num < 2:
        raise EvalError(f"--num must be >= 2, got {args.num}")
    model, mesh = cli.load_model(args)
    score = _scorer(args, model.image_shape)
    settings = cli.sampler_settings(model.defaults, args)
    labels = make_labels(args.labels, args.num, model.num_classes)
    chunks = sample_chunks(Sampler(model, settings, mesh), labels, args.num, args.seed, args.batch)
    return {"checkpoint_step": model.step, "source": model.source, **settings.as_dict(), "seed": args.seed,
            "ema": not args.raw, "devices": jax.device_count(), **_record(args, args.num, model.image_shape),
            **score(chunks, args.num)}


def evaluate_file(args) -> dict:
    """Score the images of a ``samples.npz``."""
    from jaxdiff.evaluation import npz_chunks
    num, shape, chunks = npz_chunks(args.samples, args.batch)
    return {"source": args.samples, **_record(args, num, shape), **_scorer(args, shape)(chunks, num)}


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxdiff-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--features", choices=("inception", "digits"), default="inception",
                   help="feature space: inception (pytorch-fid FID network) or digits (the digits classifier)")
    p.add_argument("--inception_weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $JAXDIFF_INCEPTION_WEIGHTS)")
    p.add_argument("--batch", type=int, default=250, help="images per sampling / feature call")
    p.add_argument("--num", type=int, default=None, help="samples to draw (default 10000); with "
                   "--write_ref_stats: use only the first NUM examples")
    p.add_argument("--out", default=None,
                   help="result JSON (default <workdir>/eval_<features>_<solver>_<grid>_<steps>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("reference statistics of a dataset split")
    g.add_argument("--write_ref_stats", default=None, metavar="OUT.npz",
                   help="write mu/sigma to OUT.npz and the features to OUT_features.npz, then exit")
    g.add_argument("--dataset", default=None, help="TFDS name, e.g. digits/16, cifar10")
    g.add_argument("--split", default=None, help="e.g. test, train")
    g.add_argument("--data_dir", default=None)
    g.add_argument("--image_size", type=int, default=None, help="crop+resize to this size (default: native)")
    g.add_argument("--crop", default="center", choices=("center", "resize"))
    g = p.add_argument_group("scoring a model (sampled here) or a samples.npz")
    source = cli.add_source_arguments(g, required=False)
    source.add_argument("--samples", default=None, help="a samples.npz (images (N, H, W, C) in [-1, 1]) to score")
    g.add_argument("--ref_stats", default=None, help=".npz with mu (D,), sigma (D, D)")
    g.add_argument("--ref_features", default=None, help=".npz with features (M, D) (for KID, precision/recall)")
    cli.add_sampling_arguments(p)
    g.add_argument("--clip", action="store_true", help="clamp samples to [-1, 1] before quantizing (as save_image "
                   "does); without it, values beyond --range_tolerance are an error")
    g.add_argument("--range_tolerance", type=float, default=None,
                   help="how far beyond [-1, 1] a value may lie before quantizing fails (default 1e-2)")
    g.add_argument("--kid_subsets", type=int, default=100)
    g.add_argument("--kid_subset_size", type=int, default=1000)
    g.add_argument("--k", type=int, default=3, help="k-th nearest neighbour for precision/recall")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cli.start()
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    import jax

    from jaxdiff.evaluation import EvalError, write_reference
    if args.batch < 1:
        raise EvalError(f"--batch must be >= 1, got {args.batch}")
    sources = [name for name in ("workdir", "diffusers", "samples") if getattr(args, name)]
    out = args.out
    if args.write_ref_stats:
        if sources:
            raise EvalError(f"--write_ref_stats and --{sources[0]} are separate modes; give one")
        result = write_reference(args.write_ref_stats, dataset=args.dataset, split=args.split,
                                 features=args.features, image_size=args.image_size, batch=args.batch,
                                 data_dir=args.data_dir, crop=args.crop, limit=args.num,
                                 inception_weights=args.inception_weights, progress=not args.quiet)
    elif args.samples:
        result = evaluate_file(args)
        out = out or os.path.splitext(args.samples)[0] + f"_eval_{args.features}.json"
    elif sources:
        args.num = 10000 if args.num is None else args.num
        result = evaluate_model(args)
        out = out or os.path.join(result["source"], f"eval_{args.features}_{result['solver']}_{result['grid']}_"
                                  f"{result['steps']}" + (f"_cfg{result['guidance_scale']:g}"
                                                          if result["guidance_scale"] else "") + ".json")
    else:
        raise EvalError("give --workdir or --diffusers (sample and score), --samples (score a file), or "
                        "--write_ref_stats (reference statistics)")
    for w in result.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    result = _json_safe(result)
    if out is not None and not args.write_ref_stats and jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        result["json"] = out
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
