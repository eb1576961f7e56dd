"""SeedSelect (AAAI 2024) reproduced at small scale (methods.md §6.4): a class-conditional 16x16 digits model
trained on data where one digit is ~1% of the training set, sampled for that rare digit from random seeds and
from seeds optimised by SeedSelect (jaxdiff.research.seedselect) toward 5 reference images of it.

    python benchmarks/seedselect.py                 # train (cached under runs/seedselect), then measure
    python benchmarks/seedselect.py --quick         # 1 seed, 8 seeds per batch, 10 iterations

Semantic features in the loss: the shipped digits classifier's 64-d penultimate features (a stand-in for
CLIP). Scoring: an INDEPENDENT classifier, k-nearest neighbours (k=3, pixel space) on the 360 held-out real
test digits, which neither the diffusion model, the loss classifier nor the references come from.
Writes benchmarks/results/seedselect.{md,json}.
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

from jaxdiff.configs.digits import get_config  # noqa: E402
from jaxdiff.data.digits import load_digits_arrays  # noqa: E402
from jaxdiff.extractors import digits_classifier  # noqa: E402
from jaxdiff.parallel import make_mesh  # noqa: E402
from jaxdiff.research.seedselect import SeedSelect, SeedSelectConfig, classifier_features, predicts_class  # noqa: E402
from jaxdiff.sampling import Sampler, SamplerSettings  # noqa: E402
from jaxdiff.train_lib.diffusion import build_diffusion_experiment  # noqa: E402

RARE = 8                    # the rare digit
RARE_FRACTION = 0.01
NUM_REFS = 5


# ----------------------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------------------

def _rare_train_positions(seed: int = 0) -> np.ndarray:
    """Indices (in the train split) of the rare-digit images kept in the imbalanced set."""
    _, y = load_digits_arrays("train", 16)
    others = np.flatnonzero(y != RARE)
    n_rare = int(round(RARE_FRACTION * len(others) / (1 - RARE_FRACTION)))
    return np.random.default_rng(seed).permutation(np.flatnonzero(y == RARE))[:n_rare]


def imbalanced_train_set(seed: int = 0):
    """The 16x16 train split with the rare digit cut to ~1%: ``(images (N,16,16,1) in [-1,1], labels (N,),
    rare_indices)`` (rare_indices: the kept rare images, in the returned arrays)."""
    x, y = load_digits_arrays("train", 16)
    x = x.astype(np.float32) / 127.5 - 1.0
    others = np.flatnonzero(y != RARE)
    keep = np.concatenate([others, _rare_train_positions(seed)])
    return x[keep], y[keep], np.arange(len(others), len(keep))


def train_model(steps: int, cache: str, log=print):
    """Train (or load from ``cache``) the digits config's UNet on the imbalanced set; ``(experiment, ema_params)``."""
    config = get_config()
    config.train.steps = steps
    mesh = make_mesh(devices=jax.devices()[:1])
    exp = build_diffusion_experiment(config, mesh)
    if os.path.exists(cache):
        flat = dict(np.load(cache))
        leaves, treedef = jax.tree.flatten(exp.init_params)
        params = jax.tree.unflatten(treedef, [jnp.asarray(flat[f"p{i}"]) for i in range(len(leaves))])
        log(f"loaded the trained model from {cache}")
        return exp, params, json.loads(str(flat["meta"]))
    x, y, _ = imbalanced_train_set()
    state = exp.init_state()
    step = jax.jit(exp.make_train_step(), donate_argnums=0)
    rng = np.random.default_rng(1)
    b = config.train.batch_size
    t0 = time.perf_counter()
    for s in range(steps):
        idx = rng.integers(0, len(x), b)
        state, metrics = step(state, {"image": jnp.asarray(x[idx]), "label": jnp.asarray(y[idx], jnp.int32)})
        if (s + 1) % 200 == 0:
            log(f"train step {s + 1}/{steps}: loss {float(metrics['loss']):.4f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(state.ema_params)
    meta = {"steps": steps, "seconds": seconds, "train_images": int(len(x)),
            "rare_images": int(np.sum(y == RARE)), "rare_fraction": float(np.mean(y == RARE))}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, meta=json.dumps(meta), **{f"p{i}": np.asarray(v) for i, v in enumerate(leaves)})
    return exp, state.ema_params, meta


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------

class Judge:
    """The independent classifiers: an RBF support-vector machine on pixels (scikit-learn ``SVC``, C = 10)
    trained on the real train split WITHOUT the rare-digit images the diffusion model saw (so neither the
    model's rare images nor the references), and k-NN (k = 3, pixel L2) on the 360 held-out test digits."""

    def __init__(self, exclude_train: np.ndarray, k: int = 3):
        from sklearn.svm import SVC
        x, y = load_digits_arrays("train", 16)
        x = x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1.0
        keep = np.setdiff1d(np.arange(len(x)), exclude_train)
        self.svc = SVC(C=10.0, gamma="scale").fit(x[keep], y[keep])
        xt, yt = load_digits_arrays("test", 16)
        self.x_test, self.y_test, self.k = xt.reshape(len(xt), -1).astype(np.float32) / 127.5 - 1.0, yt, k
        self.svc_test_accuracy = float(np.mean(self.svc.predict(self.x_test) == yt))
        self.svc_test_accuracy_rare = float(np.mean(self.svc.predict(self.x_test[yt == RARE]) == RARE))

    def svm(self, images: np.ndarray) -> np.ndarray:
        return self.svc.predict(np.asarray(images, np.float32).reshape(len(images), -1))

    def knn(self, images: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        q = np.asarray(images, np.float32).reshape(len(images), -1)
        d = ((q[:, None, :] - self.x_test[None]) ** 2).sum(-1)
        if exclude_self:
            np.fill_diagonal(d, np.inf)
        votes = self.y_test[np.argsort(d, axis=1)[:, :self.k]]
        return np.array([np.bincount(v, minlength=10).argmax() for v in votes])


def mean_pairwise_distance(images: np.ndarray) -> float:
    """Mean L2 distance between distinct pairs of images (pixel space, [-1, 1])."""
    f = np.asarray(images, np.float64).reshape(len(images), -1)
    d = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 0))
    n = len(f)
    return float(d.sum() / (n * (n - 1))) if n > 1 else float("nan")


def nearest_distance(images: np.ndarray, refs: np.ndarray) -> float:
    """Mean over images of the L2 distance to the closest reference image (copying would give ~0)."""
    f = np.asarray(images, np.float64).reshape(len(images), -1)
    r = np.asarray(refs, np.float64).reshape(len(refs), -1)
    return float(np.sqrt(((f[:, None] - r[None]) ** 2).sum(-1)).min(1).mean())


def score(images, judge: Judge, clf_fn, refs) -> dict:
    images = np.clip(np.asarray(images), -1, 1)
    logits = np.asarray(clf_fn(jnp.asarray(images))[1])
    return {"svm_accuracy": float(np.mean(judge.svm(images) == RARE)),
            "knn_accuracy": float(np.mean(judge.knn(images) == RARE)),
            "loss_classifier_accuracy": float(np.mean(logits.argmax(-1) == RARE)),
            "diversity": mean_pairwise_distance(images),
            "nearest_reference_distance": nearest_distance(images, refs)}


# ----------------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="seeds optimised at once")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train_only", action="store_true")
    parser.add_argument("--from_json", action="store_true", help="only rewrite the .md from the .json")
    parser.add_argument("--cache", default=os.path.join(ROOT, "runs", "seedselect", "model.npz"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "seedselect"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.batch, args.iterations = 1, 8, 10
    log = lambda m: print(m, flush=True)
    if args.from_json:
        with open(args.out + ".json") as f:
            d = json.load(f)
        write_markdown(args.out + ".md", d["meta"], d["rows"])
        return
    exp, params, train_meta = train_model(args.train_steps, args.cache, log)
    if args.train_only:
        return
    model = exp.sampling_model(params)
    settings = SamplerSettings(solver="ddim", grid="uniform_t", steps=args.steps, guidance_scale=args.guidance)
    sampler = Sampler(model, settings)
    clf = digits_classifier(16)
    x, y, rare_idx = imbalanced_train_set()
    judge = Judge(_rare_train_positions())
    rare_train = x[rare_idx]
    x_test = judge.x_test.reshape(-1, 16, 16, 1)
    real_rare = np.concatenate([rare_train, x_test[judge.y_test == RARE]])
    real = {"svm_test_accuracy": judge.svc_test_accuracy, "svm_test_accuracy_rare": judge.svc_test_accuracy_rare,
            "svm_accuracy_rare_train_images": float(np.mean(judge.svm(rare_train) == RARE)),
            "knn_leave_one_out_accuracy_test_split": float(np.mean(judge.knn(x_test, exclude_self=True)
                                                                   == judge.y_test)),
            "knn_accuracy_rare_train_images": float(np.mean(judge.knn(rare_train) == RARE)),
            "diversity_real_rare": mean_pairwise_distance(real_rare)}
    log(f"real: {real}")
    rows, search = [], None
    for seed in range(args.seeds):
        rng = np.random.default_rng(100 + seed)
        refs = rare_train[rng.permutation(len(rare_train))[:NUM_REFS]]
        key = jax.random.key(seed)
        x_T = np.asarray(model.process.prior_sample(key, (args.batch,) + tuple(model.shape)), np.float32)
        labels = np.full((args.batch,), RARE, np.int32)
        base = sampler(params, labels, key, x_T=x_T)
        row = {"seed": seed, "random": score(base, judge, clf.fn, refs)}
        log(f"seed {seed} random seeds: {row['random']}")
        if search is None:          # one compiled iteration for every run seed and both variants
            search = SeedSelect(model, settings, refs, semantic_fn=classifier_features(clf.fn), label=RARE,
                                done_fn=predicts_class(clf.fn, RARE), config=SeedSelectConfig(iterations=args.iterations))
        else:
            search = search.with_references(refs)
        for name, early in (("seedselect", True), ("seedselect_no_early_stop", False)):
            res = search.run(x_T, early_stop=early)
            r = score(res.images, judge, clf.fn, refs)
            r.update(iterations_mean=float(res.iterations.mean()), done_fraction=float(res.done.mean()),
                     iterations=res.iterations.tolist(), seconds_per_iteration=res.seconds_per_iteration,
                     compile_seconds=res.compile_seconds, seed_shift_rms=float(np.sqrt(np.mean((res.seeds - x_T) ** 2))),
                     loss_first=float(np.nanmean(res.losses[0])),
                     loss_last=float(np.nanmean(res.losses[~np.isnan(res.losses).all(1)][-1])))
            if not early:                           # the sampler's own images of the optimised seeds
                again = np.clip(sampler(params, labels, key, x_T=res.seeds), -1, 1)
                r["sampler_svm_accuracy"] = float(np.mean(judge.svm(again) == RARE))
                r["sampler_max_abs_difference"] = float(np.abs(again - np.clip(res.images, -1, 1)).max())
            row[name] = r
            log(f"seed {seed} {name}: { {k: v for k, v in r.items() if k != 'iterations'} }")
        rows.append(row)
    meta = {"train": train_meta, "rare_digit": RARE, "references": NUM_REFS, "batch": args.batch,
            "iterations": args.iterations, "sampler": settings.as_dict(), "seeds": args.seeds, "real": real,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores shared, {jax.devices()[0].device_kind}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(args.out + ".md", meta, rows)
    log(f"wrote {args.out}.md/.json")


FINDINGS = "## Findings\n\n(written after the run)"

METHODS = {"random": "random seeds", "seedselect": "SeedSelect, early stop",
           "seedselect_no_early_stop": "SeedSelect, all iterations"}


def _ms(rows, method, key, fmt="{:.3f}"):
    v = np.array([r[method][key] for r in rows if method in r and key in r[method]], np.float64)
    if not len(v):
        return "—"
    return (fmt + " ± " + fmt).format(v.mean(), v.std(ddof=1)) if len(v) > 1 else fmt.format(v[0])


def write_markdown(path: str, meta: dict, rows: list[dict]) -> None:
    """The results table (mean ± sample std over seeds) around the fixed text of the report."""
    real, tr = meta["real"], meta["train"]
    table = ["| seeds from | k-NN accuracy (independent) | loss-classifier accuracy | diversity | "
             "distance to nearest reference | iterations | s / iteration |", "|---|---|---|---|---|---|---|"]
    for m, name in METHODS.items():
        table.append(f"| {name} | {_ms(rows, m, 'knn_accuracy')} | {_ms(rows, m, 'loss_classifier_accuracy')} | "
                     f"{_ms(rows, m, 'diversity', '{:.2f}')} | {_ms(rows, m, 'nearest_reference_distance', '{:.2f}')} | "
                     f"{_ms(rows, m, 'iterations_mean', '{:.1f}')} | {_ms(rows, m, 'seconds_per_iteration', '{:.2f}')} |")
    per_seed = ["| seed | random | SeedSelect (early stop) | SeedSelect (all iterations) | same seeds through "
                "`Sampler` |", "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda m, k="knn_accuracy": f"{r[m][k]:.3f}" if m in r and k in r[m] else "—"
        per_seed.append(f"| {r['seed']} | {cell('random')} | {cell('seedselect')} | "
                        f"{cell('seedselect_no_early_stop')} | {cell('seedselect_no_early_stop', 'sampler_knn_accuracy')} |")
    text = TEMPLATE.format(table="\n".join(table), per_seed="\n".join(per_seed), rare=meta["rare_digit"],
                           n_rare=tr["rare_images"], n_train=tr["train_images"], frac=100 * tr["rare_fraction"],
                           train_steps=tr["steps"], train_s=tr["seconds"], batch=meta["batch"],
                           iterations=meta["iterations"], seeds=meta["seeds"], steps=meta["sampler"]["steps"],
                           guidance=meta["sampler"]["guidance_scale"], machine=meta["machine"], date=meta["date"],
                           knn_loo=real["knn_leave_one_out_accuracy_test_split"],
                           knn_rare=real["knn_accuracy_rare_train_images"], div_real=real["diversity_real_rare"],
                           refs=meta["references"], seeds_minus_1=meta["seeds"] - 1,
                           findings=FINDINGS)
    with open(path, "w") as f:
        f.write(text)


TEMPLATE = """# SeedSelect on a rare digit (methods.md §6.4)

**Paper's claim** (Samuel et al., AAAI 2024): a pre-trained diffusion model generates rare (long-tail) concepts
badly from random seeds; optimising the initial noise through the frozen sampler toward a few reference
images (SeedSelect) generates the concept faithfully, with diversity, without fine-tuning. The paper's
numeric tables were not available here, so no paper numbers are compared; this reproduces the mechanism
at toy scale.

## Setup

- **Model**: `configs/digits.py`'s class-conditional UNet (v-prediction, cosine schedule, 10% label
  dropout), trained {train_steps} steps (batch 64, EMA 0.999; {train_s:.0f} s) on the 16x16 digits train split
  with digit **{rare}** cut to {n_rare} of {n_train} images ({frac:.1f}%), batches drawn uniformly from that set.
- **Sampler**: DDIM, {steps} steps, uniform-t grid, guidance scale {guidance} (none: conditional model only).
- **SeedSelect**: `jaxdiff.research.seedselect` with the official schedule and weights (AdamW lr 0.1 ->
  0.01 from iteration 3, weight decay 0.01, `L = 10 L_sem + L_app`, semantic weights 0.05/0.25/0.7 on the
  last 3 states), {iterations} iterations, {batch} seeds optimised at once per run, {refs} references drawn
  from the {n_rare} rare training images (a different draw per run seed).
  Semantic features: the shipped digits classifier's 64-d penultimate features (`jaxdiff.extractors.digits_classifier`),
  **a local stand-in for CLIP**; appearance: pixel MSE to the mean reference (a pixel model has no VAE).
  Early stop: that same classifier assigns the rare digit.
- **Independent judge**: a k-NN classifier (k = 3, pixel L2) on the 360 held-out real test digits: not the
  loss's classifier, and no image of it was seen by the diffusion model or used as a reference. Its
  leave-one-out accuracy on the test split is {knn_loo:.3f}; on the {n_rare} real rare training digits {knn_rare:.3f}.
  Caveat: it works in pixel space, where the appearance loss also pulls; the loss classifier's own accuracy
  is reported beside it (it is what the early stop optimises, so it is not independent).
- **Diversity**: mean pairwise L2 distance between the samples of a batch (pixels in [-1, 1], 256 of them);
  real rare digits (train + test): {div_real:.2f}. *Distance to nearest reference*: mean over samples of the
  L2 distance to the closest of the 5 references (a copy would give ~0).
- Run seeds 0..{seeds_minus_1}: each uses the same {batch} start noises for random seeds and SeedSelect. Machine: {machine},
  shared with other jobs (load average 10-20), so times are upper bounds. {date}.

## Results (mean ± std over {seeds} run seeds)

{table}

*k-NN accuracy*: share of the batch's samples the independent k-NN assigns to digit {rare}. *iterations*:
updates per seed (early stop: until the loss classifier assigned the digit; capped at {iterations}).
*s / iteration*: one compiled iteration for the whole batch (forward through {steps} steps, remat backward,
AdamW), compilation excluded.

Per run seed (k-NN accuracy); the last column samples the optimised seeds again through `jaxdiff.sampling.Sampler`
(the same DDIM run in one piece: equal images, a check of the segmented sampler):

{per_seed}

{findings}
"""


if __name__ == "__main__":
    main()
