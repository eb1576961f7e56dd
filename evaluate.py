"""Score a trained model's samples (FID / KID / precision / recall / IS), or write reference statistics.

    # reference statistics (+ features, for KID and precision/recall) of a dataset split
    python evaluate.py --write_ref_stats refs/digits16_test.npz --dataset digits/16 --split test --features digits
    python evaluate.py --write_ref_stats refs/cifar10_train.npz --dataset cifar10 --split train \\
        --features inception --inception_weights ~/weights/pt_inception-2015-12-05-6726825d.pth

    # N samples from a training run's checkpoint, scored against them
    python evaluate.py --workdir runs/digits --num 10000 --solver unipc --grid uniform_logsnr --steps 10 \\
        --guidance_scale 2 --features digits --ref_stats refs/digits16_test.npz \\
        --ref_features refs/digits16_test_features.npz --clip

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
import time
import warnings

import jax
import numpy as np

from jaxdiff.metrics.features import FeatureExtractor, extract, metrics_from_features
from jaxdiff.metrics.quantize import CONVENTION, DEFAULT_ATOL, quantize_uint8
from jaxdiff.metrics.stats import FeatureStats, load_stats, save_stats

FEATURES = ("inception", "digits")


class EvalError(ValueError):
    """A user-facing problem with the inputs (printed as ``error: ...``, exit status 2)."""


# --- extractors ----------------------------------------------------------------------------------

def build_extractor(kind: str, *, image_size: int, channels: int, inception_weights=None) -> FeatureExtractor:
    """The feature extractor ``kind`` ("inception" | "digits") for images ``(B, image_size, image_size, channels)``."""
    if kind == "digits":
        from jaxdiff.extractors import DIGITS_RESOLUTIONS as RESOLUTIONS, digits_classifier
        if image_size not in RESOLUTIONS or channels != 1:
            sizes = " or ".join(map(str, RESOLUTIONS))
            raise EvalError(f"--features digits needs grey (1-channel) images of size {sizes}, "
                            f"got {image_size}x{image_size}x{channels}; use --features inception")
        return digits_classifier(image_size)
    if kind == "inception":
        from jaxdiff.extractors import inception_extractor
        if channels not in (1, 3):
            raise EvalError(f"--features inception needs 1-channel (grey, repeated to RGB) or 3-channel images, "
                            f"got {channels} channels")
        return inception_extractor(inception_weights, image_size=image_size, channels=channels)
    raise EvalError(f"--features must be one of {FEATURES}, got {kind!r}")


def feature_batch_and_sharding(batch: int):
    """``(feature batch size, sharding or None)``: ``batch`` rounded up to a multiple of the device count,
    split over all devices along the batch when there is more than one."""
    n = jax.device_count()
    if n == 1:
        return batch, None
    from jaxdiff.metrics.inception import inception_sharding
    fb = -(-batch // n) * n
    return fb, inception_sharding(fb)


def feature_dim(extractor: FeatureExtractor) -> int:
    """The extractor's feature dimension D, from an abstract evaluation (no computation)."""
    x = jax.ShapeDtypeStruct((1, extractor.input_size, extractor.input_size, extractor.channels), np.float32)
    return int(jax.eval_shape(extractor.fn, x)[0].shape[-1])


class FeatureAccumulator:
    """Features of batches of images, streamed: ``FeatureStats`` plus the ``(N, D)`` features and logits.

    ``add(images)``: ``(B, H, W, C)`` uint8 (or float in [-1, 1]); the images are not kept.
    """

    def __init__(self, extractor: FeatureExtractor, batch_size: int, sharding=None):
        self.extractor, self.batch_size, self.sharding = extractor, batch_size, sharding
        self.stats = FeatureStats()
        self._features: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    def add(self, images) -> None:
        f, lg = extract(self.extractor, images, self.batch_size, self.sharding)
        self.stats.update(f)
        self._features.append(np.asarray(f, np.float32))
        if lg is not None:
            self._logits.append(np.asarray(lg, np.float32))

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self._features)

    @property
    def logits(self) -> np.ndarray | None:
        return np.concatenate(self._logits) if self._logits else None


# --- reference -----------------------------------------------------------------------------------

def features_path_for(stats_path: str) -> str:
    """``refs/x.npz`` -> ``refs/x_features.npz`` (where ``--write_ref_stats`` puts the features)."""
    stem = stats_path[:-4] if stats_path.endswith(".npz") else stats_path
    return stem + "_features.npz"


def load_reference_features(path: str, extractor: FeatureExtractor) -> np.ndarray:
    """``(M, D)`` float32 features from an ``.npz`` with key ``features``; checks D and the feature space."""
    if not os.path.isfile(path):
        raise EvalError(f"--ref_features {path!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "features" not in z.files:
            raise EvalError(f"{path}: missing key 'features' (found {sorted(z.files)}); expected (M, D) features")
        feats = np.asarray(z["features"], np.float32)
        space = str(z["feature_space"]) if "feature_space" in z.files else None
    if space is not None and space != extractor.name:
        raise EvalError(f"{path}: features are in the space {space!r}, but --features gives {extractor.name!r}")
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise EvalError(f"{path}: 'features' must be (M, D) with M >= 2, got shape {feats.shape}")
    if not np.all(np.isfinite(feats)):
        raise EvalError(f"{path}: 'features' contain non-finite values")
    return feats


def dataset_batches(dataset: str, split: str, image_size: int | None, batch: int, data_dir=None, crop="center",
                    limit: int | None = None):
    """``(num_examples, iterator of uint8 (b, s, s, C) batches)`` over a TFDS split, in order, every example once.

    Opens the split with :func:`jaxdiff.data.pipeline.open_source` and applies the training pipeline's
    deterministic transform (``crop`` + bicubic resize to ``image_size``; no flip, no shuffle), but keeps
    uint8 (as the PNG files pytorch-fid reads) and keeps the last partial batch (``make_iterator`` drops it).
    ``image_size=None``: the native size (images must then be square).
    """
    from jaxdiff.data import transforms
    from jaxdiff.data.pipeline import open_source
    source = open_source(dataset, split, data_dir)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise EvalError(f"dataset {dataset!r} split {split!r} is empty")
    first = transforms.check_image(source[0]["image"], "image")
    if image_size is None:
        if first.shape[0] != first.shape[1]:
            raise EvalError(f"{dataset} images are {first.shape[0]}x{first.shape[1]}: give --image_size to crop")
        image_size = first.shape[0]

    def gen():
        for s in range(0, n, batch):
            imgs = [transforms.crop_and_resize(transforms.check_image(source[i]["image"], "image"), image_size, crop)
                    for i in range(s, min(s + batch, n))]
            yield np.stack(imgs)

    return n, image_size, first.shape[-1], gen()


def write_reference(args) -> dict:
    """``--write_ref_stats``: statistics (and features) of a dataset split -> files; returns a summary."""
    from tqdm import tqdm
    if not args.dataset or not args.split:
        raise EvalError("--write_ref_stats needs --dataset and --split")
    try:
        n, size, ch, batches = dataset_batches(args.dataset, args.split, args.image_size, args.batch,
                                               args.data_dir, args.crop, args.num)
    except ValueError as e:
        raise EvalError(str(e)) from e
    extractor = build_extractor(args.features, image_size=size, channels=ch,
                                inception_weights=args.inception_weights)
    fb, sharding = feature_batch_and_sharding(args.batch)
    acc = FeatureAccumulator(extractor, fb, sharding)
    t0 = time.perf_counter()
    with tqdm(total=n, desc=f"features {args.dataset}:{args.split}", unit="img", disable=args.quiet) as bar:
        for b in batches:
            acc.add(b)
            bar.update(len(b))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mu, sigma = acc.stats.mu_sigma()
    out = args.write_ref_stats
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_stats(out, mu, sigma)
    fpath = features_path_for(out)
    np.savez(fpath, features=acc.features, feature_space=np.asarray(extractor.name),
             dataset=np.asarray(args.dataset), split=np.asarray(args.split))
    return {"ref_stats": out, "ref_features": fpath, "dataset": args.dataset, "split": args.split,
            "num": n, "image_size": size, "channels": ch, "feature_space": extractor.name,
            "feature_dim": int(mu.shape[0]), "seconds": time.perf_counter() - t0,
            "warnings": [str(w.message) for w in caught]}


# --- scoring -------------------------------------------------------------------------------------

def score(fake: FeatureAccumulator, feature_space: str, ref_stats=None, ref_features=None, *, kid_subsets=100,
          kid_subset_size=1000, k=3, is_splits=10, seed=0) -> dict:
    """Metrics of the accumulated fake features against ``ref_stats`` ``(mu (D,), sigma (D, D))`` and/or
    ``ref_features`` ``(M, D)``.

    The Fréchet distance compares the streamed fake statistics with ``ref_stats`` when given (else with
    the statistics of ``ref_features``); KID (``kid_mean``, ``kid_std``) and ``precision`` / ``recall``
    need ``ref_features``; ``classifier_score_mean`` / ``_std`` (the IS formula) need logits. Inception
    feature spaces add the aliases ``fid``, ``kid``, ``inception_score``. Warnings (e.g. fewer samples
    than feature dimensions: singular covariance) are collected, deduplicated, under ``"warnings"``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = metrics_from_features(ref_features, fake.features, fake.logits, feature_space=feature_space,
                                        real_stats=ref_stats, fake_stats=fake.stats, kid_subsets=kid_subsets,
                                        kid_subset_size=kid_subset_size, k=k, is_splits=is_splits, seed=seed)
        except ValueError as e:
            raise EvalError(f"{e}: wrong --ref_stats / --ref_features for --features?") from None
    msgs: list[str] = []
    for w in caught:
        if str(w.message) not in msgs:
            msgs.append(str(w.message))
    out["warnings"] = msgs
    return out


def evaluate_run(args) -> dict:
    """Sample ``args.num`` images from ``args.workdir`` and score them; returns the result dict."""
    from tqdm import tqdm
    from sample import draw_chunks, load_checkpoint, parse_labels
    from jaxdiff.train_lib import checkpoint as ckpt

    if args.ref_stats is None and args.ref_features is None:
        raise EvalError("give the reference: --ref_stats stats.npz (mu, sigma) and/or --ref_features features.npz "
                        "(write them with --write_ref_stats)")
    if args.num < 2 or args.batch < 1:
        raise EvalError(f"--num must be >= 2 and --batch >= 1, got {args.num}, {args.batch}")
    try:
        exp, state, step = load_checkpoint(args.workdir, args.step)
    except (FileNotFoundError, ckpt.CheckpointError) as e:
        raise EvalError(str(e)) from e
    size, ch = exp.config.data.image_size, exp.config.data.channels
    extractor = build_extractor(args.features, image_size=size, channels=ch, inception_weights=args.inception_weights)
    # the reference is checked before any sampling
    dim = feature_dim(extractor)
    ref_features = load_reference_features(args.ref_features, extractor) if args.ref_features else None
    if ref_features is not None and ref_features.shape[1] != dim:
        raise EvalError(f"{args.ref_features}: features have dim {ref_features.shape[1]}, {extractor.name} "
                        f"gives {dim}: wrong --ref_features for --features {args.features}?")
    ref_stats = None
    if args.ref_stats is not None:
        if not os.path.isfile(args.ref_stats):
            raise EvalError(f"--ref_stats {args.ref_stats!r} does not exist (write it with --write_ref_stats)")
        try:
            ref_stats = load_stats(args.ref_stats, dim)
        except ValueError as e:
            raise EvalError(f"{e} (--ref_stats for --features {args.features})") from e
    cfg = exp.config.sample
    solver = args.solver or cfg.solver
    solver_kwargs = json.loads(args.solver_kwargs) if args.solver_kwargs else (
        dict(cfg.solver_kwargs) if args.solver is None else {})
    grid, steps = args.grid or cfg.grid, args.steps or cfg.steps
    num_classes = exp.config.model.num_classes if exp.conditional else None
    labels = parse_labels(args.labels, args.num, num_classes)
    sampler = exp.sampler(solver=solver, solver_kwargs=solver_kwargs, grid=grid, steps=steps,
                          guidance_scale=args.guidance_scale)      # latent models decode
    params = state.params if args.raw else state.ema_params
    fb, sharding = feature_batch_and_sharding(args.batch)
    acc = FeatureAccumulator(extractor, fb, sharding)
    t_sample = t_feat = 0.0
    clipped = 0
    with tqdm(total=args.num, desc=f"sample+{extractor.name}", unit="img", disable=args.quiet) as bar:
        t = time.perf_counter()
        for start, images in draw_chunks(sampler, params, labels, args.num, args.seed, args.batch):
            t_sample += time.perf_counter() - t
            t = time.perf_counter()
            try:
                u8 = quantize_uint8(images, clip=args.clip, atol=args.range_tolerance)
            except ValueError as e:
                raise EvalError(f"samples {start}..{start + len(images) - 1}: {e}") from e
            clipped += int(np.sum(np.abs(images) > 1.0))
            acc.add(u8)
            t_feat += time.perf_counter() - t
            bar.update(len(images))
            t = time.perf_counter()
    metrics = score(acc, extractor.name, ref_stats, ref_features, kid_subsets=args.kid_subsets,
                    kid_subset_size=args.kid_subset_size, k=args.k, seed=args.seed)
    for w in metrics["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return {"checkpoint_step": step, "workdir": args.workdir, "solver": solver, "solver_kwargs": solver_kwargs,
            "grid": grid, "steps": steps, "guidance_scale": args.guidance_scale, "num": args.num, "seed": args.seed,
            "ema": not args.raw, "image_size": size, "channels": ch, "ref_stats": args.ref_stats,
            "ref_features": args.ref_features, "quantization": CONVENTION, "clip": args.clip,
            "clipped_fraction": clipped / float(args.num * size * size * ch), "devices": jax.device_count(),
            "seconds_sampling": t_sample, "seconds_features": t_feat, **metrics}


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", choices=FEATURES, default="inception",
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
    g = p.add_argument_group("scoring a training run")
    g.add_argument("--workdir", default=None, help="training run folder")
    g.add_argument("--step", type=int, default=None)
    g.add_argument("--ref_stats", default=None, help=".npz with mu (D,), sigma (D, D)")
    g.add_argument("--ref_features", default=None, help=".npz with features (M, D) (for KID, precision/recall)")
    g.add_argument("--solver", default=None)
    g.add_argument("--solver_kwargs", default=None, help='JSON, e.g. \'{"order": 3}\'')
    g.add_argument("--grid", default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--guidance_scale", type=float, default=None)
    g.add_argument("--labels", default=None, help="comma-separated class labels, cycled to --num "
                   "(default: 0, 1, 2, ... cycled)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="raw parameters instead of the EMA")
    g.add_argument("--clip", action="store_true", help="clamp samples to [-1, 1] before quantizing (as save_image "
                   "does); without it, values beyond --range_tolerance are an error")
    g.add_argument("--range_tolerance", type=float, default=DEFAULT_ATOL)
    g.add_argument("--kid_subsets", type=int, default=100)
    g.add_argument("--kid_subset_size", type=int, default=1000)
    g.add_argument("--k", type=int, default=3, help="k-th nearest neighbour for precision/recall")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    try:
        if args.batch < 1:
            raise EvalError(f"--batch must be >= 1, got {args.batch}")
        if args.write_ref_stats:
            if args.workdir:
                raise EvalError("--write_ref_stats and --workdir are separate modes; give one")
            result = write_reference(args)
            out = None
        else:
            if not args.workdir:
                raise EvalError("give --workdir (score a run) or --write_ref_stats (reference statistics)")
            args.num = 10000 if args.num is None else args.num
            result = evaluate_run(args)
            out = args.out or os.path.join(args.workdir, f"eval_{args.features}_{result['solver']}_"
                                           f"{result['grid']}_{result['steps']}"
                                           + (f"_cfg{args.guidance_scale:g}" if args.guidance_scale else "") + ".json")
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = _json_safe(result)
    if out is not None and jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        result["json"] = out
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
