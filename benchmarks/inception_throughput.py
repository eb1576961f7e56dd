"""FID feature-extraction throughput: jaxdiff's InceptionV3FID against pytorch-fid, same machine, same run.

Both sides take a batch of 32x32 RGB images, resize it to 299x299 (bilinear, align_corners=False)
and return the 2048-d pool3 features, with the same random weights (the real FID weights are not
needed for timing). The two frameworks are timed alternately, call by call, so that load from
other processes on a shared machine falls on both; the median per-call time is reported.

The PyTorch side is pytorch-fid's ``InceptionV3`` (``use_fid_inception=True``), built as in
``tests/test_inception.py``: against torchvision when it imports, otherwise against that test's
stand-in for torchvision's layer definitions (same torch layers, same FLOPs).

    python benchmarks/inception_throughput.py          # batches 16, 32 -> benchmarks/results/inception_throughput.md
    python benchmarks/inception_throughput.py --quick  # batch 16 only, 2 timed calls, printed only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from jaxdiff.convert.inception import load_inception_state_dict  # noqa: E402
from jaxdiff.nn.inception import InceptionV3FID  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def build_pair():
    """``(pytorch-fid model, jaxdiff model, reference description)`` with the same random weights."""
    import torch
    import test_inception as ti

    pfid = ti._import_pytorch_fid_inception(torch)
    tv = pfid.torchvision
    standin = not hasattr(tv, "__file__")
    sd = ti._random_fid_state_dict(pfid, torch)
    original = pfid.load_state_dict_from_url
    pfid.load_state_dict_from_url = lambda *a, **k: sd
    try:
        ref = pfid.InceptionV3([3], use_fid_inception=True).eval()
    finally:
        pfid.load_state_dict_from_url = original
    model = nnx.eval_shape(lambda: InceptionV3FID(rngs=None))
    load_inception_state_dict(model, {k: v.numpy() for k, v in sd.items()})
    import pytorch_fid
    what = (f"pytorch-fid {getattr(pytorch_fid, '__version__', '?')} InceptionV3(use_fid_inception=True), "
            + ("torchvision stand-in from tests/test_inception.py (torchvision did not import)" if standin
               else f"torchvision {getattr(tv, '__version__', '?')}"))
    return ref, model, what


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    batches = [16] if args.quick else [16, 32]
    repeats = 2 if args.quick else args.repeats
    t_start, load0 = time.time(), os.getloadavg()
    ref, model, what = build_pair()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    rows = []
    for b in batches:
        x01 = np.random.RandomState(b).uniform(0, 1, (b, 32, 32, 3)).astype(np.float32)
        xj = jnp.asarray(2 * x01 - 1)
        xt = torch.from_numpy(x01.transpose(0, 3, 1, 2).copy())
        t0 = time.perf_counter()
        compiled = fwd.lower(state, xj).compile()
        compile_s = time.perf_counter() - t0

        def run_jax():
            return np.asarray(compiled(state, xj).block_until_ready())

        def run_torch():
            with torch.no_grad():
                return ref(xt)[0][:, :, 0, 0].numpy()

        fj, ft = run_jax(), run_torch()  # warm-up (and a parity check on the benchmark's inputs)
        err = float(np.abs(fj - ft).max())
        tj, tt = [], []
        for _ in range(repeats):
            for fn, out in ((run_jax, tj), (run_torch, tt)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        mj, mt = statistics.median(tj), statistics.median(tt)
        rows.append({"batch": b, "jax_s": mj, "torch_s": mt, "jax_img_s": b / mj, "torch_img_s": b / mt,
                     "ratio": mt / mj, "compile_s": compile_s, "max_abs_diff": err, "jax_runs": tj, "torch_runs": tt})
        print(json.dumps(rows[-1]), flush=True)

    meta = {"machine": cpu_name(), "cores": os.cpu_count(),
            "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "reference": what, "load_start": load0, "load_end": os.getloadavg(), "repeats": repeats,
            "total_s": time.time() - t_start, "quick": args.quick}
    lines = [
        "# FID Inception feature extraction: jaxdiff vs pytorch-fid on CPU", "",
        f"Machine: {meta['machine']}, {meta['cores']} cores; load average at start "
        f"{[round(v, 2) for v in load0]}, at end {[round(v, 2) for v in meta['load_end']]} (shared machine: other "
        f"processes were running). jax {meta['jax']}, torch {meta['torch']} ({meta['torch_threads']} threads). "
        f"Reference: {what}. Same random weights on both sides.", "",
        "Per call: a batch of 32x32 RGB images -> bilinear resize to 299x299 -> 2048-d pool3 features "
        "(float32). One warm-up call each, then "
        f"{repeats} timed calls each, jaxdiff and PyTorch alternating; median. Ratio = PyTorch time / jaxdiff "
        "time (> 1: jaxdiff faster). Compile time (jaxdiff, once per batch size) is not in the timings. "
        f"Total run time {meta['total_s']:.0f} s.", "",
        "| batch | jaxdiff img/s | pytorch-fid img/s | ratio | jaxdiff calls (s) | pytorch-fid calls (s) "
        "| jaxdiff compile s | max abs diff of features |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs_j, runs_t = (", ".join(f"{t:.2f}" for t in r[k]) for k in ("jax_runs", "torch_runs"))
        lines.append(f"| {r['batch']} | {r['jax_img_s']:.2f} | {r['torch_img_s']:.2f} | {r['ratio']:.2f} | "
                     f"{runs_j} | {runs_t} | {r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |")
    lines.append("")
    print("\n".join(lines))
    if not args.quick:  # a smoke run only prints
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "inception_throughput.md"), "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
