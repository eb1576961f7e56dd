"""train.py end to end on the real digits TFDS dataset (built locally in a temp dir): configs, resume
exactness across SIGTERM and SIGKILL, damaged checkpoints, non-finite losses, a full disk, and sharded
training on a (data=4, fsdp=2) mesh against one device."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdiff.cli import train as train_cli  # noqa: E402
from jaxdiff.train_lib import loop as train_loop  # noqa: E402
from jaxdiff.train_lib import checkpoint as ckpt  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402

TINY = dict(
    model=dict(block_out_channels=(8, 16), layers_per_block=1, down_attention=(None, None),
               mid_attention=None, norm_num_groups=4),
    train=dict(steps=6, batch_size=16, log_every=1, sample_every=0, ema_decay=0.9),
    optim=dict(lr=1e-3, warmup_steps=2, schedule="constant"),
    checkpoint=dict(every=2, keep=3),
)


def tiny_config(data_dir, **sections):
    """The digits default shrunk to a ~10k-parameter model and 6 steps."""
    c = config_lib.default_config()
    c.data.data_dir = str(data_dir)
    for section, values in {**TINY, **sections}.items():
        for k, v in values.items():
            c[section][k] = v
    return c


def write_config(path, data_dir, **sections):
    """A config file (what train.py reads) equal to ``tiny_config``."""
    merged = {s: dict(TINY.get(s, {}), **sections.get(s, {})) for s in set(TINY) | set(sections)}
    body = textwrap.dedent(f"""
        from jaxdiff.train_lib.config import default_config
        def get_config():
            c = default_config()
            c.data.data_dir = {str(data_dir)!r}
            for section, values in {merged!r}.items():
                for k, v in values.items():
                    c[section][k] = v
            return c
        """)
    path.write_text(body)
    return str(path)


@pytest.fixture(scope="session")   # read-only; session: built once per worker however tests are scheduled
def data_dir(tmp_path_factory):
    from jaxdiff.data import build_digits
    d = tmp_path_factory.mktemp("tfds")
    build_digits(str(d), 16)
    return d


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _final_params(workdir, step=None):
    reader = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        s = step if step is not None else reader.all_steps()[-1]
        out = reader._manager.restore(s, args=ckpt.ocp.args.Composite(
            state=ckpt.ocp.args.StandardRestore()))
    finally:
        reader.close()
    return s, out.state


def _wait_for(predicate, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _steps_logged(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    return max((r["step"] for r in lines), default=0)


# --- configs -------------------------------------------------------------------------------------

def test_unknown_config_keys_list_the_valid_ones(tmp_path, data_dir):
    c = config_lib.default_config()
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz'.*'steps'"):
        config_lib.apply_overrides(c, ["--config.train.stepz=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'optimizer'.*'optim'"):
        config_lib.apply_overrides(c, ["optimizer.lr=1"])
    with pytest.raises(ValueError, match=r"config key 'train.steps' must be an int, got 'abc'"):
        config_lib.apply_overrides(c, ["train.steps=abc"])
    bad = tmp_path / "bad.py"
    bad.write_text("from jaxdiff.train_lib.config import default_config\n"
                   "def get_config():\n    c = default_config()\n    c.train.lr = 1.0\n    return c\n")
    with pytest.raises(ValueError, match="sets a key the schema lacks"):
        config_lib.load_config(str(bad))
    with pytest.raises(ValueError, match=r"unknown config key 'data.nme'.*'name'"):
        config_lib.validate(config_lib.ConfigDict({"data": {"nme": "x"}}))
    # the command line reports it too, with exit status 2
    cfg = write_config(tmp_path / "tiny.py", data_dir)
    assert train_cli.main(["--config", cfg, "--workdir", str(tmp_path / "w"), "--config.train.stepz=1"]) == 2


def test_config_round_trips_through_a_checkpoint_dict(data_dir):
    c = tiny_config(data_dir)
    back = config_lib.config_from_dict(json.loads(json.dumps(config_lib.to_dict(c))))
    assert back.model.block_out_channels == (8, 16)
    assert config_lib.to_dict(back) == config_lib.to_dict(c)


def test_shipped_configs_load_and_validate():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py") and not name.startswith("_"):
            c = config_lib.load_config(os.path.join(ROOT, "configs", name))
            assert c.train.steps > 0, name


# --- checkpoints -----------------------------------------------------------------------------------

def _tree(v):
    return {"w": np.full((64, 33), v, np.float32), "b": {"c": np.arange(7, dtype=np.int32) + int(v)}}


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    c = ckpt.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=True)
    for step in (1, 2, 3):
        c.save(step, _tree(step), {"next_batch": step}, {"seed": 0})
    c.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0))
    assert c.restore(abstract)[0] == 3
    # truncate a data file of step 3 and flip a byte in one of step 2
    files3 = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ck" / "3" / "state") for f in fs
              if os.path.getsize(os.path.join(r, f)) > 100 and "/d/" in os.path.join(r, f)]
    assert files3
    with open(files3[0], "r+b") as f:
        f.truncate(os.path.getsize(files3[0]) // 2)
    assert "truncated" in c.check(3)
    files2 = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ck" / "2" / "state") for f in fs
              if "/d/" in os.path.join(r, f)]
    with open(files2[0], "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    assert "CRC" in c.check(2)
    with pytest.warns(UserWarning, match="step 3.*damaged"):
        step, state, data, config = c.restore(abstract)
    assert step == 1 and data == {"next_batch": 1}
    np.testing.assert_array_equal(state["w"], _tree(1)["w"])
    # with every step damaged: a clear error, nothing silently returned
    os.remove(os.path.join(tmp_path / "ck" / "1" / "manifest.json"))
    for r, _, fs in os.walk(tmp_path / "ck" / "1" / "state"):
        for f in fs:
            if "/d/" in os.path.join(r, f):
                open(os.path.join(r, f), "wb").close()
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        c.restore(abstract)
    c.close()


def test_full_disk_fails_loudly_and_keeps_existing_checkpoints(tmp_path):
    """A save that hits the file-size limit (what a full disk looks like to the writer) raises
    CheckpointError naming the step; the checkpoint already there still restores bit for bit."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, numpy as np
        sys.path.insert(0, {ROOT!r})
        from jaxdiff.train_lib import checkpoint as ckpt
        c = ckpt.Checkpointer({str(tmp_path / 'ck')!r}, async_save=True)
        c.save(1, {{"w": np.ones((256, 256), np.float32)}}, {{"next_batch": 1}}, {{}})
        c.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            c.save(2, {{"w": np.random.rand(256, 256).astype(np.float32)}}, {{"next_batch": 2}}, {{}})
            c.wait()
        except ckpt.CheckpointError as e:
            print("FAILED:", e)
        """)
    out = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert "FAILED: saving the checkpoint of step 2" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "were not modified" in out.stdout
    c = ckpt.Checkpointer(str(tmp_path / "ck"), async_save=False)
    assert c.all_steps() == [1]
    step, state, data, _ = c.restore({"w": jax.ShapeDtypeStruct((256, 256), np.float32)})
    assert step == 1 and data == {"next_batch": 1}
    np.testing.assert_array_equal(state["w"], np.ones((256, 256), np.float32))
    c.close()


# --- training ----------------------------------------------------------------------------------------

def test_nonfinite_loss_stops_with_the_step_and_saves_nothing_bad(tmp_path, data_dir):
    c = tiny_config(data_dir, optim=dict(lr=1e30, warmup_steps=0, clip_norm=0.0),
                    train=dict(steps=20), checkpoint=dict(every=1))
    with pytest.raises(train_loop.NonFiniteLossError, match=r"NaN/inf at step \d+") as err:
        train_loop.train(c, str(tmp_path / "w"), devices=jax.devices()[:1])
    bad = int(str(err.value).split("at step ")[1].split(";")[0])
    reader = ckpt.Checkpointer(str(tmp_path / "w" / "checkpoints"), async_save=False)
    steps = reader.all_steps()
    reader.close()
    assert all(s <= bad for s in steps)
    for s in steps:
        _, state = _final_params(str(tmp_path / "w"), s)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_sharded_training_matches_one_device(tmp_path, data_dir):
    """(data=4, fsdp=2) on 8 host devices vs 1 device: same loss curve and parameters (float tolerance)."""
    one = train_loop.train(tiny_config(data_dir, mesh=dict(data=1, fsdp=1)), str(tmp_path / "one"),
                             devices=jax.devices()[:1])
    eight = train_loop.train(tiny_config(data_dir, mesh=dict(data=4, fsdp=2)), str(tmp_path / "eight"))
    from jaxdiff.train_lib.writer import read_metrics
    l1 = [r["loss"] for r in read_metrics(str(tmp_path / "one"))]
    l8 = [r["loss"] for r in read_metrics(str(tmp_path / "eight"))]
    assert len(l1) == len(l8) == 6
    np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(eight["params"])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # the 8-device checkpoint restores on one device and the other way round
    from jaxdiff.parallel import make_mesh
    from jaxdiff.train_lib.experiment import build_experiment
    exp1 = build_experiment(tiny_config(data_dir), make_mesh(1, 1, jax.devices()[:1]))
    reader = ckpt.Checkpointer(str(tmp_path / "eight" / "checkpoints"), async_save=False)
    step, state, _, _ = reader.restore(exp1.abstract_sharded_state())
    reader.close()
    assert step == 6 and len(jax.tree.leaves(state.params)[0].sharding.device_set) == 1
    for a, b in zip(jax.tree.leaves(eight["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exp8 = build_experiment(tiny_config(data_dir, mesh=dict(data=4, fsdp=2)), make_mesh(4, 2))
    reader = ckpt.Checkpointer(str(tmp_path / "one" / "checkpoints"), async_save=False)
    _, state8, _, _ = reader.restore(exp8.abstract_sharded_state())
    reader.close()
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state8.params))
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(state8.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_then_sigkill_resume_is_bitwise_exact(tmp_path, data_dir):
    """Uninterrupted run vs a run stopped by SIGTERM (checkpoint at that step, exit 0), resumed, killed
    with SIGKILL at a random later step, and resumed again: bitwise equal parameters at the end."""
    rng = np.random.default_rng(int(time.time()))
    steps = 14
    cfg = write_config(tmp_path / "tiny.py", data_dir, train=dict(steps=steps), checkpoint=dict(every=3))
    ref = _run(["--config", cfg, "--workdir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]

    work = str(tmp_path / "interrupted")
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg, "--workdir", work]
    # 1) SIGTERM once a few steps are done: exit 0 with a checkpoint at the step it stopped at
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _steps_logged(work) >= 2, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(err.split("SIGTERM: saved step ")[1].split(";")[0])
    assert 2 <= stopped < steps
    reader = ckpt.Checkpointer(os.path.join(work, "checkpoints"), async_save=False)
    assert reader.all_steps()[-1] == stopped
    reader.close()
    # 2) resume, SIGKILL at a random later step
    kill_at = int(rng.integers(stopped + 1, steps - 1))
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _steps_logged(work) >= kill_at, proc), proc.communicate()[1][-3000:]
    proc.kill()
    proc.communicate()
    # 3) resume to the end
    done = _run(["--config", cfg, "--workdir", work])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stderr
    s_ref, ref_state = _final_params(str(tmp_path / "ref"))
    s_int, int_state = _final_params(work)
    assert s_ref == s_int == steps
    for key in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(ref_state[key]), jax.tree.leaves(int_state[key])):
            np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_one_big_batch():
    """With a loss that ignores the key, A micro-batches give the update of one batch (same EMA, Adam)."""
    import jax.numpy as jnp
    from jaxdiff.train_lib.optim import make_optimizer
    from jaxdiff.train_lib.state import create_state
    from jaxdiff.train_lib.step import make_train_step

    def apply(params, x, t, labels, dropout_key=None):
        return x * params["w"] + params["b"][labels][:, None, None, None]

    def loss_fn(apply_fn, x0, key):
        weight = 1 + jnp.abs(x0).mean(axis=(1, 2, 3))   # per example, not per position in the batch
        return jnp.mean((apply_fn(x0, jnp.zeros(x0.shape[0])) - 0.5) ** 2, axis=(1, 2, 3)) * weight

    optim = config_lib.default_config().optim
    opt, sched = make_optimizer(optim, 10)
    params = {"w": jnp.full((4, 4, 1), 0.3, jnp.float32), "b": jnp.linspace(-1, 1, 11).astype(jnp.float32)}
    batch = {"image": jax.random.normal(jax.random.key(0), (12, 4, 4, 1), jnp.float32),
             "label": jnp.arange(12, dtype=jnp.int32) % 10}
    outs = []
    for accum in (1, 2, 3):
        step = jax.jit(make_train_step(apply, loss_fn, opt, sched, grad_accum=accum, label_dropout=0.0,
                                       null_class=10))
        state = create_state(params, opt, 0)
        for _ in range(3):
            state, metrics = step(state, batch)
        outs.append((state, metrics))
    for state, metrics in outs[1:]:
        np.testing.assert_allclose(metrics["loss"], outs[0][1]["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(outs[0][0].params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not divisible by grad_accum=5"):
        jax.jit(make_train_step(apply, loss_fn, opt, sched, grad_accum=5, null_class=10))(
            create_state(params, opt, 0), batch)


@pytest.mark.slow      # 3-7 min on 2 cores (this bf16 + dropout + accumulation step compiles slowly); the default
# suite keeps bf16 compute (test_nn_unet), dropout keying and accumulation = one big batch (tests here)
def test_bfloat16_dropout_and_accumulation_train(tmp_path, data_dir):
    c = tiny_config(data_dir, model=dict(dtype="bfloat16", dropout=0.1), train=dict(steps=3, grad_accum=2))
    out = train_loop.train(c, str(tmp_path / "bf16"), devices=jax.devices()[:1])
    assert out["step"] == 3 and np.isfinite(out["final_loss"])
    assert {np.asarray(x).dtype for x in jax.tree.leaves(out["params"])} == {np.dtype(np.float32)}


def test_dropout_is_keyed_in_training_and_off_in_evaluation(data_dir):
    import jax.numpy as jnp
    from flax import nnx
    from jaxdiff.nn.functional import make_apply, split_model
    from jaxdiff.train_lib.model import build_model
    graphdef, params, rest = split_model(build_model(tiny_config(data_dir, model=dict(dropout=0.3))))
    apply = jax.jit(make_apply(graphdef, rest))
    params = nnx.to_pure_dict(params)
    x, t, y = jnp.ones((2, 16, 16, 1), jnp.float32), jnp.full((2,), 500.0), jnp.array([1, 2])
    a, b = apply(params, x, t, y, jax.random.key(0)), apply(params, x, t, y, jax.random.key(1))
    again = apply(params, x, t, y, jax.random.key(0))
    e1, e2 = apply(params, x, t, y), apply(params, x, t, y)
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, again)
    np.testing.assert_array_equal(e1, e2)
    assert float(jnp.abs(a - e1).max()) > 1e-3
