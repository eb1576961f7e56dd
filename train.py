"""Train a diffusion model on a TFDS image dataset (default: the embedded digits).

    python train.py --config configs/digits.py --workdir runs/digits [--config.train.steps=3000 ...]

Reads the config (each file's docstring gives its command and runtime), builds the (data, fsdp) mesh,
the UNet, AdamW and the data iterator; resumes from the newest readable checkpoint in
``<workdir>/checkpoints``; then trains with one jitted, sharded step, logging to the terminal,
``<workdir>/metrics.jsonl`` and TensorBoard, writing sample grids to ``<workdir>/samples/`` and
checkpoints every ``checkpoint.every`` steps. SIGTERM (preemption) saves the current step and exits 0.
Several processes (a pod slice, or localhost tests) start with JAXDIFF_COORDINATOR /
JAXDIFF_NUM_PROCESSES / JAXDIFF_PROCESS_ID (see jaxdiff/parallel.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import parallel
from jaxdiff.data.pipeline import to_global
from jaxdiff.nn.sharding import batch_sharding
from jaxdiff.train_lib import checkpoint as ckpt
from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib import flops as flops_lib
from jaxdiff.train_lib.experiment import build_experiment
from jaxdiff.train_lib.state import TrainState
from jaxdiff.train_lib.writer import MetricWriter


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or infinite."""


class _Preemption:
    """Turns SIGTERM into a flag the loop polls (all processes agree on the step they stop at)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _data_iterator(config, seed: int):
    from jaxdiff.data import pipeline
    b = config.train.batch_size
    if config.data.synthetic:
        return pipeline.synthetic_iterator(global_batch_size=b, image_size=config.data.image_size,
                                           channels=config.data.channels, seed=seed,
                                           num_classes=config.model.num_classes)
    fields = {k: v for k, v in config.data.items() if k not in ("channels", "synthetic")}
    return pipeline.make_iterator(fields, global_batch_size=b, seed=seed)


def _check_finite(state: TrainState, last_saved: int | None) -> None:
    bad = int(jax.device_get(state.bad_step))
    if bad >= 0:
        where = f"the last checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was written"
        raise NonFiniteLossError(f"the loss or gradient became NaN/inf at step {bad}; training stopped "
                                 f"(that update was skipped, so no non-finite parameters were saved; {where}). "
                                 "Lower optim.lr, enable optim.clip_norm, or check the data.")


def train(config, workdir: str, devices=None) -> dict:
    """Run (or resume) the training of ``config`` in ``workdir`` on ``devices`` (default: all); returns a
    summary dict (``step``, ``final_loss``, ``params`` (host numpy tree), ``preempted``)."""
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    exp = build_experiment(config, mesh)
    total, b = int(config.train.steps), int(config.train.batch_size)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % data_shards or b % jax.process_count():
        raise ValueError(f"train.batch_size {b} must divide by the {data_shards} batch shards of the mesh "
                         f"and the {jax.process_count()} processes")
    if config.task == "autoencoder" and config.train.grad_accum != 1:
        raise ValueError("train.grad_accum must be 1 for task='autoencoder'")
    state = exp.init_state()
    state_sh = exp.state_shardings
    train_step = exp.make_train_step()
    image_sh, label_sh = batch_sharding(mesh, 4), batch_sharding(mesh, 1)
    batch_sh = {"image": image_sh, "label": label_sh}
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                      donate_argnums=0)

    # data and checkpoints: resume from the newest readable step
    data_iter = _data_iterator(config, config.seed)
    checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save, verify=config.checkpoint.verify)
    restored = checkpointer.restore(exp.abstract_sharded_state())
    last_saved = None
    if restored is not None:
        last_saved, state, data_state, _ = restored
        data_iter.set_state(data_state)
        if is_main:
            print(f"resumed from step {last_saved} in {checkpointer.directory}", flush=True)
    start = int(jax.device_get(state.step))

    # static cost of one step (FLOPs of the unpartitioned program) for TFLOP/s and MFU
    size, ch = config.data.image_size, config.data.channels
    step_flops = flops_lib.step_flops(train_step, exp.abstract_state, b, (size, size, ch))
    peak = flops_lib.peak_tflops(config.train.peak_tflops)

    writer = MetricWriter(workdir)
    config_dict = config_lib.to_dict(config)
    preemption = _Preemption()
    bar = None
    if is_main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        print(f"{exp.num_params:,} parameters; mesh {dict(mesh.shape)}; {jax.process_count()} process(es); "
              f"{step_flops / 1e9:.2f} GFLOP/step", flush=True)

    def save(step_now):
        nonlocal last_saved
        _check_finite(state, last_saved)
        checkpointer.save(step_now, state, data_iter.get_state(), config_dict)
        last_saved = step_now

    t_last, step_last = time.perf_counter(), start
    metrics = None
    preempted = False
    step = start
    try:
        while step < total:
            batch = next(data_iter)
            batch = {"image": batch["image"], "label": batch.get("label", np.zeros(len(batch["image"]), np.int32))}
            state, metrics = step_fn(state, to_global(batch, batch_sh))
            step += 1
            if bar is not None:
                bar.update(1)
            if step % config.train.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(state, last_saved)
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                m.update(steps_per_s=rate, images_per_s=rate * b, tflops_per_s=rate * step_flops / 1e12)
                if peak:
                    m["mfu"] = m["tflops_per_s"] / (peak * jax.device_count())
                writer.write(step, m)
                if is_main:
                    line = (f"step {step}/{total} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} "
                            f"lr {m['lr']:.2e} {rate:.2f} steps/s {m['images_per_s']:.0f} img/s "
                            f"{m['tflops_per_s']:.3f} TFLOP/s" + (f" MFU {m['mfu']:.1%}" if peak else ""))
                    bar.write(line) if bar is not None and not bar.disable else print(line, flush=True)
            if config.train.sample_every and (step % config.train.sample_every == 0 or step == total):
                exp.write_samples(state, batch["image"], workdir, step)
            if step % config.checkpoint.every == 0 or step == total:
                save(step)
            if preemption.agreed():
                if last_saved != step:
                    save(step)
                preempted = True
                if is_main:
                    print(f"SIGTERM: saved step {step}; exiting", flush=True)
                break
        checkpointer.wait()
        if step == total and not preempted:
            extra = exp.finish(state, data_iter, workdir, step)
            if extra:
                writer.write(step, extra)
                if is_main:
                    print(" ".join(f"{k} {v:.6g}" for k, v in extra.items()), flush=True)
    finally:
        preemption.restore()
        if bar is not None:
            bar.close()
        writer.close()
        checkpointer.close()
    return {"step": step, "preempted": preempted,
            "final_loss": float(jax.device_get(metrics["loss"])) if metrics is not None else None,
            "params": multihost_utils.process_allgather(state.params, tiled=True)
            if jax.process_count() > 1 else jax.device_get(state.params)}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(args, overrides)``: ``--config``, ``--workdir`` and any ``--config.section.key=value``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.py", help="config file[:argument]")
    parser.add_argument("--workdir", required=True, help="run folder (checkpoints, metrics, samples)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments {bad}; overrides look like --config.train.steps=100")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    parallel.initialize_distributed()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.load_config(args.config, overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        train(config, args.workdir)
    except (NonFiniteLossError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
