"""SADM (jaxdiff.research.sadm): the structural distance, the two-player step (a zero weight is the
diffusion step; the discriminator ascends the distance), the task in the training loop (discriminator and
its optimizer checkpointed and resumed bitwise; sampled like a diffusion run), its config errors, and the
2-D mixture's metrics."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from test_train import _final_params, data_dir, tiny_config  # noqa: F401  (fixture; also puts ROOT on sys.path)

from jaxdiff import losses  # noqa: E402
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.research import sadm  # noqa: E402
from jaxdiff.research.sadm import mixture  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402
from jaxdiff.train_lib import loop as train_loop  # noqa: E402
from jaxdiff.train_lib.step import make_train_step  # noqa: E402
from jaxdiff.train_lib.writer import read_metrics  # noqa: E402


# --- the structural distance ------------------------------------------------------------------------

def test_structural_distance_compares_relations_not_positions():
    f = jax.random.normal(jax.random.key(0), (8, 5))
    d = lambda a, b: float(sadm.structural_distance(a, b, 0.2))
    assert d(f, f) == pytest.approx(0.0, abs=1e-6)
    # the same relations: a rotated and rescaled copy of the batch (cosine affinities) is at distance 0
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(1), (5, 5))))
    assert d(f, 3.0 * f @ jnp.asarray(q, jnp.float32)) == pytest.approx(0.0, abs=1e-5)
    # other relations: positive, bounded by 2 / temperature, and the rows must pair up
    g = jax.random.normal(jax.random.key(2), (8, 5))
    assert 0.05 < d(f, g) <= 2 / 0.2
    perm = np.random.default_rng(0).permutation(8)
    assert d(f[perm], g[perm]) == pytest.approx(d(f, g), rel=1e-5)
    logp = sadm.affinity_log_probs(f, 0.2)
    np.testing.assert_allclose((np.exp(logp) * (1 - np.eye(8))).sum(1), 1.0, atol=1e-5)   # rows: j != i sum to 1
    with pytest.raises(ValueError, match="pair up row by row"):
        sadm.structural_distance(f, g[:7], 0.2)
    with pytest.raises(ValueError, match="at least 3"):
        sadm.structural_distance(f[:2], g[:2], 0.2)


# --- the step -----------------------------------------------------------------------------------------

def _mixture_step_parts(weight, start=0):
    setup = mixture.MixtureSetup(hidden=16, depth=1, weight=weight)
    apply, encode, params, disc_params = mixture.mixture_model(setup, 0)
    process = make_process("vp_cosine")
    opt, dopt = optax.adam(1e-2), optax.adam(1e-2)
    sched = optax.constant_schedule(1e-2)
    step = sadm.make_sadm_step(apply, encode, process, opt, dopt, sched, target="v", weight=weight,
                               temperature=0.1, start=start)
    state = sadm.create_sadm_state(params, disc_params, opt, dopt, 3)
    x0 = mixture.grid_mixture().sample(jax.random.key(4), 32).astype(jnp.float32)
    return apply, process, opt, sched, step, state, {"image": x0}


def test_zero_weight_is_the_diffusion_step_and_the_discriminator_ascends():
    apply, process, opt, sched, step, state, batch = _mixture_step_parts(0.0)
    plain = make_train_step(apply, losses.make_denoising_loss(process, target="v"), opt, sched, conditional=False)
    from jaxdiff.train_lib.state import create_state
    s_plain = create_state(state.params, opt, 3)
    s1, m1 = jax.jit(step)(state, batch)
    s2, m2 = jax.jit(plain)(s_plain, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(m1["structure"]) == 0.0
    for a, b in zip(jax.tree.leaves(s1.disc_params), jax.tree.leaves(state.disc_params)):
        np.testing.assert_array_equal(a, b)      # weight 0: the discriminator is not updated

    # weight > 0: before `start` the discriminator stays put; from `start` on its steps raise the distance
    _, _, _, _, step, state, batch = _mixture_step_parts(0.5, start=1)
    step = jax.jit(step)
    s, m0 = step(state, batch)
    assert float(m0["on"]) == 0.0 and float(m0["loss"]) == pytest.approx(float(m0["dsm"]))
    for a, b in zip(jax.tree.leaves(s.disc_params), jax.tree.leaves(state.disc_params)):
        np.testing.assert_array_equal(a, b)
    d = []
    for _ in range(6):
        s, m = step(s, batch)
        d.append(float(m["structure"]))
    assert float(m["on"]) == 1.0 and float(m["disc_grad_norm"]) > 0
    assert float(m["loss"]) == pytest.approx(float(m["dsm"]) + 0.5 * d[-1], rel=1e-5)
    assert d[-1] > d[0], d


# --- the task in the training loop ----------------------------------------------------------------------

def sadm_config(data_dir, steps, checkpoint=2, **sadm_values):  # noqa: F811
    c = tiny_config(data_dir, train=dict(steps=steps, batch_size=8, label_dropout=0.1, log_every=1, sample_every=0,
                                         ema_decay=0.9),
                    optim=dict(lr=1e-3, warmup_steps=0, schedule="constant"), checkpoint=dict(every=checkpoint))
    c.task = "sadm"
    c.sadm.disc_channels = 4
    c.sadm.start = 1
    for k, v in sadm_values.items():
        c.sadm[k] = v
    return c


@pytest.mark.slow      # 27 s of the default suite on 2 cores; the step-level checks above stay default
def test_sadm_task_trains_and_resumes_bitwise(tmp_path, data_dir):  # noqa: F811
    one = jax.devices()[:1]
    every = dict(checkpoint=1)
    train_loop.train(sadm_config(data_dir, 3, **every), str(tmp_path / "straight"), devices=one)
    m = [r for r in read_metrics(str(tmp_path / "straight")) if "structure" in r]
    assert [r["on"] for r in m] == [0.0, 1.0, 1.0]
    assert m[0]["structure"] > 0 and m[0]["disc_grad_norm"] == 0 and all(r["disc_grad_norm"] > 0 for r in m[1:])
    train_loop.train(sadm_config(data_dir, 2, **every), str(tmp_path / "resumed"), devices=one)
    train_loop.train(sadm_config(data_dir, 3, **every), str(tmp_path / "resumed"), devices=one)
    (s1, a), (s2, b) = _final_params(str(tmp_path / "straight")), _final_params(str(tmp_path / "resumed"))
    assert s1 == s2 == 3
    keys = ("params", "ema_params", "opt_state", "disc_params", "disc_opt_state")
    assert set(a) >= set(keys)
    for key in keys:
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            np.testing.assert_array_equal(x, y)
    # the discriminator moved from its initialisation
    from flax import nnx
    from jaxdiff.research.sadm.experiment import build_structure_encoder
    init = nnx.to_pure_dict(build_structure_encoder(sadm_config(data_dir, 3))[1])
    assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a["disc_params"]), jax.tree.leaves(init))) > 0


@pytest.mark.slow
def test_a_sadm_run_samples_like_a_diffusion_run(tmp_path, data_dir):  # noqa: F811
    from jaxdiff.parallel import make_mesh
    from jaxdiff.sampling import Sampler, SamplerSettings
    from jaxdiff.train_lib.experiment import load_sampling_model
    one = jax.devices()[:1]
    train_loop.train(sadm_config(data_dir, 2), str(tmp_path / "run"), devices=one)
    model, mesh = load_sampling_model(str(tmp_path / "run"), mesh=make_mesh(1, 1, one))
    images = Sampler(model, SamplerSettings.resolve({"solver": "ddim", "steps": 2}), mesh)(
        model.params, np.arange(4) % 10, jax.random.key(0), num=4)
    assert images.shape == (4, 16, 16, 1) and np.all(np.isfinite(images))


def test_sadm_config_errors(tmp_path, data_dir, monkeypatch):  # noqa: F811
    def fails(match, **sadm_values):
        with pytest.raises(ValueError, match=match):
            train_loop.train(sadm_config(data_dir, 1, **sadm_values), str(tmp_path / "x"), devices=jax.devices()[:1])
    fails(r"'sadm.weight' must be >= 0", weight=-0.1)
    fails(r"'sadm.temperature' must be > 0", temperature=0.0)
    fails(r"'sadm.disc_layers'=3 is too deep for 16x16", disc_layers=3)
    c = sadm_config(data_dir, 1)
    with pytest.raises(ValueError, match=r"unknown config key 'sadm.lambda'"):
        config_lib.apply_overrides(c, ["--config.sadm.lambda=1"])
    c.train.grad_accum = 2
    with pytest.raises(ValueError, match="'train.grad_accum' must be 1 for task='sadm'"):
        train_loop.train(c, str(tmp_path / "y"), devices=jax.devices()[:1])
    from jaxdiff.train_lib import experiment
    monkeypatch.delitem(experiment.TASKS, "sadm")
    with pytest.raises(ValueError, match=r"task 'sadm' has no registered experiment.*jaxdiff.research.sadm"):
        train_loop.train(sadm_config(data_dir, 1), str(tmp_path / "z"), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "x" / "checkpoints" / "1")


# --- the 2-D mixture's metrics ---------------------------------------------------------------------------

def test_mixture_metrics_tell_a_covering_model_from_a_collapsed_one():
    mix = mixture.grid_mixture()
    real = np.asarray(mix.sample(jax.random.key(0), 1000))
    good = mixture.mixture_metrics(np.asarray(mix.sample(jax.random.key(1), 1000)), mix, real)
    assert good["coverage"] == 1.0 and good["hq_rate"] > 0.97 and good["precision"] > 0.9 and good["recall"] > 0.9
    one_mode = np.asarray(mix.means[12]) + 0.05 * np.asarray(jax.random.normal(jax.random.key(2), (1000, 2)))
    bad = mixture.mixture_metrics(one_mode, mix, real)
    assert bad["coverage"] == pytest.approx(1 / 25) and bad["recall"] < 0.1 and bad["mmd2"] > 20 * good["mmd2"]
    blurred = np.asarray(mix.sample(jax.random.key(3), 1000)) + 0.3 * np.asarray(jax.random.normal(jax.random.key(4), (1000, 2)))
    assert mixture.mixture_metrics(blurred, mix, real)["hq_rate"] < 0.3
