"""LPIPS (VGG16): parity with the ``lpips`` package, the weight loader, and its errors.

The reference is ``lpips.LPIPS(net="vgg", version="0.1")`` itself, with its shipped linear layers
(``lpips/weights/v0.1/vgg.pth``, real calibrated weights) on a RANDOM VGG16 trunk (no ImageNet
weights can be downloaded here). The random trunk is saved in torchvision's state-dict layout and
read back through :func:`jaxdiff.convert.lpips.load_lpips`, so the loader is covered too.

``lpips`` imports ``torchvision.models``; where torchvision cannot be imported (its PyPI wheels do
not load next to a ``+cpu`` torch) a stand-in module provides ``models.vgg16`` with torchvision's
``features`` layout (conv3x3 + ReLU stages of 2, 2, 3, 3, 3 convs, 2x2 max-pools).
"""
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
from module_stubs import temporary_modules

PARITY_RTOL = 1e-4
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_features(torch, seed: int):
    """torchvision's ``vgg16().features`` layout with random weights (He-normal, small random biases)."""
    nn = torch.nn
    torch.manual_seed(seed)
    layers, cin = [], 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(cin, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(conv.bias, 0.0, 0.05)
            layers += [conv, nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def _torchvision_standin(features):
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def vgg16(pretrained=False, weights=None, **kw):
        return types.SimpleNamespace(features=features)

    models.vgg16 = vgg16
    tv.models = models
    tv.__version__ = "0.0-standin"
    return tv


def _lpips_reference(torch, features):
    """``lpips.LPIPS(net="vgg")`` whose trunk is ``features`` (the shipped linear layers are loaded)."""
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("lpips not installed (parity extra: pip install --no-deps lpips)")
    for k in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
        del sys.modules[k]
    tv = _torchvision_standin(features)
    with temporary_modules({"torchvision": tv, "torchvision.models": tv.models}):
        lp = importlib.import_module("lpips")
        ref = lp.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    lin_path = os.path.join(os.path.dirname(lp.__file__), "weights", "v0.1", "vgg.pth")
    for k in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
        del sys.modules[k]
    return ref, lin_path


def _photo_pairs(size: int = 64):
    """Two real photos (sklearn's sample images), centre-cropped, area-downsampled to ``size``, in
    [-1, 1]; and distorted copies (noise + a shift + contrast change). NHWC float32."""
    from sklearn.datasets import load_sample_images
    imgs = []
    for im in load_sample_images().images:
        h, w, _ = im.shape
        s = min(h, w)
        crop = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].astype(np.float32)
        f = s // size
        crop = crop[:f * size, :f * size].reshape(size, f, size, f, 3).mean((1, 3))
        imgs.append(crop / 127.5 - 1.0)
    x = np.stack(imgs).astype(np.float32)
    rng = np.random.RandomState(0)
    y = np.clip(0.8 * np.roll(x, 2, axis=2) + 0.1 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory):
    torch = pytest.importorskip("torch")
    features = _vgg16_features(torch, seed=0)
    ref, lin_path = _lpips_reference(torch, features)
    vgg_path = str(tmp_path_factory.mktemp("lpips") / "vgg16-397923af.pth")
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)   # torchvision's file holds the classifier too
    torch.save(sd, vgg_path)
    return ref, vgg_path, lin_path


@pytest.mark.parity
def test_lpips_matches_lpips_package(lpips_pair):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from jaxdiff.convert.lpips import load_lpips

    ref, vgg_path, lin_path = lpips_pair
    model = load_lpips(vgg_path, lin_path)
    x, y = _photo_pairs(64)
    with torch.no_grad():
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        want, want_layers = ref(to_t(x), to_t(y), retPerLayer=True)
    want = want.numpy().reshape(-1)
    got, got_layers = model(jnp.asarray(x), jnp.asarray(y), per_layer=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=PARITY_RTOL, atol=1e-7)
    for g, w in zip(got_layers, want_layers):
        np.testing.assert_allclose(np.asarray(g), w.numpy().reshape(-1), rtol=PARITY_RTOL, atol=1e-7)
    assert np.all(want > 0)
    # a distance: 0 on identical inputs, symmetric
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(y), jnp.asarray(x))), want, rtol=PARITY_RTOL)


@pytest.mark.parity
def test_lpips_env_folder_and_gradient(lpips_pair, tmp_path, monkeypatch):
    """``$JAXDIFF_LPIPS_WEIGHTS`` names the folder; the loss's gradient is finite (also at x == y)."""
    import shutil

    import jax
    import jax.numpy as jnp
    from jaxdiff.convert.lpips import LIN_FILENAME, VGG_FILENAME, load_lpips

    _, vgg_path, lin_path = lpips_pair
    shutil.copy(vgg_path, tmp_path / VGG_FILENAME)
    shutil.copy(lin_path, tmp_path / LIN_FILENAME)
    monkeypatch.setenv("JAXDIFF_LPIPS_WEIGHTS", str(tmp_path))
    model = load_lpips()
    x, y = _photo_pairs(32)
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(model(a, b))))
    g = grad(jnp.asarray(y), jnp.asarray(x))
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
    g0 = grad(jnp.asarray(x), jnp.asarray(x))
    assert np.isfinite(np.asarray(g0)).all()


def test_load_lpips_missing_files(tmp_path, monkeypatch):
    from jaxdiff.convert.lpips import load_lpips

    monkeypatch.delenv("JAXDIFF_LPIPS_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="JAXDIFF_LPIPS_WEIGHTS.*never downloads|never downloads"):
        load_lpips()
    monkeypatch.setenv("JAXDIFF_LPIPS_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as e:
        load_lpips()
    assert "never downloads" in str(e.value) and "JAXDIFF_LPIPS_WEIGHTS" in str(e.value)
    with pytest.raises(FileNotFoundError, match="vgg.pth"):
        load_lpips(vgg_path=__file__, lin_path=tmp_path / "nope.pth")


def test_lpips_state_dict_errors():
    from flax import nnx
    from jaxdiff.convert.keys import CheckpointMismatchError
    from jaxdiff.convert.lpips import load_lpips_state_dict, vgg_lin_table
    from jaxdiff.nn.lpips import LPIPS

    model = LPIPS((4, 4, 8, 8, 8), rngs=nnx.Rngs(0))
    sd = {}
    for k, var in vgg_lin_table(model, {}).items():
        s = var.get_value().shape
        sd[k] = np.ones((s[3], s[2], s[0], s[1]) if len(s) == 4 else s, np.float32)
    load_lpips_state_dict(model, sd)
    assert float(model.lins[0].kernel[...].min()) == 1.0
    bad = dict(sd)
    bad["lin2.model.1.weight"] = -bad["lin2.model.1.weight"]
    with pytest.raises(ValueError, match="non-negative"):
        load_lpips_state_dict(model, bad)
    del bad["features.0.weight"]
    with pytest.raises(CheckpointMismatchError, match="features.0.weight"):
        load_lpips_state_dict(model, bad)


def test_lpips_input_checks():
    import jax.numpy as jnp
    from flax import nnx
    from jaxdiff.nn.lpips import LPIPS

    model = LPIPS((4, 4, 8, 8, 8), rngs=nnx.Rngs(0))
    assert all(float(l.kernel[...].min()) >= 0 for l in model.lins)
    x = jnp.zeros((2, 16, 16, 3))
    assert model(x, x + 0.1).shape == (2,)
    with pytest.raises(ValueError, match="too small"):
        model(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 16, 16)), jnp.zeros((1, 3, 16, 16)))
