"""Cascaded diffusion (jaxdiff.cascade): the super-resolution UNet's inputs, the low-res conditioning and its
Gaussian augmentation in the train step, cascade sampling (chunking, truncation), the errors for stages that do
not fit together and augmentation levels outside the trained range, and exact resume of a super-resolution run."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_train import (ROOT, _env, _final_params, _run, _steps_logged, _wait_for, data_dir,  # noqa: F401
                        tiny_config, write_config)

from jaxdiff.cascade import (CascadeStage, augment, cascade_samplers, check_cascade, downsample,  # noqa: E402
                             sample_cascade, training_condition)
from jaxdiff.nn import UNet, UNetConfig  # noqa: E402
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.parallel import make_mesh  # noqa: E402
from jaxdiff.sampling import Sampler, SamplerSettings  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402
from jaxdiff.train_lib.experiment import build_experiment  # noqa: E402

TINY_MODEL = dict(block_out_channels=(8, 16), layers_per_block=1, down_attention=(None, None),
                  mid_attention=None, norm_num_groups=4)


def _sr_unet(**kw):
    cfg = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                     down_attention=(None, None), mid_attention=None, norm_num_groups=4, low_res_channels=1,
                     aug_level_embedding=True, **kw)
    return UNet(cfg, rngs=nnx.Rngs(0))


def test_super_resolution_unet_uses_low_res_and_aug_level_and_names_bad_inputs():
    net = _sr_unet()
    # the zero-initialised output conv would hide every input: perturb every parameter away from its init
    state = nnx.state(net, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(net, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), state))
    # one call, three rows: the same x and t; row 1 changes the low-res image, row 2 the augmentation level
    x = jnp.repeat(jax.random.normal(jax.random.key(2), (1, 8, 8, 1)), 3, axis=0)
    low = jnp.repeat(jax.random.normal(jax.random.key(3), (1, 4, 4, 1)), 3, axis=0).at[1].add(1.0)
    out = net(x, 200.0, low_res=low, aug_level=jnp.array([0.0, 0.0, 300.0]))
    assert out.shape == (3, 8, 8, 1)
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[0], out[2])
    with pytest.raises(ValueError, match="super-resolution model: pass low_res"):
        net(x, 1.0, aug_level=jnp.zeros(3))
    with pytest.raises(ValueError, match="dividing the input's 8x8"):
        net(x, 1.0, low_res=jnp.zeros((3, 3, 3, 1)), aug_level=jnp.zeros(3))
    with pytest.raises(ValueError, match="pass aug_level"):
        net(x, 1.0, low_res=low)
    plain = UNet(UNetConfig(in_channels=1, out_channels=1, **TINY_MODEL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a super-resolution model"):
        plain(x, 1.0, low_res=low)


def test_downsample_matches_the_pipelines_resize_and_augmentation_draws_its_level():
    from jaxdiff.data.digits import load_digits_arrays
    from jaxdiff.data.transforms import resize, to_unit_range
    images, _ = load_digits_arrays("test", 16)
    pil = to_unit_range(np.stack([resize(im, 8, 8) for im in images[:100]]))
    ours = np.asarray(downsample(jnp.asarray(to_unit_range(images[:100])), 8))
    assert np.sqrt(np.mean((ours - pil) ** 2)) < 2.5 / 127.5       # within ~1.3/255 RMS of Pillow's bicubic
    with pytest.raises(ValueError, match="must divide"):
        downsample(jnp.zeros((1, 16, 16, 1)), 5)
    process = make_process("vp_cosine")
    x = jnp.asarray(to_unit_range(images[:64]))
    clean = training_condition(process, 8)(jax.random.key(0), x)
    np.testing.assert_allclose(clean["low_res"], downsample(x, 8), atol=1e-6)     # aug_max = 0: no corruption
    np.testing.assert_allclose(clean["aug_level"], process.model_time(jnp.zeros(64)))
    noisy = training_condition(process, 8, 0.5, 0.5)(jax.random.key(0), x)
    eps = (noisy["low_res"] - process.alpha(0.5) * downsample(x, 8)) / process.sigma(0.5)
    assert 0.9 < float(jnp.std(eps)) < 1.1 and abs(float(jnp.mean(eps))) < 0.1
    levels = training_condition(process, 8, 0.1, 0.4)(jax.random.key(0), x)["aug_level"]
    lo, hi = process.model_time(0.1), process.model_time(0.4)
    assert float(levels.min()) >= lo - 1e-3 and float(levels.max()) <= hi + 1e-3 and float(jnp.std(levels)) > 10
    with pytest.raises(ValueError, match="augmentation range"):
        training_condition(process, 8, 0.5, 0.2)


def _config(data_dir, size, low_res=None, aug=(0.0, 0.0), **model):
    c = tiny_config(data_dir, model=dict(TINY_MODEL, **model))
    c.data.image_size = size
    c.data.crop = "resize"
    c.cascade.low_res_size = low_res
    c.cascade.aug_min, c.cascade.aug_max = aug
    return c


def test_bad_cascade_config_values_are_named(data_dir):
    for change, match in [(dict(low_res_size=6), "must be smaller than and divide"),
                          (dict(low_res_size=16), "must be smaller than and divide"),
                          (dict(low_res_size=8, aug_max=1.5), "cascade.aug_max"),
                          (dict(low_res_size=8, aug_min=0.3, aug_max=0.2), "cascade.aug_max")]:
        c = _config(data_dir, 16)
        for k, v in change.items():
            c.cascade[k] = v
        with pytest.raises(ValueError, match=match):
            config_lib.validate(c)
    c = _config(data_dir, 16, 8)
    c.train.sample_every = 5
    with pytest.raises(ValueError, match="sample_every"):
        config_lib.validate(c)


@pytest.fixture(scope="module")
def stages(data_dir):
    """Untrained tiny models (sampling checks need no training): base 8x8, SR 8->16 (aug [0, 0.5], label
    dropout) and a SR 4->8 that does not fit on the base."""
    mesh = make_mesh(1, 1, jax.devices()[:1])
    out = {}
    for name, size, low, aug in [("base", 8, None, (0.0, 0.0)), ("sr", 16, 8, (0.0, 0.5)),
                                 ("sr_from4", 8, 4, (0.0, 0.0))]:
        exp = build_experiment(_config(data_dir, size, low, aug), mesh)
        out[name] = dataclasses.replace(exp.sampling_model(exp.init_params), source=name)
    return out


@pytest.mark.slow      # 21 s on 2 cores; the stage and level checks stay default
def test_cascade_samples_do_not_depend_on_chunking_and_truncation_runs(stages):
    s2 = SamplerSettings(steps=2)
    cascade = [CascadeStage(stages["base"], s2), CascadeStage(stages["sr"], SamplerSettings(steps=2, guidance_scale=2.0),
                                                              aug_level=0.3)]
    labels = np.arange(5) % 10
    samplers = cascade_samplers(cascade)
    whole = sample_cascade(cascade, labels, 5, seed=3, batch=5, samplers=samplers)
    chunked = sample_cascade(cascade, labels, 5, seed=3, batch=2)
    with pytest.raises(ValueError, match="one per stage"):
        sample_cascade(cascade, labels, 5, samplers=samplers[:1])
    assert [o.shape for o in whole] == [(5, 8, 8, 1), (5, 16, 16, 1)]
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, atol=1e-4)
    truncated = sample_cascade([cascade[0], dataclasses.replace(cascade[1], truncate=True)], labels, 5, seed=3)
    assert np.all(np.isfinite(truncated[1])) and not np.allclose(truncated[0], whole[0], atol=1e-3)


def test_stages_that_do_not_fit_and_levels_outside_the_trained_range_are_named(stages):
    base, sr, sr4 = stages["base"], stages["sr"], stages["sr_from4"]
    with pytest.raises(ValueError, match=r"takes \(4, 4, 1\) low-resolution images but stage 0 \(base\) makes "
                                         r"\(8, 8, 1\)"):
        check_cascade([CascadeStage(base), CascadeStage(sr4)])
    with pytest.raises(ValueError, match="first stage of a cascade must be a base model"):
        check_cascade([CascadeStage(sr), CascadeStage(sr)])
    with pytest.raises(ValueError, match=r"0.7 lies outside \[0, 0.5\]"):
        check_cascade([CascadeStage(base), CascadeStage(sr, aug_level=0.7)])
    with pytest.raises(ValueError, match="is not a super-resolution model"):
        check_cascade([CascadeStage(base), CascadeStage(base)])
    sampler = Sampler(sr, SamplerSettings(steps=2))
    labels = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=r"low-resolution images of shape \(2, 8, 8, 1\), got \(2, 16, 16, 1\)"):
        sampler(sr.params, labels, jax.random.key(0), low_res=np.zeros((2, 16, 16, 1)), aug_level=0.1)
    with pytest.raises(ValueError, match=r"lies outside \[0, 0.5\]"):
        sampler(sr.params, labels, jax.random.key(0), low_res=np.zeros((2, 8, 8, 1)), aug_level=-0.1)
    with pytest.raises(ValueError, match="super-resolution model: pass low_res"):
        sampler(sr.params, labels, jax.random.key(0))


def test_augment_is_alpha_x_plus_sigma_eps():
    p = make_process("vp_cosine")
    x, e = jnp.ones((2, 4, 4, 1)), jnp.full((2, 4, 4, 1), 2.0)
    z = augment(p, x, jnp.array([0.0, 0.5]), e)
    np.testing.assert_allclose(z[0], x[0], atol=1e-6)
    np.testing.assert_allclose(z[1], p.alpha(0.5) + 2 * p.sigma(0.5), rtol=1e-5)


@pytest.mark.slow
def test_sample_cli_runs_a_cascade_and_names_a_bad_stage(tmp_path, data_dir, capsys):
    from jaxdiff.cli import sample as sample_cli
    from jaxdiff.train_lib import loop as train_loop
    dev = jax.devices()[:1]
    base, sr = str(tmp_path / "base"), str(tmp_path / "sr")
    for workdir, size, low in ((base, 8, None), (sr, 16, 8)):
        c = _config(data_dir, size, low, (0.0, 0.4))
        c.train.steps = 2
        train_loop.train(c, workdir, devices=dev)
    out = str(tmp_path / "out")
    assert sample_cli.main(["--cascade", f"{base},{sr}", "--stage", "steps=2", "--stage", "steps=2,aug_level=0.2",
                            "--num", "4", "--out", out]) == 0
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["images"].shape == (4, 16, 16, 1)
    assert sample_cli.main(["--cascade", f"{base},{sr}", "--stage", "steps=2", "--stage", "aug_level=0.9",
                            "--num", "4", "--out", out]) == 2
    assert "outside [0, 0.4]" in capsys.readouterr().err
    assert sample_cli.main(["--cascade", f"{sr},{base}", "--num", "4", "--out", out]) == 2
    assert "first stage of a cascade must be a base model" in capsys.readouterr().err


@pytest.mark.slow
def test_super_resolution_run_resumes_bitwise_exactly(tmp_path, data_dir):
    """A SR run (augmentation on) stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one."""
    steps = 14
    cfg = write_config(tmp_path / "sr.py", data_dir, train=dict(steps=steps), checkpoint=dict(every=3),
                       data=dict(image_size=16), cascade=dict(low_res_size=8, aug_min=0.0, aug_max=0.5))
    ref = _run(["--config", cfg, "--workdir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    work = str(tmp_path / "interrupted")
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg, "--workdir", work]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _steps_logged(work) >= 2, proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: saved step" in err, err[-3000:]
    done = _run(["--config", cfg, "--workdir", work])
    assert done.returncode == 0 and "resumed from step" in done.stderr, done.stderr[-3000:]
    (s_ref, a), (s_int, b) = _final_params(str(tmp_path / "ref")), _final_params(work)
    assert s_ref == s_int == steps
    for key in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key])):
            np.testing.assert_array_equal(x, y)
