"""The command-line programs: bad configs fail before any step with the key named, the checkpoint of a
step survives a failure while writing its samples, the installed console scripts work from any directory
with the configs shipped inside the package, evaluation of a samples.npz, and the TensorBoard events."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from test_train import ROOT, _env, data_dir, tiny_config, write_config  # noqa: F401  (fixture; ROOT on sys.path)

from jaxdiff.cli import compilation_cache_dir  # noqa: E402
from jaxdiff.cli import evaluate as evaluate_cli  # noqa: E402
from jaxdiff.cli import train as train_cli  # noqa: E402
from jaxdiff.train_lib import checkpoint as ckpt  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402
from jaxdiff.train_lib.loop import train  # noqa: E402


@pytest.mark.parametrize("override, needles", [
    ("--config.sample.solver=unipcc", ["unknown solver 'unipcc'", "unipc", "dpm_solver++", "'sample'"]),
    ("--config.sample.grid=uniform_x", ["unknown time grid 'uniform_x'", "uniform_logsnr", "optimized"]),
    ("--config.sample.solver_kwargs.ordr=2", ["bad options ['ordr'] for solver 'dpm_solver++'"]),
    ("--config.optim.lr=-0.001", ["'optim.lr' must be > 0, got -0.001"]),
    ("--config.optim.lr=fast", ["'optim.lr' must be a float, got 'fast'"]),
    ("--config.train.steps=0", ["'train.steps' must be >= 1, got 0"]),
    ("--config.loss.target=noise", ["'loss.target' must be one of", "'eps'", "got 'noise'"]),
    ("--config.train.batch_size=20", ["'train.batch_size' (20) must divide by 'train.grad_accum' (3)"]),
])
def test_bad_config_values_fail_before_the_first_step(tmp_path, data_dir, capsys, override, needles):
    cfg = write_config(tmp_path / "c.py", data_dir, train=dict(grad_accum=3, batch_size=18))
    work = tmp_path / "w"
    assert train_cli.main(["--config", cfg, "--workdir", str(work), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err      # one clear line, no traceback
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()


def test_guidance_without_label_dropout_fails_before_the_first_step(tmp_path, data_dir, capsys):
    cfg = write_config(tmp_path / "c.py", data_dir)
    work = tmp_path / "w"
    assert train_cli.main(["--config", cfg, "--workdir", str(work), "--config.train.label_dropout=0.0",
                           "--config.sample.guidance_scale=2.0"]) == 2
    err = capsys.readouterr().err
    assert "'sample.guidance_scale' needs a model trained with label dropout" in err, err
    assert not (work / "checkpoints").exists()


def test_shipped_configs_load_by_name_and_unknown_names_list_them():
    assert config_lib.load_config("digits").data.name == "digits/16"
    assert {"digits", "cifar10", "ae_digits", "ldm_digits"} <= set(config_lib.shipped_configs())
    with pytest.raises(ValueError, match=r"neither a file nor a shipped config; shipped: \[.*'digits'"):
        config_lib.load_config("digitz")


def test_a_failure_while_writing_samples_keeps_the_checkpoint_of_that_step(tmp_path, data_dir):
    work = tmp_path / "w"
    work.mkdir()
    (work / "samples").write_text("a file where the sample folder goes")    # save_grid cannot write there
    c = tiny_config(data_dir, train=dict(steps=2, sample_every=2), checkpoint=dict(every=2))
    c.sample.steps, c.sample.num = 2, 4
    with pytest.raises(OSError):
        train(c, str(work), devices=jax.devices()[:1])
    reader = ckpt.Checkpointer(str(work / "checkpoints"), async_save=False)
    assert reader.all_steps() == [2]
    reader.close()


def test_tensorboard_events_hold_the_logged_scalars(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    c = tiny_config(data_dir, train=dict(steps=2, log_every=1))
    train(c, str(tmp_path / "w"), devices=jax.devices()[:1])
    (path,) = glob.glob(str(tmp_path / "w" / "tensorboard" / "events.out.tfevents.*"))
    scalars = {}
    for event in LegacyEventFileLoader(path).Load():
        for v in event.summary.value:
            scalars[(event.step, v.tag)] = v.simple_value
    logged = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert scalars[(r["step"], "loss")] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars[(r["step"], "lr")] == pytest.approx(r["lr"], rel=1e-6)


def test_compilation_cache_folder_is_per_version_and_can_be_turned_off(monkeypatch, tmp_path):
    import jaxlib
    monkeypatch.setenv("JAXDIFF_COMPILATION_CACHE", str(tmp_path))
    assert compilation_cache_dir() == str(tmp_path / f"jax{jax.__version__}-jaxlib{jaxlib.__version__}")
    monkeypatch.setenv("JAXDIFF_COMPILATION_CACHE", "off")
    assert compilation_cache_dir() is None


def test_python_m_jaxdiff_names_its_programs():
    out = subprocess.run([sys.executable, "-m", "jaxdiff", "nonsense"], capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and "train,sample,evaluate" in out.stderr


def test_evaluate_scores_a_samples_file(tmp_path, data_dir):
    from jaxdiff.data.digits import load_digits_arrays
    ref = str(tmp_path / "ref.npz")
    assert evaluate_cli.main(["--write_ref_stats", ref, "--dataset", "digits/16", "--split", "test", "--features",
                              "digits", "--data_dir", str(data_dir), "--quiet"]) == 0
    images, labels = load_digits_arrays("train", 16)
    real = images[:200].astype(np.float32) / 127.5 - 1.0
    noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
    results = {}
    for name, images in (("real", real), ("noise", noise)):
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels[:200])
        out = str(tmp_path / f"{name}.json")
        assert evaluate_cli.main(["--samples", str(tmp_path / f"{name}.npz"), "--features", "digits", "--ref_stats",
                                  ref, "--ref_features", ref[:-4] + "_features.npz", "--out", out, "--kid_subsets",
                                  "5", "--kid_subset_size", "100", "--quiet"]) == 0
        results[name] = json.load(open(out))
    r, n = results["real"], results["noise"]
    assert r["num_fake"] == 200 and r["source"].endswith("real.npz")
    # real training digits score close to the held-out split, uniform noise far from it
    assert 0 < 10 * r["frechet_distance"] < n["frechet_distance"], (r["frechet_distance"], n["frechet_distance"])
    assert r["precision"] > 0.5 > n["precision"] + 0.4 and r["recall"] > 0.5 > n["recall"] + 0.4, (r, n)


@pytest.mark.slow
def test_installed_console_scripts_work_from_any_directory(tmp_path):
    """``pip install`` of a wheel into a fresh venv, then from an empty directory: jaxdiff-train with a
    shipped config by name, and jaxdiff-sample from its workdir (the package's own code and configs, not
    this checkout's: asserted through the module paths)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), ROOT], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bindir = venv / "bin"
    purelib = subprocess.run([str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this environment's site-packages (not its editable jaxdiff: a path
    # added by a .pth file is not a site dir, so the editable finder there is not run)
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = glob.glob(str(wheels / "jaxdiff-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "--no-deps",
                    "--no-index", "-q", wheel], check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    where = subprocess.run([str(bindir / "python"), "-c", "import jaxdiff, jaxdiff.configs as c; "
                            "print(jaxdiff.__file__); print(c.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where
    data = tmp_path / "tfds"
    run = subprocess.run([str(bindir / "jaxdiff-train"), "--config", "digits", "--workdir", "w",
                          "--config.train.steps=20", f"--config.data.data_dir={data}"],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "first step done" in run.stderr
    run = subprocess.run([str(bindir / "jaxdiff-sample"), "--workdir", "w", "--num", "4", "--steps", "3"],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (out,) = glob.glob(str(empty / "w" / "sample_*" / "samples.npz"))
    assert np.load(out)["images"].shape == (4, 16, 16, 1)
