"""Evaluation: uint8 quantization vs torchvision's PNG path, the Inception FeatureExtractor (direct call,
padding, 8-device sharding, grey input), and evaluate.py end to end with the digits classifier
(reference statistics of digits/16 test, a run's checkpoint scored against them, bad inputs)."""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdiff.cli import evaluate  # noqa: E402
from jaxdiff import evaluation  # noqa: E402
from jaxdiff.metrics.features import extract, metrics_from_features  # noqa: E402
from jaxdiff.metrics.quantize import quantize_uint8  # noqa: E402

# ----------------------------------------------------------------------------------------------
# quantization


def _torch_save_image_uint8(torch, x):
    """torchvision.utils.save_image(x, normalize=True, value_range=(-1, 1))'s float -> uint8 steps
    (make_grid's norm_ip, then save_image's ndarr line), on a float32 tensor."""
    t = torch.from_numpy(np.array(x, np.float32))
    t = t.clamp(min=-1.0, max=1.0)
    t = t.sub_(-1.0).div_(max(1.0 - (-1.0), 1e-5))
    return t.mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8).numpy()


def _tricky_values():
    rs = np.random.RandomState(0)
    ties = (np.arange(256, dtype=np.float64) + 0.5) / 127.5 - 1.0           # (x + 1) * 127.5 = k + 0.5
    levels = np.arange(256, dtype=np.float64) / 127.5 - 1.0                  # exact uint8 levels
    near = levels[:, None] + np.array([-1e-7, -3e-8, 3e-8, 1e-7])[None]      # around the levels
    return np.concatenate([ties, levels, near.ravel(), rs.uniform(-1, 1, 20000), [-1.0, 1.0, 0.0]]
                          ).astype(np.float32)


def test_quantize_uint8_matches_torchvision_and_png_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    x = _tricky_values()
    got = quantize_uint8(x)
    want = _torch_save_image_uint8(torch, x)
    assert got.dtype == np.uint8 and got.shape == x.shape
    np.testing.assert_array_equal(got, want)
    # round-half-up: the float32 ties go up, unlike np.round's half-to-even (differences <= 1 level)
    alt = np.clip(np.round((x.astype(np.float32) + 1) * np.float32(127.5)), 0, 255).astype(np.uint8)
    assert np.abs(alt.astype(int) - got.astype(int)).max() <= 1
    # clip=True clamps like save_image
    wild = np.array([-3.0, -1.2, 1.2, 40.0, 0.3], np.float32)
    np.testing.assert_array_equal(quantize_uint8(wild, clip=True), _torch_save_image_uint8(torch, wild))
    # an NHWC batch through PIL's PNG writer and back: lossless, so the PNG holds exactly these bytes
    imgs = np.random.RandomState(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    u8 = quantize_uint8(imgs)
    Image.fromarray(u8[0]).save(tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), u8[0])
    # dataset images (uint8 -> x / 127.5 - 1, the training pipeline) quantize back to themselves
    from jaxdiff.data.transforms import to_unit_range
    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantize_uint8(to_unit_range(levels)), levels)
    assert quantize_uint8(levels) is levels


def test_quantize_uint8_rejects_bad_ranges():
    with pytest.raises(ValueError, match=r"outside \[-1, 1\].*\[0, 255\]"):
        quantize_uint8(np.array([0.0, 128.0, 255.0], np.float32))
    with pytest.raises(ValueError, match=r"outside \[-1, 1\].*clip"):
        quantize_uint8(np.array([-1.0, 1.5], np.float32))
    assert quantize_uint8(np.array([1.005], np.float32))[0] == 255           # within the tolerance
    with pytest.raises(ValueError, match="non-finite"):
        quantize_uint8(np.array([0.0, np.nan], np.float32), clip=True)
    with pytest.raises(ValueError, match="dtype int64"):
        quantize_uint8(np.array([0, 1]))


# ----------------------------------------------------------------------------------------------
# Inception extractor


def _random_inception():
    """InceptionV3FID with random O(1)-activation weights, filled from numpy (fast: no per-layer init)."""
    from flax import nnx
    from jaxdiff.nn.inception import InceptionV3FID
    model = nnx.eval_shape(lambda: InceptionV3FID(rngs=None))
    rs = np.random.RandomState(0)

    def fill(path, v):
        name = str(getattr(path[-2], "key", path[-2]))
        if name == "kernel":
            a = rs.standard_normal(v.shape) * np.sqrt(2.0 / np.prod(v.shape[:-1]))
        elif name == "scale":
            a = rs.uniform(0.5, 1.5, v.shape)
        elif name == "var":
            a = rs.uniform(0.5, 2.0, v.shape)
        else:  # bias, mean
            a = rs.uniform(-0.2, 0.2, v.shape)
        return jnp.asarray(a, jnp.float32)

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
    return model


@pytest.fixture(scope="module")
def inception():
    """(model, images (3, 16, 16, 3) with image 2 grey, direct jitted (features, logits))."""
    from flax import nnx
    model = _random_inception()
    rs = np.random.RandomState(2)
    x = rs.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    x[2] = np.repeat(x[2, :, :, :1], 3, axis=-1)
    f, lg = nnx.jit(lambda m, a: m(a, return_logits=True))(model, jnp.asarray(x))
    return model, x, np.asarray(f), np.asarray(lg)


def test_inception_extractor_equals_module_padded_and_sharded(inception):
    from jax.sharding import NamedSharding
    from jaxdiff.extractors import inception_extractor
    from jaxdiff.metrics.inception import inception_sharding

    model, x, want_f, want_l = inception
    assert np.abs(want_f).mean() > 0.05, "degenerate random features"
    ext = inception_extractor(model, image_size=16)
    assert ext.name == "inception_v3_fid" and ext.is_inception and (ext.input_size, ext.channels) == (16, 3)
    f, lg = extract(ext, x, batch_size=2)                       # 2 batches, the last one padded
    assert f.shape == (3, 2048) and lg.shape == (3, 1008)
    np.testing.assert_allclose(f, want_f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lg, want_l, atol=1e-5, rtol=0)
    assert len(jax.devices()) == 8
    sh = inception_sharding(8)
    assert isinstance(sh, NamedSharding) and len(sh.device_set) == 8
    fs, ls = extract(ext, x, batch_size=8, sharding=sh)        # padded to 8, one image per device
    np.testing.assert_allclose(fs, f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ls, lg, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
        inception_sharding(12)
    # the metrics of the inception feature space carry the FID / KID / IS aliases (small D: fast)
    m = metrics_from_features(f[:, :2], f[::-1, :2] + 0.1, lg, feature_space=ext.name, k=1, kid_subsets=2,
                              is_splits=2)
    assert m["fid"] == m["frechet_distance"] and m["kid"] == m["kid_mean"] and "inception_score" in m


def test_inception_extractor_grey_and_bad_input(inception):
    from jaxdiff.extractors import inception_extractor

    model, x, want_f, _ = inception
    grey = inception_extractor(model, image_size=16, channels=1, logits=False)
    f, lg = extract(grey, x[2:, :, :, :1], batch_size=1)        # repeated to RGB, as PIL convert("RGB")
    assert lg is None
    np.testing.assert_allclose(f[0], want_f[2], atol=1e-5, rtol=0)
    rgb = inception_extractor(model, image_size=16)
    with pytest.raises(ValueError, match=r"expected images \(B, 16, 16, 3\).*\(2, 32, 32, 3\)"):
        extract(rgb, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected images \(B, 16, 16, 3\).*\(2, 16, 16, 1\)"):
        extract(rgb, np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="channels must be 1 .* or 3, got 4"):
        inception_extractor(model, image_size=16, channels=4)
    with pytest.raises(ValueError, match="weights must be an InceptionV3FID, a path or None"):
        inception_extractor(42)


def test_inception_extractor_missing_weights_says_where(tmp_path, monkeypatch):
    from jaxdiff.convert.inception import WEIGHTS_ENV
    from jaxdiff.extractors import inception_extractor
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV):
        inception_extractor()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        inception_extractor(str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------------
# evaluate.py with the digits classifier


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxdiff.data import build_digits
    d = tmp_path_factory.mktemp("tfds")
    build_digits(str(d), 16)
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    """A training run folder holding the step-0 checkpoint of a tiny class-conditional digits/16 model,
    written as train.py writes its checkpoints (config, data state, sharded state)."""
    from test_train import tiny_config
    from jaxdiff import parallel
    from jaxdiff.train_lib import checkpoint as ckpt
    from jaxdiff.train_lib import config as config_lib
    from jaxdiff.train_lib.experiment import build_experiment
    c = tiny_config(data_dir)
    workdir = tmp_path_factory.mktemp("run")
    exp = build_experiment(c, parallel.make_mesh(1, 1, jax.devices()[:1]))
    writer = ckpt.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    writer.save(0, exp.init_state(), {"next": 0}, config_lib.to_dict(c))
    writer.wait()
    writer.close()
    return str(workdir)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, data_dir):
    """evaluate.py --write_ref_stats for digits/16 test -> (stats path, features path, printed summary)."""
    out = str(tmp_path_factory.mktemp("ref") / "digits16_test.npz")
    rc = evaluate.main(["--write_ref_stats", out, "--dataset", "digits/16", "--split", "test", "--features",
                        "digits", "--data_dir", str(data_dir), "--batch", "128", "--quiet"])
    assert rc == 0
    return out, evaluation.features_path_for(out)


def test_write_ref_stats_digits_and_read_back(ref):
    from jaxdiff.data.digits import load_digits_arrays
    from jaxdiff.metrics import FeatureStats, load_stats
    from jaxdiff.extractors import digits_classifier

    stats_path, feats_path = ref
    assert feats_path.endswith("digits16_test_features.npz")
    mu, sigma = load_stats(stats_path, dim=64)
    with np.load(feats_path) as z:
        feats = z["features"]
        assert str(z["feature_space"]) == "digits_classifier_16"
    assert feats.shape == (360, 64) and feats.dtype == np.float32
    mu_f, sig_f = FeatureStats.from_features(feats).mu_sigma()
    np.testing.assert_allclose(mu, mu_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma, sig_f, rtol=1e-4, atol=1e-4)
    # the same statistics as the classifier on the split's arrays (every example once, no flip/shuffle)
    images, _ = load_digits_arrays("test", 16)
    direct, _ = extract(digits_classifier(16), images, batch_size=120)
    mu_d, sig_d = FeatureStats.from_features(direct).mu_sigma()
    np.testing.assert_allclose(mu, mu_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sigma, sig_d, rtol=1e-3, atol=1e-3)


def test_evaluate_end_to_end_digits(tmp_path, run_dir, ref):
    stats_path, feats_path = ref
    out = str(tmp_path / "eval.json")
    args = ["--workdir", run_dir, "--features", "digits", "--ref_stats", stats_path, "--ref_features", feats_path,
            "--num", "24", "--batch", "8", "--steps", "2", "--kid_subsets", "5", "--quiet"]
    # an untrained model's samples leave [-1, 1] (without --clip an error naming the range: see
    # test_quantize_uint8_rejects_bad_ranges); --clip clamps them as save_image does
    assert evaluate.main(args + ["--out", out, "--clip"]) == 0
    with open(out) as f:
        r = json.load(f)
    for key in ("frechet_distance", "kid_mean", "kid_std", "precision", "recall", "classifier_score_mean"):
        assert isinstance(r[key], float) and np.isfinite(r[key]), key
    assert r["num_fake"] == 24 and r["num_real"] == 360 and r["feature_space"] == "digits_classifier_16"
    assert r["checkpoint_step"] == 0 and r["steps"] == 2 and r["clip"] and "fid" not in r
    assert r["clipped_fraction"] > 0 and r["devices"] == 8
    assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    # 24 samples < 64 feature dims: named in the warnings
    assert any("24 samples <= feature dim 64" in w for w in r["warnings"]), r["warnings"]


def test_evaluate_reference_errors(tmp_path, run_dir, ref, capsys):
    stats_path, feats_path = ref
    base = ["--workdir", run_dir, "--features", "digits", "--num", "8", "--batch", "8", "--steps", "1", "--quiet"]

    def fails(extra, *needles):
        assert evaluate.main(base + extra) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, (n, err)

    fails([], "give the reference")
    bad_keys = str(tmp_path / "bad_keys.npz")
    np.savez(bad_keys, m=np.zeros(64), s=np.eye(64))
    fails(["--ref_stats", bad_keys], "missing key(s) ['mu', 'sigma']")
    wrong_dim = str(tmp_path / "inception_like.npz")
    np.savez(wrong_dim, mu=np.zeros(2048), sigma=np.eye(2048))
    fails(["--ref_stats", wrong_dim], "feature dim 2048, expected 64")
    fails(["--ref_stats", str(tmp_path / "none.npz")], "does not exist")
    other_space = str(tmp_path / "other_features.npz")
    np.savez(other_space, features=np.zeros((10, 64), np.float32), feature_space=np.asarray("inception_v3_fid"))
    fails(["--ref_features", other_space], "space 'inception_v3_fid'", "digits_classifier_16")
    fails(["--ref_stats", stats_path, "--features", "inception", "--inception_weights", str(tmp_path / "x.pth")],
          "FID Inception weights not found")
    assert evaluate.main(["--write_ref_stats", str(tmp_path / "o.npz"), "--dataset", "digits/16"]) == 2
    assert "needs --dataset and --split" in capsys.readouterr().err


def test_build_extractor_rejects_wrong_images():
    with pytest.raises(evaluation.EvalError, match="grey .* of size 16 or 32, got 64x64x3"):
        evaluation.build_extractor("digits", image_size=64, channels=3)
    with pytest.raises(evaluation.EvalError, match="1-channel .* or 3-channel images, got 4"):
        evaluation.build_extractor("inception", image_size=64, channels=4)


@pytest.mark.slow
@pytest.mark.parity
def test_quantized_samples_match_pytorch_fid_on_png_files(tmp_path):
    """Float samples -> quantize_uint8 -> inception extractor == save_image-style PNG files read as
    pytorch-fid reads them (``Image.open(p).convert("RGB")``, ``ToTensor``) -> pytorch-fid's network,
    same random weights; RGB and grey (repeated to RGB) images. ~30 s on 2 CPU cores."""
    torch = pytest.importorskip("torch")
    from PIL import Image
    import test_inception as ti
    from jaxdiff.convert.inception import load_inception_fid
    from jaxdiff.extractors import inception_extractor

    pfid = ti._import_pytorch_fid_inception(torch)
    sd = ti._random_fid_state_dict(pfid, torch)
    original = pfid.load_state_dict_from_url
    pfid.load_state_dict_from_url = lambda *a, **k: sd
    try:
        ref = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    finally:
        pfid.load_state_dict_from_url = original
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, str(path))
    model = load_inception_fid(str(path))
    rs = np.random.RandomState(0)
    for ch in (3, 1):
        x = np.clip(rs.normal(0, 0.6, (3, 32, 32, ch)), -1.05, 1.05).astype(np.float32)  # a little out of range
        u8 = _torch_save_image_uint8(torch, x)
        files = []
        for i, a in enumerate(u8):
            files.append(tmp_path / f"{ch}_{i}.png")
            Image.fromarray(a[..., 0] if ch == 1 else a).save(files[-1])
        arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]).astype(np.float32) / 255
        with torch.no_grad():
            want = ref(torch.from_numpy(arr.transpose(0, 3, 1, 2).copy()))[0][:, :, 0, 0].numpy()
        ext = inception_extractor(model, image_size=32, channels=ch, logits=False)
        got, _ = extract(ext, quantize_uint8(x, clip=True), batch_size=3)
        err = float(np.abs(got - want).max())
        assert err <= 1e-5, f"{ch} channels: max abs error {err}"
