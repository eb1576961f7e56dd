"""TiF learner (jaxdiff.research.tif): the TiF weight and the fine-grained gap against float64 references of
the official formulas, the weightings and the argmin rule, the per-class fit leaving the base untouched, and
classification on a constructed two-class case whose answer is known."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn import UNet, UNetConfig
from jaxdiff.nn.lora import match_targets
from jaxdiff.noise import make_process
from jaxdiff.research import tif
from jaxdiff.research.c_lora import initial_token, make_loss

CFG = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                 down_attention=("cross",), down_heads=2, mid_attention=None, cross_attention_dim=4,
                 norm_num_groups=4)        # one level: the compile of the fitting step dominates these tests


def _reference_tif(d, alpha_bar):
    """The official get_tif_weights loop (inference/methods/diffusion_classifier.py), in float64."""
    w = []
    for ab in alpha_bar:
        s = math.sqrt(ab) / (2 * math.sqrt(2 * (1 - ab)))
        fine = 1 - math.erf(s * d)
        coarse = 1e-18 + sum(1 - math.erf(s * (d + 1 + j)) for j in range(500))
        w.append(fine / (fine + coarse))
    return np.array(w)


@pytest.mark.parametrize("d", [0.3, 4.0])
def test_tif_weights_match_the_official_formula(d):
    process = make_process("vp_cosine")
    t = tif.time_grid(process, 24)
    alpha = np.asarray(process.alpha(t), np.float64)
    w = tif.tif_weights(d, alpha, np.sqrt(1 - alpha ** 2))
    np.testing.assert_allclose(w, _reference_tif(d, alpha ** 2), rtol=1e-9, atol=1e-12)
    assert w.shape == (24,) and np.all((w >= 0) & (w <= 1))
    assert w[-1] < 0.05 and w.max() > 0.9                       # large t: coarse confusion dominates
    tw = tif.time_weights("tif", process, t, d=d)
    np.testing.assert_allclose(tw, w, rtol=1e-6)              # the process's sigma, not sqrt(1 - alpha^2)
    with pytest.raises(ValueError, match="same shape"):
        tif.tif_weights(d, alpha, alpha[:3])


def test_finegrain_gap_is_the_summed_percentile_of_cross_class_distances():
    r = np.random.RandomState(0)
    x, y = r.randn(7, 3, 2, 2), np.array([0, 0, 1, 1, 1, 2, 2])
    want = 0.0
    for u in range(3):
        for v in range(2):
            d2 = [np.sum((x[i, u, v] - x[j, u, v]) ** 2) if y[i] != y[j] else np.inf
                  for i in range(7) for j in range(7)]
            want += np.percentile(d2, 5.0)
    assert tif.finegrain_gap(x, y, percentile=5.0) == pytest.approx(math.sqrt(want), rel=1e-12)
    with pytest.raises(ValueError, match="two classes"):
        tif.finegrain_gap(x, np.zeros(7))
    with pytest.raises(ValueError, match="labels must be"):
        tif.finegrain_gap(x, y[:3])


def test_weightings_classify_and_bad_input():
    process = make_process("vp_cosine")
    t = tif.time_grid(process, 10)
    small, large = tif.time_weights("small_t", process, t), tif.time_weights("large_t", process, t)
    np.testing.assert_array_equal(small + large, np.ones(10))
    assert small[0] == 1 and large[-1] == 1
    errors = np.ones((3, 2, 10))
    errors[0, 0, :5] = 0.5                 # query 0: class 0 better at small t, class 1 better at large t
    errors[0, 1, 5:] = 0.2
    pred_small, scores = tif.classify(errors, small)
    assert scores.shape == (3, 2) and pred_small[0] == 0 and tif.classify(errors, large)[0][0] == 1
    with pytest.raises(ValueError, match="unknown time weighting 'median_t'"):
        tif.time_weights("median_t", process, t)
    with pytest.raises(ValueError, match="needs the fine-grained gap"):
        tif.time_weights("tif", process, t)
    with pytest.raises(ValueError, match=r"errors must be \(Q, C, n\)"):
        tif.classify(errors, small[:4])
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            tif.few_shot_support(np.array([0, 1]), (0, 1), k, np.random.default_rng(0))
    with pytest.raises(ValueError, match="class 1 has 1 examples, fewer than k = 2"):
        tif.few_shot_support(np.array([0, 0, 1]), (0, 1), 2, np.random.default_rng(0))
    idx = tif.few_shot_support(np.array([0, 1, 0, 1, 0]), (0, 1), 2, np.random.default_rng(0))
    assert sorted(np.array([0, 1, 0, 1, 0])[idx]) == [0, 0, 1, 1]


def _two_classes(n, seed):
    """Class 0: dark images (-0.8), class 1: bright ones (+0.8), 8x8 plus a little noise: ``(2n, 8, 8, 1)``."""
    r = np.random.RandomState(seed)
    x = np.concatenate([np.full((n, 8, 8, 1), -0.8), np.full((n, 8, 8, 1), 0.8)]).astype(np.float32)
    return x + 0.05 * r.randn(*x.shape).astype(np.float32), np.repeat([0, 1], n)


@pytest.fixture(scope="module")
def fitted():
    base = UNet(CFG, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(base)))
    prefix = jnp.array([0.5, -0.5, 0.2, 0.1])
    process = make_process("vp_cosine")
    x, y = _two_classes(4, 0)
    prior = np.zeros((4, 8, 8, 1), np.float32)
    init = jnp.zeros((4,))
    settings = tif.TiFSettings(steps=20, lr=2e-2, batch=4, spec=tif.LoRASpec(targets=("attention",), rank=2))
    adapters = tif.fit_classes(base, prefix, x, y, prior, jnp.ones((4,)), init, make_loss(process, "v"), settings,
                               jax.random.key(0))
    return base, before, prefix, process, adapters, init


def test_fit_trains_only_adapters_and_tokens(fitted):
    base, before, _, _, adapters, init = fitted
    after = nnx.to_pure_dict(nnx.state(base))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), after, before)   # bitwise base
    leaves = jax.tree_util.tree_flatten_with_path(adapters.lora)[0]
    names = {str(p[-1].key) for p, _ in leaves}
    targets = match_targets(base, adapters.spec)
    assert len(targets) == 3 * 2 * 4            # 3 transformer blocks x (self, cross) x q/k/v/out
    assert names == {"lora_a", "lora_b"} and len(leaves) == 2 * len(targets)
    assert all(v.shape[0] == 2 for _, v in leaves)                          # stacked over the 2 classes
    assert all(np.abs(np.asarray(v)).max() > 0 for p, v in leaves if str(p[-1].key) == "lora_b")
    assert adapters.tokens.shape == (2, 4) and not np.allclose(adapters.tokens, init)


def test_classifier_picks_the_class_whose_adapter_fits(fitted):
    base, _, prefix, process, adapters, _ = fitted
    q, qy = _two_classes(3, 1)
    errors = tif.denoising_errors(base, adapters, prefix, process, q, tif.time_grid(process, 6), jax.random.key(1),
                                  chunk=20)
    assert errors.shape == (6, 2, 6) and np.all(errors > 0)
    pred, _ = tif.classify(errors, tif.time_weights("uniform", process, tif.time_grid(process, 6)))
    np.testing.assert_array_equal(np.array(adapters.classes)[pred], qy)
    swapped = tif.ClassAdapters(adapters.classes, jax.tree.map(lambda v: v[::-1], adapters.lora),
                                adapters.tokens[::-1], adapters.spec)      # each class scored by the other's adapter
    e_swap = tif.denoising_errors(base, swapped, prefix, process, q, tif.time_grid(process, 6), jax.random.key(1),
                                  chunk=20)
    np.testing.assert_allclose(e_swap, errors[:, ::-1], rtol=1e-5)
    again = tif.denoising_errors(base, adapters, prefix, process, q[:4], tif.time_grid(process, 6), jax.random.key(1),
                                 chunk=50)                  # other chunking, the same noise per query
    np.testing.assert_allclose(again, errors[:4], rtol=1e-5)
    with pytest.raises(ValueError, match=r"queries \(Q, H, W, C\)"):
        tif.denoising_errors(base, adapters, prefix, process, q[0], tif.time_grid(process, 6), jax.random.key(1))


def test_fit_bad_input():
    base = UNet(CFG, rngs=nnx.Rngs(0))
    x, y = _two_classes(2, 0)
    loss = make_loss(make_process("vp_cosine"))
    p = jnp.zeros((4,))
    with pytest.raises(ValueError, match="at least two classes"):
        tif.fit_classes(base, p, x, np.zeros(4, int), x, p, p, loss, tif.TiFSettings(steps=1), jax.random.key(0))
    with pytest.raises(ValueError, match="must match in N"):
        tif.fit_classes(base, p, x, y[:3], x, p, p, loss, tif.TiFSettings(steps=1), jax.random.key(0))
    with pytest.raises(ValueError, match="prior images"):
        tif.fit_class(base, p, x, x[:, :4], p, p, loss, tif.TiFSettings(steps=1), jax.random.key(0))
    with pytest.raises(ValueError, match="TiFSettings"):
        tif.fit_class(base, p, x, x, p, p, loss, tif.TiFSettings(steps=0), jax.random.key(0))


def test_c_lora_token_init():
    cls = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_allclose(initial_token("class_mean", jax.random.key(0), (4,), class_tokens=cls), [4, 5, 6, 7])
    r = initial_token("random", jax.random.key(0), (4,), std=2.0)
    np.testing.assert_allclose(r, 2.0 * jax.random.normal(jax.random.key(0), (4,), jnp.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="token_init must be one of"):
        initial_token("noun", jax.random.key(0), (4,))
    with pytest.raises(ValueError, match="needs class_tokens"):
        initial_token("class_mean", jax.random.key(0), (4,))
