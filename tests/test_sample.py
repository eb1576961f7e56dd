"""sample.py and train_lib.sampling on a tiny trained digits model: determinism across chunking and
device counts, output files, and clear errors for bad requests."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

from test_train import ROOT, tiny_config  # noqa: F401  (also puts ROOT on sys.path)

from jaxdiff.cli import sample as sample_cli  # noqa: E402
from jaxdiff.train_lib import loop as train_loop  # noqa: E402
from jaxdiff.parallel import make_mesh  # noqa: E402
from jaxdiff.sampling import Sampler, SamplerSettings, sample_images, time_grid  # noqa: E402
from jaxdiff.train_lib.experiment import restore_run  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step class-conditional run with label dropout."""
    from jaxdiff.data import build_digits
    base = tmp_path_factory.mktemp("sample")
    build_digits(str(base / "tfds"), 16)
    c = tiny_config(base / "tfds", train=dict(steps=6, label_dropout=0.2))
    train_loop.train(c, str(base / "cfg"), devices=jax.devices()[:1])
    return {"cfg": str(base / "cfg")}


def _sampler(exp, mesh, class_null=True, **kw):
    model = dataclasses.replace(exp.sampling_model(), class_null=class_null)
    return Sampler(model, SamplerSettings(solver="dpm_solver++", steps=5, **kw), mesh)


def test_samples_do_not_depend_on_chunking_or_device_count(runs):
    exp, state, step = restore_run(runs["cfg"], task="diffusion", mesh=make_mesh(1, 1, jax.devices()[:1]))
    assert step == 6
    labels = np.arange(12) % 10
    one = _sampler(exp, exp.mesh, guidance_scale=2.0)
    whole = sample_images(one, labels, 12, seed=3, batch=12, params=state.ema_params)
    chunked = sample_images(one, labels, 12, seed=3, batch=5, params=state.ema_params)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    exp8, state8, _ = restore_run(runs["cfg"], task="diffusion", mesh=make_mesh(4, 2))
    eight = sample_images(_sampler(exp8, exp8.mesh, guidance_scale=2.0), labels, 12, seed=3, batch=12, params=state8.ema_params)
    np.testing.assert_allclose(eight, whole, rtol=1e-5, atol=1e-5)
    other_seed = sample_images(one, labels, 12, seed=4, batch=12, params=state.ema_params)
    assert np.abs(other_seed - whole).max() > 1e-2
    # guidance changes the samples; scale 1 equals plain conditional sampling
    plain = sample_images(_sampler(exp, exp.mesh), labels, 12, seed=3, batch=12, params=state.ema_params)
    g1 = sample_images(_sampler(exp, exp.mesh, guidance_scale=1.0), labels, 12, seed=3, batch=12, params=state.ema_params)
    np.testing.assert_allclose(g1, plain, rtol=1e-5, atol=1e-5)
    assert np.abs(plain - whole).max() > 1e-4


def test_sample_script_writes_grid_npz_and_json(runs, tmp_path):
    out = tmp_path / "out"
    rc = sample_cli.main(["--workdir", runs["cfg"], "--num", "20", "--steps", "4", "--solver", "unipc",
                             "--grid", "time_quadratic", "--labels", "3,7", "--out", str(out)])
    assert rc == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (20, 16, 16, 1)
    np.testing.assert_array_equal(data["labels"], np.resize([3, 7], 20))
    assert (out / "samples.png").stat().st_size > 100
    meta = json.loads((out / "sample.json").read_text())
    assert meta["solver"] == "unipc" and meta["steps"] == 4 and meta["checkpoint_step"] == 6


def test_bad_sampling_requests_are_named(runs, tmp_path, capsys):
    assert sample_cli.main(["--workdir", runs["cfg"], "--labels", "3,12", "--out", str(tmp_path)]) == 2
    assert "labels must lie in [0, 10)" in capsys.readouterr().err
    assert sample_cli.main(["--workdir", str(tmp_path / "nothing")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert sample_cli.main(["--workdir", runs["cfg"], "--solver", "rk45", "--out", str(tmp_path)]) == 2
    assert "rk45" in capsys.readouterr().err
    exp, _, _ = restore_run(runs["cfg"], task="diffusion", mesh=make_mesh(1, 1, jax.devices()[:1]))
    with pytest.raises(ValueError, match="trained with label dropout"):
        _sampler(exp, exp.mesh, class_null=False, guidance_scale=2.0)
    with pytest.raises(ValueError, match="grid 'optimized' exists for solvers"):
        time_grid(exp.process, "optimized", 10, "ddim")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        time_grid(exp.process, "uniform_t", 0)


@pytest.mark.parity
def test_sampling_a_diffusers_folder(tmp_path):
    """A diffusers UNet2DModel + scheduler saved by diffusers: the schedule maps to the same alphas_cumprod,
    and sample.py draws from the converted model."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.convert.scheduler import process_from_scheduler_config, read_scheduler_config
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    unet.save_pretrained(tmp_path / "unet")
    for sched in (diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015,
                                          num_train_timesteps=500, prediction_type="v_prediction"),
                  diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")):
        sched.save_pretrained(tmp_path / "scheduler")
        process, prediction = process_from_scheduler_config(read_scheduler_config(str(tmp_path)))
        n = sched.config.num_train_timesteps
        t = (np.arange(n) + 1.0) / n
        ours = np.asarray(process.alpha(t), np.float64) ** 2
        np.testing.assert_allclose(ours, sched.alphas_cumprod.double().numpy(), rtol=1e-4)  # diffusers: float32
    assert prediction == "eps"
    out = tmp_path / "out"
    assert sample_cli.main(["--diffusers", str(tmp_path), "--num", "4", "--steps", "3", "--out", str(out)]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (4, 8, 8, 3) and np.all(np.isfinite(images))
    with pytest.raises(ValueError, match="unsupported beta_schedule"):
        process_from_scheduler_config({"beta_schedule": "sigmoid"})


def test_sample_script_takes_a_learned_grid_file(runs, tmp_path, capsys):
    """--grid learned:PATH: the file's times are sampled on (its step count when --steps is unset); a file
    learned for another solver or option is refused with the difference named."""
    from jaxdiff.solvers import make_solver
    from jaxdiff.timesteps import make_grid, save_grid
    exp, _, _ = restore_run(runs["cfg"], task="diffusion", mesh=make_mesh(1, 1, jax.devices()[:1]))
    times = make_grid("time_quadratic", exp.process, 4)
    path = str(tmp_path / "grid.json")
    save_grid(path, times, process=exp.process, solver=make_solver("unipc", order=2), solver_name="unipc", nfe=4)
    args = ["--workdir", runs["cfg"], "--num", "10", "--solver", "unipc", "--solver_kwargs", '{"order": 2}']
    assert sample_cli.main(args + ["--grid", f"learned:{path}", "--out", str(tmp_path / "a")]) == 0
    assert sample_cli.main(args + ["--grid", "time_quadratic", "--steps", "4", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in ("a", "b"))
    np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "a" / "sample.json").read_text())["steps"] == 4
    capsys.readouterr()
    assert sample_cli.main(["--workdir", runs["cfg"], "--num", "2", "--solver", "unipc", "--grid",
                            f"learned:{path}", "--out", str(tmp_path / "c")]) == 2
    assert "order" in capsys.readouterr().err
    assert sample_cli.main(args + ["--grid", "learned:" + str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
