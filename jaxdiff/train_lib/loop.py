"""The training loop every experiment runs in: mesh -> experiment -> data -> restore -> one compiled,
sharded step -> logs, checkpoints, sample grids; SIGTERM (preemption) saves the current step and stops.

The loop does not know which task it trains: the experiment (``train_lib.experiment``) supplies the
state, the step, the batch shardings, the sample grids and the end-of-training work.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import parallel
from jaxdiff.data import pipeline
from jaxdiff.train_lib import checkpoint as ckpt
from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib import flops as flops_lib
from jaxdiff.train_lib.experiment import build_experiment
from jaxdiff.train_lib.writer import MetricWriter

log = logging.getLogger("jaxdiff.train")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or infinite."""


class Preemption:
    """Whether to stop and save now. One process: a SIGTERM handler sets a flag. Several processes: the
    JAX distributed runtime receives the notice and orbax's ``reached_preemption`` says when every process
    has reached the agreed step; no host synchronisation happens until a notice arrives."""

    def __init__(self, checkpointer: ckpt.Checkpointer):
        self.checkpointer = checkpointer
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        """True once the run should save ``step`` and stop."""
        if jax.process_count() == 1:
            return self.requested
        return self.checkpointer.reached_preemption(step)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def data_iterator(config, seed: int, tokenize=None):
    """The host's batch iterator for ``config.data`` (synthetic data for throughput runs); ``tokenize``: the
    text model's tokenizer (captions -> ``"tokens"``) for text-conditioned runs."""
    b = config.train.batch_size
    if config.data.synthetic:
        return pipeline.synthetic_iterator(global_batch_size=b, image_size=config.data.image_size,
                                           channels=config.data.channels, seed=seed,
                                           num_classes=config.model.num_classes)
    fields = {k: v for k, v in config.data.items() if k not in ("channels", "synthetic")}
    return pipeline.make_iterator(fields, global_batch_size=b, seed=seed, tokenize=tokenize)


def _check_finite(state, last_saved: int | None) -> None:
    bad = int(jax.device_get(state.bad_step))
    if bad >= 0:
        where = f"the last checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was written"
        raise NonFiniteLossError(f"the loss or gradient became NaN/inf at step {bad}; training stopped "
                                 f"(that update was skipped, so no non-finite parameters were saved; {where}). "
                                 "Lower optim.lr, enable optim.clip_norm, or check the data.")


def _host_batch(batch: dict) -> dict:
    labels = batch.get("label")
    return {"image": batch["image"],
            "label": labels if labels is not None else np.zeros(len(batch["image"]), np.int32),
            **{k: v for k, v in batch.items() if k not in ("image", "label")}}   # e.g. "tokens", "class_image"


def train(config, workdir: str, devices=None) -> dict:
    """Run (or resume) the training of ``config`` in ``workdir`` on ``devices`` (default: all).

    Returns a summary: ``step``, ``final_loss``, ``params`` (host numpy tree), ``preempted``,
    ``seconds_to_first_step`` (start of this call to the end of the first step, compilation included).
    """
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    exp = build_experiment(config, mesh)
    total, b = int(config.train.steps), int(config.train.batch_size)
    data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % data_shards or b % jax.process_count():
        raise ValueError(f"train.batch_size {b} must divide by the {data_shards} batch shards of the mesh "
                         f"and the {jax.process_count()} processes")
    batch_sh = exp.batch_shardings()
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(exp.make_train_step(), in_shardings=(exp.state_shardings, batch_sh),
                      out_shardings=(exp.state_shardings, replicated), donate_argnums=0)

    # data and checkpoints: resume from the newest readable step
    # an experiment with data of its own (LoRA's instance and class images) makes its iterator
    make_data = getattr(exp, "data_iterator", None)
    data_iter = (make_data(config.seed, workdir) if make_data is not None
                 else data_iterator(config, config.seed, tokenize=getattr(exp, "tokenize", None)))
    checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save, verify=config.checkpoint.verify)
    restored = checkpointer.restore(exp.abstract_sharded_state())
    last_saved = None
    if restored is not None:
        last_saved, state, data_state, _ = restored
        data_iter.set_state(data_state)
        log.info("resumed from step %d in %s", last_saved, checkpointer.directory)
    else:
        state = exp.init_state()
    start = int(jax.device_get(state.step))

    writer = MetricWriter(workdir)
    config_dict = config_lib.to_dict(config)
    preemption = Preemption(checkpointer)
    peak = flops_lib.peak_tflops(config.train.peak_tflops)
    log.info("%s parameters; mesh %s; %d process(es); %d/%d steps done", f"{exp.num_params:,}",
             dict(mesh.shape), jax.process_count(), start, total)
    bar = None
    if is_main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())

    def save(step_now):
        nonlocal last_saved
        _check_finite(state, last_saved)
        checkpointer.save(step_now, state, data_iter.get_state(), config_dict)
        last_saved = step_now

    compiled, step_flops, first_step_s = None, 0.0, None
    metrics = None
    preempted = False
    step = start
    t_last, step_last = time.perf_counter(), start
    try:
        while step < total:
            host_batch = _host_batch(next(data_iter))
            batch = pipeline.to_global(host_batch, batch_sh)
            if compiled is None:    # one trace and one compilation; the FLOPs come from the same lowering
                t0 = time.perf_counter()
                lowered = step_fn.lower(state, batch)
                step_flops = flops_lib.lowered_flops(lowered)
                compiled = lowered.compile()
                log.info("train step compiled in %.1f s (%.2f GFLOP/step)", time.perf_counter() - t0,
                         step_flops / 1e9)
            state, metrics = compiled(state, batch)
            step += 1
            if first_step_s is None:
                jax.block_until_ready(metrics)
                first_step_s = time.perf_counter() - t_start
                t_last, step_last = time.perf_counter(), step
                log.info("first step done %.1f s after start", first_step_s)
            if bar is not None:
                bar.update(1)
            if step % config.train.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(state, last_saved)
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9) if step > step_last else float("nan")
                t_last, step_last = now, step
                m.update(steps_per_s=rate, images_per_s=rate * b, tflops_per_s=rate * step_flops / 1e12)
                if peak:
                    m["mfu"] = m["tflops_per_s"] / (peak * jax.device_count())
                writer.write(step, m)
                line = (f"step {step}/{total} loss {m['loss']:.4f} grad_norm {m.get('grad_norm', float('nan')):.3f} "
                        f"lr {m['lr']:.2e} {rate:.2f} steps/s {m['images_per_s']:.0f} img/s "
                        f"{m['tflops_per_s']:.3f} TFLOP/s" + (f" MFU {m['mfu']:.1%}" if peak else ""))
                if bar is not None and not bar.disable:
                    bar.write(line)
                else:
                    log.info(line)
            # the checkpoint first: a failure while drawing samples must not cost this step
            if step % config.checkpoint.every == 0 or step == total:
                save(step)
            if config.train.sample_every and step % config.train.sample_every == 0:
                exp.write_samples(state, host_batch["image"], workdir, step)
            if preemption.reached(step):
                if last_saved != step:
                    save(step)
                preempted = True
                log.info("SIGTERM: saved step %d; exiting", step)
                break
        checkpointer.wait()
        if step == total and not preempted:
            extra = exp.finish(state, data_iter, workdir, step)
            if extra:
                writer.write(step, extra)
                log.info(" ".join(f"{k} {v:.6g}" for k, v in extra.items()))
    finally:
        preemption.restore()
        if bar is not None:
            bar.close()
        writer.close()
        checkpointer.close()
    return {"step": step, "preempted": preempted, "seconds_to_first_step": first_step_s,
            "final_loss": float(jax.device_get(metrics["loss"])) if metrics is not None else None,
            "params": multihost_utils.process_allgather(state.params, tiled=True)
            if jax.process_count() > 1 else jax.device_get(state.params)}
