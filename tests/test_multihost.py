"""Multi-host training for real: two train.py processes on localhost joined by ``jax.distributed``
(gloo CPU collectives), one (data=4, fsdp=2) mesh spanning both processes' 4 host devices each.

Run 1 trains to step 3 with a checkpoint (every process takes part in the orbax save; process 0 alone
writes the manifest), run 2 resumes both processes to step 6. Against a single-process 8-device run
of the same config: the same loss curve, the same final parameters (float tolerance), and every
process reads exactly its own rows of each global batch (recorded by a wrapper around the data
source, not recomputed from the pipeline's formula).

Slow (2m45s-3m20s measured on 2 busy CPU cores: three train.py start-ups with compilation, two of them
two processes at once), so it runs with ``make test-slow`` / ``pytest -m slow``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train import write_config  # noqa: E402

from jaxdiff.parallel import make_mesh  # noqa: E402
from jaxdiff.train_lib import checkpoint as ckpt  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402
from jaxdiff.train_lib.experiment import build_experiment  # noqa: E402
from jaxdiff.train_lib.writer import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 240          # seconds for one run (both processes); each is killed past it
GLOBAL_BATCH = 16          # test_train.TINY's train.batch_size
PROCESSES = 2

# Runs train.main after wrapping the data source so that every read is logged as
# {"k": global batch index, "indices": example indices} in $JAXDIFF_TEST_READ_LOG.<process id>.
LAUNCHER = textwrap.dedent("""
    import json, os, sys, threading
    sys.path.insert(0, {root!r})
    from jaxdiff.data import pipeline

    _log = open(os.environ["JAXDIFF_TEST_READ_LOG"] + "." + os.environ.get("JAXDIFF_PROCESS_ID", "0"), "a")
    _lock, _local = threading.Lock(), threading.local()

    class _Recording:
        def __init__(self, source):
            self.source = source
        def __len__(self):
            return len(self.source)
        def _record(self, indices):
            with _lock:
                record = {{"k": getattr(_local, "k", None), "indices": [int(i) for i in indices]}}
                _log.write(json.dumps(record) + "\\n")
                _log.flush()
        def __getitem__(self, i):
            self._record([i])
            return self.source[i]
        def __getitems__(self, indices):
            self._record(indices)
            many = getattr(self.source, "__getitems__", None)
            return many(indices) if many is not None else [self.source[i] for i in indices]

    _open, _build = pipeline.open_source, pipeline.ImageIterator._build
    pipeline.open_source = lambda *a, **kw: _Recording(_open(*a, **kw))

    def _logged_build(self, k):
        _local.k = k
        try:
            return _build(self, k)
        finally:
            _local.k = None
    pipeline.ImageIterator._build = _logged_build

    import train
    sys.exit(train.main(sys.argv[1:]))
    """)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxdiff.data import build_digits
    d = tmp_path_factory.mktemp("tfds")
    build_digits(str(d), 16)
    return d


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, read_log: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXDIFF_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               JAXDIFF_TEST_READ_LOG=read_log, **{k: str(v) for k, v in extra.items()})
    return env


def _run_processes(launcher: str, args: list[str], envs: list[dict], logs: list[str],
                   timeout: float = RUN_TIMEOUT) -> list[str]:
    """Start one train.py per env, wait for all; returns their outputs. If any fails, or the time runs
    out, the others are killed at once (a lone survivor would wait on its peer forever) and the test
    fails with every process's output tail."""
    procs, files = [], []
    try:
        for env, log in zip(envs, logs):
            f = open(log, "w")
            files.append(f)
            procs.append(subprocess.Popen([sys.executable, launcher, *args], env=env, stdout=f,
                                          stderr=subprocess.STDOUT, cwd=ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
        for f in files:
            f.close()
    outputs = [open(log).read() for log in logs]
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tails = "\n".join(f"--- process {i} (exit {c}) ---\n{out[-3000:]}"
                          for i, (c, out) in enumerate(zip(codes, outputs)))
        pytest.fail(f"train.py processes failed or timed out after {timeout}s (negative exit: killed):\n{tails}")
    return outputs


def _reads(read_log: str, pid: int) -> dict[int, list[int]]:
    """``{global batch k: example indices this process read for it}`` (the schema peek, k=None, left out)."""
    out: dict[int, list[int]] = {}
    with open(f"{read_log}.{pid}") as f:
        for line in f:
            r = json.loads(line)
            if r["k"] is not None:
                assert out.setdefault(r["k"], r["indices"]) == r["indices"], f"batch {r['k']} read differently"
    return out


def _losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def test_two_processes_train_resume_and_match_one_process(tmp_path, data_dir):
    launcher = str(tmp_path / "launch.py")
    with open(launcher, "w") as f:
        f.write(LAUNCHER.format(root=ROOT))
    cfg = write_config(tmp_path / "tiny.py", data_dir, mesh=dict(data=4, fsdp=2),
                       train=dict(steps=3), checkpoint=dict(every=3))
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    multi_reads, single_reads = str(tmp_path / "multi_reads"), str(tmp_path / "single_reads")

    def two_processes(extra_args, tag):
        port = _free_port()
        envs = [_env(4, multi_reads, JAXDIFF_COORDINATOR=f"127.0.0.1:{port}", JAXDIFF_NUM_PROCESSES=PROCESSES,
                     JAXDIFF_PROCESS_ID=pid, JAXDIFF_CPU_COLLECTIVES="gloo") for pid in range(PROCESSES)]
        logs = [str(tmp_path / f"{tag}_p{pid}.log") for pid in range(PROCESSES)]
        return _run_processes(launcher, ["--config", cfg, "--workdir", multi, *extra_args], envs, logs)

    # run 1: both processes to step 3, one checkpoint; run 2: both resume and go on to step 6
    out1 = two_processes([], "run1")
    assert "2 process(es)" in out1[0] and "mesh {'data': 4, 'fsdp': 2}" in out1[0], out1[0][-2000:]
    out2 = two_processes(["--config.train.steps=6"], "run2")
    assert "resumed from step 3" in out2[0], out2[0][-2000:]
    # the reference: one process with all 8 devices, same config, 6 steps without interruption
    _run_processes(launcher, ["--config", cfg, "--workdir", single, "--config.train.steps=6",
                              "--config.checkpoint.every=6"],
                   [_env(8, single_reads)], [str(tmp_path / "single.log")])
    _check_runs(cfg, multi, single, multi_reads, single_reads)


def _check_runs(cfg: str, multi: str, single: str, multi_reads: str, single_reads: str) -> None:
    """The assertions on the finished two-process run ``multi`` and the one-process reference ``single``."""
    # checkpoints: written jointly, manifests by process 0, every step readable
    for step in (3, 6):
        step_dir = os.path.join(multi, "checkpoints", str(step))
        assert os.path.exists(os.path.join(step_dir, "manifest.json")), os.listdir(step_dir)
        reader = ckpt.Checkpointer(os.path.join(multi, "checkpoints"), async_save=False)
        assert reader.check(step) is None
        reader.close()

    # the same loss curve (process 0 logs; run 2 appends steps 4-6) and the same final parameters
    lm, ls = _losses(multi), _losses(single)
    assert sorted(lm) == sorted(ls) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([lm[s] for s in range(1, 7)], [ls[s] for s in range(1, 7)], rtol=1e-5, atol=1e-6)
    # (restored onto this process's first device: the 2-process checkpoint needs an explicit target)
    target = build_experiment(config_lib.load_config(cfg), make_mesh(1, 1, jax.devices()[:1])).abstract_sharded_state()
    finals = []
    for workdir in (multi, single):
        reader = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        finals.append(reader.restore(target))
        reader.close()
    (s_m, state_m, data_m, _), (s_s, state_s, data_s, _) = finals
    assert s_m == s_s == 6 and data_m == data_s
    for key in ("params", "ema_params"):
        leaves_m, leaves_s = jax.tree.leaves(getattr(state_m, key)), jax.tree.leaves(getattr(state_s, key))
        assert len(leaves_m) == len(leaves_s) > 0
        for a, b in zip(leaves_m, leaves_s):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    # data: process p read rows [p*B/2, (p+1)*B/2) of every global batch, nothing else
    ref = _reads(single_reads, 0)
    local = GLOBAL_BATCH // PROCESSES
    per_process = [_reads(multi_reads, pid) for pid in range(PROCESSES)]
    for pid, reads in enumerate(per_process):
        assert set(range(6)) <= set(reads), f"process {pid} never read batches {set(range(6)) - set(reads)}"
        for k in range(6):
            assert len(reads[k]) == local
            assert reads[k] == ref[k][pid * local:(pid + 1) * local], f"process {pid}, batch {k}"
    for k in range(6):
        assert not set(per_process[0][k]) & set(per_process[1][k])
        assert sorted(per_process[0][k] + per_process[1][k]) == sorted(ref[k])
