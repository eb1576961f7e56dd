"""Training throughput of the shipped configs on this machine: steps/s, images/s, FLOPs per step, TFLOP/s.

    python benchmarks/train_throughput.py [--out benchmarks/results/train_throughput]

Each config runs with ``data.synthetic=True`` (random images of the right shape: the input pipeline is
not timed) on one device, through the same pieces train.py uses: ``build_experiment``, the jitted,
donated ``make_train_step`` with its shardings, ``to_global`` batches. The first step (compilation) is
timed apart; then ``--steps`` steps are timed after one warm-up step, blocking on the result.
FLOPs per step are XLA's cost-analysis estimate of the unpartitioned step (``train_lib.flops.step_flops``,
what train.py logs), so TFLOP/s = steps/s x FLOPs/step.

CIFAR-10 runs with a reduced batch (16 instead of 128) so that it fits the time budget on a CPU; its
full-batch FLOPs per step are also estimated (shapes only), as are those of the larger configs, which
are too big to time here. Writes ``<out>.json`` and ``<out>.md``. About 2-4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxdiff import losses, parallel  # noqa: E402
from jaxdiff.data.pipeline import synthetic_iterator, to_global  # noqa: E402
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.nn.sharding import batch_sharding  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402
from jaxdiff.train_lib import flops as flops_lib  # noqa: E402
from jaxdiff.train_lib.experiment import build_experiment  # noqa: E402
from jaxdiff.nn.functional import make_apply, split_model  # noqa: E402
from jaxdiff.train_lib.model import build_model  # noqa: E402
from jaxdiff.train_lib.optim import make_optimizer  # noqa: E402
from jaxdiff.train_lib.state import create_state  # noqa: E402
from jaxdiff.train_lib.step import make_train_step  # noqa: E402

# (config, batch size timed here, timed steps, note)
TIMED = [
    ("digits", None, 20, "the config's own batch"),
    ("cifar10", 16, 4, "batch reduced from 128 to 16 to run on this CPU"),
]
# (config, batch) whose FLOPs per step are only estimated (abstract shapes, no parameters allocated)
ESTIMATED = [("cifar10", None), ("celeba64", None), ("imagenet64", None)]


def _load(name: str, batch: int | None):
    c = config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    c.data.synthetic = True
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.train.sample_every = 0
    if batch is not None:
        c.train.batch_size = batch
    return c


def _step_fn(config, exp):
    conditional = exp.conditional
    return make_train_step(exp.apply, exp.loss_fn, exp.optimizer, exp.schedule, grad_accum=config.train.grad_accum,
                           label_dropout=config.train.label_dropout if conditional else 0.0,
                           null_class=config.model.num_classes if exp.unet.class_null else None,
                           ema_decay=config.train.ema_decay, conditional=conditional)


def time_config(name: str, batch: int | None, steps: int) -> dict:
    """Compile, warm up and time ``steps`` train steps of config ``name`` on one device."""
    config = _load(name, batch)
    b, size, ch = int(config.train.batch_size), config.data.image_size, config.data.channels
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    t0 = time.perf_counter()
    exp = build_experiment(config, mesh)
    state = exp.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    train_step = _step_fn(config, exp)
    batch_sh = {"image": batch_sharding(mesh, 4), "label": batch_sharding(mesh, 1)}
    step = jax.jit(train_step, in_shardings=(exp.state_shardings, batch_sh),
                   out_shardings=(exp.state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    data = synthetic_iterator(global_batch_size=b, image_size=size, channels=ch, seed=0,
                              num_classes=config.model.num_classes if exp.conditional else None)

    def next_batch():
        x = next(data)
        x.setdefault("label", np.zeros(b, np.int32))
        return to_global(x, batch_sh)

    batches = [next_batch() for _ in range(steps + 2)]
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    state, m = step(state, batches[1])          # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for x in batches[2:]:
        state, m = step(state, x)
    jax.block_until_ready((state, m))
    elapsed = time.perf_counter() - t0
    flops = flops_lib.step_flops(train_step, exp.abstract_state, b, (size, size, ch))
    rate = steps / elapsed
    return {"config": name, "batch": b, "params": exp.num_params, "timed_steps": steps,
            "init_s": init_s, "first_step_s": first_s, "step_s": elapsed / steps, "steps_per_s": rate,
            "images_per_s": rate * b, "gflop_per_step": flops / 1e9, "tflops_per_s": rate * flops / 1e12,
            "final_loss": float(m["loss"])}


def estimate_flops(name: str, batch: int | None) -> dict:
    """FLOPs per step at the config's own batch from shapes alone (``nnx.eval_shape``: nothing allocated)."""
    config = _load(name, batch)
    b, size, ch = int(config.train.batch_size), config.data.image_size, config.data.channels
    model = nnx.eval_shape(lambda: build_model(config, seed=config.seed))
    graphdef, params_state, rest = split_model(model)
    params = nnx.to_pure_dict(params_state)
    optimizer, schedule = make_optimizer(config.optim, int(config.train.steps))
    abstract = jax.eval_shape(lambda p: create_state(p, optimizer, config.seed), params)
    process = make_process(config.process.name, **dict(config.process.kwargs))
    loss_fn = losses.make_denoising_loss(process, target=config.loss.target, time_sampling=config.loss.time_sampling,
                                         weighting=config.loss.weighting, time_params=dict(config.loss.time_params),
                                         weight_params=dict(config.loss.weight_params))
    conditional = bool(config.model.num_classes) and config.data.label_key is not None
    class_null = bool(config.model.num_classes) and config.train.label_dropout > 0
    train_step = make_train_step(make_apply(graphdef, rest), loss_fn, optimizer, schedule,
                                 grad_accum=config.train.grad_accum,
                                 label_dropout=config.train.label_dropout if conditional else 0.0,
                                 null_class=config.model.num_classes if class_null else None,
                                 ema_decay=config.train.ema_decay, conditional=conditional)
    t0 = time.perf_counter()
    flops = flops_lib.step_flops(train_step, abstract, b, (size, size, ch))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"config": name, "batch": b, "params": n, "steps": int(config.train.steps),
            "gflop_per_step": flops / 1e9, "gflop_per_image": flops / 1e9 / b,
            "run_eflop": flops * int(config.train.steps) / 1e18, "estimate_s": time.perf_counter() - t0}


def _machine() -> dict:
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = "unavailable"
    return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind, "devices_used": 1, "cpu_count": os.cpu_count(),
            "uptime_before": uptime}


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Training throughput", "",
             "`python benchmarks/train_throughput.py` (synthetic data, one device; see the script's docstring).", "",
             f"Machine: {m['device']} ({m['cpu_count']} CPU cores visible, shared), jax {m['jax']}, "
             f"{m['platform']}.", "",
             f"Load: before `{m['uptime_before']}`; after `{m['uptime_after']}`. Other engineers' jobs were "
             "running on the same 2 cores, so these rates are lower bounds for an idle machine.", "",
             "## Timed on this machine", "",
             "| config | batch | params | compile + first step (s) | s/step | steps/s | images/s | GFLOP/step "
             "| TFLOP/s | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["timed"]:
        lines.append(f"| {r['config']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['first_step_s']:.1f} | "
                     f"{r['step_s']:.3f} | {r['steps_per_s']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['gflop_per_step']:.2f} | {r['tflops_per_s']:.4f} | {r['note']} |")
    lines += ["", "## FLOPs per step at the configs' own batch (estimated from shapes, not timed)", "",
              "| config | batch | params | GFLOP/step | GFLOP/image | whole run (EFLOP) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["estimated"]:
        lines.append(f"| {r['config']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['gflop_per_step']:,.0f} | "
                     f"{r['gflop_per_image']:.2f} | {r['run_eflop']:.2f} |")
    lines += ["", "FLOPs are XLA's cost analysis of the whole step (forward, backward, AdamW, EMA) before "
              "partitioning; accelerator run times are not measured here. Runtime of this benchmark: "
              f"{result['runtime_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput"))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply the timed step counts")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = {"machine": _machine(), "timed": [], "estimated": []}
    for name, batch, steps, note in TIMED:
        r = time_config(name, batch, max(2, int(steps * args.steps_scale)))
        r["note"] = note
        print(json.dumps(r), flush=True)
        result["timed"].append(r)
    for name, batch in ESTIMATED:
        r = estimate_flops(name, batch)
        print(json.dumps(r), flush=True)
        result["estimated"].append(r)
    result["machine"]["uptime_after"] = _machine()["uptime_before"]
    result["runtime_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
