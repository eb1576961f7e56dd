"""FID Inception-v3: parity with pytorch-fid, the resize step, and the weight loader's errors.

The reference is pytorch-fid's own ``InceptionV3`` (``use_fid_inception=True``) with random
weights and random non-trivial BatchNorm statistics: its weight download is replaced by a random
state dict of the right layout, which is also saved as a ``.pth`` file and converted with
:func:`jaxdiff.convert.inception.load_inception_fid`.

pytorch-fid subclasses torchvision's Inception blocks. Where torchvision cannot be imported (the
PyPI torchvision wheels are linked against CUDA builds of torch and fail to load next to a
``+cpu`` torch), pytorch-fid is imported against :func:`_torchvision_standin`, a minimal stand-in
with torchvision's ``Inception3``/``InceptionA..E`` layer definitions (the FID patches, the block
assembly, the resize and the normalisation still come from pytorch-fid itself).
"""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

from jaxdiff.convert.keys import CheckpointMismatchError
from module_stubs import temporary_modules

ATOL_FEATURES = 1e-4
ATOL_RESIZE = 1e-5


# ----------------------------------------------------------------------------------------------
# pytorch-fid reference


def _torchvision_standin(torch):
    """A ``torchvision`` module object with just what ``pytorch_fid.inception`` touches:
    ``__version__``, ``models.inception_v3`` and ``models.inception.InceptionA..E`` (torchvision
    0.28's layer definitions; the forwards of A/C/E are pytorch-fid's FID overrides)."""
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def convs(module, table):
        for name, cin, cout, kw in table:
            setattr(module, name, BasicConv2d(cin, cout, **kw))

    k1, k3 = dict(kernel_size=1), dict(kernel_size=3)
    k3p = dict(kernel_size=3, padding=1)
    k3s = dict(kernel_size=3, stride=2)
    k17, k71 = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    k13, k31 = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))

    class InceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            convs(self, [("branch1x1", cin, 64, k1), ("branch5x5_1", cin, 48, k1),
                         ("branch5x5_2", 48, 64, dict(kernel_size=5, padding=2)),
                         ("branch3x3dbl_1", cin, 64, k1), ("branch3x3dbl_2", 64, 96, k3p),
                         ("branch3x3dbl_3", 96, 96, k3p), ("branch_pool", cin, pool_features, k1)])

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            convs(self, [("branch3x3", cin, 384, k3s), ("branch3x3dbl_1", cin, 64, k1),
                         ("branch3x3dbl_2", 64, 96, k3p), ("branch3x3dbl_3", 96, 96, k3s)])

        def forward(self, x):
            a = self.branch3x3(x)
            b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, cin, channels_7x7):
            super().__init__()
            c = channels_7x7
            convs(self, [("branch1x1", cin, 192, k1), ("branch7x7_1", cin, c, k1), ("branch7x7_2", c, c, k17),
                         ("branch7x7_3", c, 192, k71), ("branch7x7dbl_1", cin, c, k1),
                         ("branch7x7dbl_2", c, c, k71), ("branch7x7dbl_3", c, c, k17),
                         ("branch7x7dbl_4", c, c, k71), ("branch7x7dbl_5", c, 192, k17),
                         ("branch_pool", cin, 192, k1)])

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            convs(self, [("branch3x3_1", cin, 192, k1), ("branch3x3_2", 192, 320, k3s),
                         ("branch7x7x3_1", cin, 192, k1), ("branch7x7x3_2", 192, 192, k17),
                         ("branch7x7x3_3", 192, 192, k71), ("branch7x7x3_4", 192, 192, k3s)])

        def forward(self, x):
            a = self.branch3x3_2(self.branch3x3_1(x))
            b = x
            for m in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                b = m(b)
            return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, cin):
            super().__init__()
            convs(self, [("branch1x1", cin, 320, k1), ("branch3x3_1", cin, 384, k1),
                         ("branch3x3_2a", 384, 384, k13), ("branch3x3_2b", 384, 384, k31),
                         ("branch3x3dbl_1", cin, 448, k1), ("branch3x3dbl_2", 448, 384, k3p),
                         ("branch3x3dbl_3a", 384, 384, k13), ("branch3x3dbl_3b", 384, 384, k31),
                         ("branch_pool", cin, 192, k1)])

    class Inception3(nn.Module):
        def __init__(self, num_classes=1000, aux_logits=True, **_):
            super().__init__()
            assert not aux_logits, "the stand-in has no auxiliary head"
            convs(self, [("Conv2d_1a_3x3", 3, 32, k3s), ("Conv2d_2a_3x3", 32, 32, k3),
                         ("Conv2d_2b_3x3", 32, 64, k3p), ("Conv2d_3b_1x1", 64, 80, k1),
                         ("Conv2d_4a_3x3", 80, 192, k3)])
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
            self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
            self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280), InceptionE(2048)
            self.fc = nn.Linear(2048, num_classes)

    def inception_v3(*, weights=None, progress=True, **kw):
        assert weights is None, "the stand-in has no pretrained weights"
        return Inception3(**kw)

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.28.0"
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = types.ModuleType("torchvision.models.inception")
    for cls in (BasicConv2d, Inception3, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE):
        setattr(tv.models.inception, cls.__name__, cls)
    tv.models.inception_v3 = inception_v3
    return tv


def _import_pytorch_fid_inception(torch):
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid not installed (parity extra)")
    if "pytorch_fid.inception" in sys.modules:
        return sys.modules["pytorch_fid.inception"]
    try:
        import torchvision  # noqa: F401
        return importlib.import_module("pytorch_fid.inception")
    except Exception:  # torchvision missing, or its compiled ops do not load with this torch
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    tv = _torchvision_standin(torch)
    with temporary_modules({"torchvision": tv, "torchvision.models": tv.models,
                   "torchvision.models.inception": tv.models.inception}):
        return importlib.import_module("pytorch_fid.inception")


def _random_fid_state_dict(pfid, torch, seed=0) -> dict:
    """A state dict in the layout of pytorch-fid's weight file, filled with random values that
    keep activations O(1): He-normal kernels, BatchNorm scale/shift/mean/var away from 1/0/0/1."""
    layout = pfid._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v.clone()
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            sd[k] = 0.4 * torch.rand(v.shape, generator=g) - 0.2
        elif k.endswith("running_var"):
            sd[k] = 0.5 + 1.5 * torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
        elif k == "fc.bias":
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            raise AssertionError(f"unexpected key in torchvision's layout: {k}")
    return sd


@pytest.fixture(scope="module")
def fid_pair(tmp_path_factory):
    """(pytorch-fid InceptionV3 with random weights, torch state dict, path of its .pth file)."""
    torch = pytest.importorskip("torch")
    pfid = _import_pytorch_fid_inception(torch)
    sd = _random_fid_state_dict(pfid, torch)
    original = pfid.load_state_dict_from_url
    pfid.load_state_dict_from_url = lambda *a, **k: sd  # no download: the random weights instead
    try:
        ref = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    finally:
        pfid.load_state_dict_from_url = original
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, str(path))
    return ref, sd, str(path)


def _torch_features(torch, ref, sd, x01_nchw):
    with torch.no_grad():
        feats = ref(torch.from_numpy(x01_nchw))[0][:, :, 0, 0]
        logits = torch.nn.functional.linear(feats, sd["fc.weight"], sd["fc.bias"])
    return feats.numpy(), logits.numpy()


# ----------------------------------------------------------------------------------------------
# parity


@pytest.mark.parity
def test_features_and_logits_match_pytorch_fid(fid_pair):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from flax import nnx
    from jaxdiff.convert.inception import load_inception_fid
    from jaxdiff.nn.inception import InceptionV3FID

    ref, sd, path = fid_pair
    model = load_inception_fid(path)
    assert isinstance(model, InceptionV3FID)
    run = nnx.jit(lambda m, x: m(x, return_logits=True))

    # float images in [-1, 1] (jaxdiff) <-> the same images in [0, 1] (pytorch-fid)
    x01 = np.random.RandomState(1).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    want_f, want_l = _torch_features(torch, ref, sd, x01)
    got_f, got_l = run(model, jnp.asarray(2 * x01.transpose(0, 2, 3, 1) - 1))
    assert got_f.shape == (2, 2048) and got_l.shape == (2, 1008)
    assert np.abs(want_f).mean() > 0.05, "degenerate reference features"
    err_f = float(np.abs(np.asarray(got_f) - want_f).max())
    err_l = float(np.abs(np.asarray(got_l) - want_l).max())
    assert err_f <= ATOL_FEATURES, f"pool3 features: max abs error {err_f}"
    assert err_l <= ATOL_FEATURES, f"logits: max abs error {err_l}"

    # uint8 images in [0, 255] <-> x / 255 (a non-square size: separate height/width resizes)
    u8 = np.random.RandomState(2).randint(0, 256, (2, 24, 40, 3)).astype(np.uint8)
    want_f, _ = _torch_features(torch, ref, sd, (u8.astype(np.float32) / 255).transpose(0, 3, 1, 2))
    got_f = model(jnp.asarray(u8))
    err_u8 = float(np.abs(np.asarray(got_f) - want_f).max())
    assert err_u8 <= ATOL_FEATURES, f"uint8 input: max abs error {err_u8}"


@pytest.mark.parity
@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (299, 299), (512, 333)])
def test_resize_matches_torch_interpolate(hw):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from jaxdiff.nn.inception import resize_bilinear

    x = np.random.RandomState(hw[0]).uniform(0, 1, (2, 3) + hw).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                                           align_corners=False).numpy()
    got = np.asarray(resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), 299)).transpose(0, 3, 1, 2)
    assert got.dtype == np.float32 and got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= ATOL_RESIZE, f"resize {hw} -> 299: max abs error {err}"


# ----------------------------------------------------------------------------------------------
# loader errors (no torch needed except where a .pth file is written)


def test_missing_file_says_where_to_get_it(tmp_path, monkeypatch):
    from jaxdiff.convert.inception import WEIGHTS_ENV, load_inception_fid, resolve_weights_path

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV) as e:
        load_inception_fid()
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and "does not download" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception_fid(tmp_path / "nope.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))  # a folder without the file
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights_path()
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")
    assert resolve_weights_path() == str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def _layout_state_dict():
    """Zero numpy state dict with pytorch-fid's keys and shapes, from jaxdiff's own table."""
    from flax import nnx
    from jaxdiff.convert.inception import inception_variable_table
    from jaxdiff.convert.keys import expected_shape_torch
    from jaxdiff.nn.inception import InceptionV3FID

    model = nnx.eval_shape(lambda: InceptionV3FID(rngs=None))
    table = inception_variable_table(model)
    sd = {k: np.zeros(expected_shape_torch(str(p[-1]), tuple(v.get_value().shape)), np.float32)
          for k, (p, v) in table.items()}
    return model, sd


def test_state_dict_layout_matches_pytorch_fid_counts():
    model, sd = _layout_state_dict()
    # 94 conv+BN units (kernel, BN weight/bias/running mean/var) and the 1008-way fc
    assert len(sd) == 94 * 5 + 2
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sd["Conv2d_1a_3x3.bn.running_var"].shape == (32,)


def test_wrong_keys_and_shapes_are_reported():
    from jaxdiff.convert.inception import load_inception_state_dict

    model, sd = _layout_state_dict()
    bad = dict(sd)
    del bad["Mixed_5b.branch1x1.conv.weight"]
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    bad["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
    with pytest.raises(CheckpointMismatchError) as e:
        load_inception_state_dict(model, bad)
    msg = str(e.value)
    assert "missing keys (1): Mixed_5b.branch1x1.conv.weight" in msg
    assert "unexpected keys (1): AuxLogits.fc.weight" in msg
    assert "shape mismatch fc.weight: model expects (1008, 2048), checkpoint has (1000, 2048)" in msg
    assert isinstance(e.value, ValueError)

    with pytest.raises(CheckpointMismatchError, match="different architecture"):
        load_inception_state_dict(model, {"conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)})


@pytest.mark.parity
def test_unreadable_or_non_state_dict_file(tmp_path):
    torch = pytest.importorskip("torch")
    from jaxdiff.convert.inception import load_inception_fid

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch state-dict file"):
        load_inception_fid(junk)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], str(lst))
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_inception_fid(lst)
    partial = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, str(partial))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(470\)"):
        load_inception_fid(partial)
