"""Metric math against float64 numpy/scipy references; streaming and sharded statistics; the shipped
digits classifier and digits_quality."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.metrics import (FeatureExtractor, FeatureStats, compute_metrics, extract, extract_stats,
                             frechet_distance, inception_score, kid, kid_subset_indices, knn_radii,
                             load_stats, mmd2_unbiased, precision_recall, save_stats)

RTOL = 1e-6


def _features(seed, n, d, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return shift + scale * rng.standard_normal((n, d)) @ a + 0.3 * rng.standard_normal((n, d))


# ----------------------------------------------------------------------------- references (float64)
def _ref_fid(x, y):
    """pytorch-fid's route: scipy.linalg.sqrtm of sigma1 @ sigma2."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _ref_mmd2(x, y):
    d = x.shape[1]
    m = x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    total = 0.0
    for i in range(m):          # the direct O(m^2) double sum over i != j
        for j in range(m):
            if i != j:
                total += (kxx[i, j] + kyy[i, j]) / (m * (m - 1))
    return total - 2.0 * kxy.sum() / (m * m)


def _ref_precision_recall(real, fake, k):
    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(dists(real, real), axis=1)[:, k]
    r_fake = np.sort(dists(fake, fake), axis=1)[:, k]
    precision = np.mean([(dists(f[None], real)[0] <= r_real).any() for f in fake])
    recall = np.mean([(dists(r[None], fake)[0] <= r_fake).any() for r in real])
    return precision, recall, r_real


def _ref_is(p, splits):
    from scipy.stats import entropy
    scores = []
    for idx in np.array_split(np.arange(len(p)), splits):
        py = p[idx].mean(0)
        scores.append(np.exp(np.mean([entropy(pi, py) for pi in p[idx]])))
    return np.mean(scores), np.std(scores)


# ----------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("d", [8, 32])
def test_frechet_matches_scipy_sqrtm(d):
    x, y = _features(0, 400, d), _features(1, 300, d, shift=0.2, scale=1.3)
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    got = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, _ref_fid(x, y), rtol=RTOL)
    np.testing.assert_allclose(frechet_distance(mu2, s2, mu1, s1), got, rtol=RTOL)  # symmetric
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_singular_covariance_warns_and_stays_finite():
    x, y = _features(2, 10, 32), _features(3, 12, 32, shift=1.0)
    with pytest.warns(UserWarning, match="singular covariance"):
        s1 = FeatureStats.from_features(x).covariance()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s2 = FeatureStats.from_features(y).covariance()
    with pytest.warns(UserWarning, match="singular covariance"):
        fd = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(fd) and fd > 0


def test_frechet_bad_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- streaming statistics
def test_stats_streaming_uneven_batches_large_mean():
    x = _features(4, 331, 24, shift=1e4)  # a mean far larger than the spread: raw sums would cancel
    stats = FeatureStats()
    for i, (a, b) in enumerate([(0, 1), (1, 8), (8, 58), (58, 58), (58, 71), (71, 200), (200, 331)]):
        stats.update(x[a:b] if i % 2 else jnp.asarray(x[a:b]))  # numpy and jax batches mixed
    assert stats.count == 331
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=RTOL, atol=1e-9)
    # jax batches (float64 here: the test session enables x64), in another order/split
    s2 = FeatureStats()
    for part in np.array_split(x[::-1], 5):
        s2.update(jnp.asarray(part))
    np.testing.assert_allclose(s2.covariance(), np.cov(x, rowvar=False), rtol=RTOL, atol=1e-9)


def test_stats_sharded_accumulation_and_merge():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    x = _features(5, 64 + 16 + 120 + 40, 16, shift=3.0)
    host_a, host_b = FeatureStats(), FeatureStats()
    for (a, b), host in zip([(0, 64), (64, 80), (80, 200), (200, 240)], [host_a, host_a, host_b, host_b]):
        batch = jax.device_put(jnp.asarray(x[a:b]), sharding)
        assert len(batch.sharding.device_set) == 8
        host.update(batch)
    merged = host_a.merge(host_b)
    assert merged.count == 240
    np.testing.assert_allclose(merged.mean, x.mean(0), rtol=RTOL)
    np.testing.assert_allclose(merged.covariance(), np.cov(x, rowvar=False), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(host_b.merge(host_a).covariance(), merged.covariance(), rtol=1e-12)


def test_stats_errors():
    s = FeatureStats().update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dimension"):
        s.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        FeatureStats().update(np.zeros(4))
    with pytest.raises(ValueError, match="no features"):
        FeatureStats().mean


def test_stats_npz_roundtrip_and_errors(tmp_path):
    x = _features(6, 50, 6)
    mu, sigma = FeatureStats.from_features(x).mu_sigma()
    path = tmp_path / "ref.npz"
    save_stats(path, mu, sigma)
    with np.load(path) as z:
        assert sorted(z.files) == ["mu", "sigma"]
    mu2, sigma2 = load_stats(path, dim=6)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(ValueError, match="feature dim 6, expected 2048"):
        load_stats(path, dim=2048)
    np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="missing key"):
        load_stats(tmp_path / "keys.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:5])
    with pytest.raises(ValueError, match="'sigma' must have shape"):
        load_stats(tmp_path / "shape.npz")
    with pytest.raises(ValueError, match="'mu' must have shape"):
        save_stats(tmp_path / "bad.npz", sigma, sigma)


# ----------------------------------------------------------------------------- KID
def test_kid_matches_direct_mmd():
    x, y = _features(7, 40, 12), _features(8, 40, 12, shift=0.3)
    ref = _ref_mmd2(x, y)
    np.testing.assert_allclose(mmd2_unbiased(x, y), ref, rtol=RTOL)
    mean, std = kid(x, y, num_subsets=1, subset_size=1000)  # one subset = every point
    np.testing.assert_allclose(mean, ref, rtol=RTOL)
    assert std == 0.0


def test_kid_subsets_mean_std():
    x, y = _features(9, 70, 10), _features(10, 55, 10, shift=0.2)
    ir, jf = kid_subset_indices(70, 55, num_subsets=7, subset_size=30, seed=3)
    assert ir.shape == (7, 30) and all(len(set(r)) == 30 for r in ir)
    vals = [_ref_mmd2(x[i], y[j]) for i, j in zip(ir, jf)]
    mean, std = kid(x, y, num_subsets=7, subset_size=30, seed=3)
    np.testing.assert_allclose([mean, std], [np.mean(vals), np.std(vals)], rtol=RTOL)
    # subset size is capped by the smaller set
    assert kid_subset_indices(70, 55, 2, 1000)[0].shape == (2, 55)
    with pytest.raises(ValueError, match="dims differ"):
        kid(x, y[:, :5])


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_brute_force():
    real, fake = _features(11, 90, 5), _features(12, 70, 5, shift=0.7, scale=0.8)
    p_ref, r_ref, radii_ref = _ref_precision_recall(real, fake, 3)
    np.testing.assert_allclose(np.sqrt(knn_radii(real, 3, block_size=16)), radii_ref, rtol=RTOL)
    dup = np.concatenate([real[:20], real[:5]])  # duplicated rows count as separate neighbours
    for k in (1, 3, 10):  # masked-minimum path (k <= 8) and top_k path
        d = np.sqrt(((dup[:, None] - dup[None]) ** 2).sum(-1))
        np.testing.assert_allclose(np.sqrt(knn_radii(dup, k)), np.sort(d, 1)[:, k], rtol=RTOL, atol=1e-7)
    p, r = precision_recall(real, fake, k=3, block_size=16)  # uneven blocks: 90 = 5 x 16 + 10
    assert (p, r) == (p_ref, r_ref)
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k < N"):
        knn_radii(real[:3], 3)


# ----------------------------------------------------------------------------- Inception score
def test_inception_score_matches_reference():
    rng = np.random.default_rng(13)
    logits = 3.0 * rng.standard_normal((103, 10))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = _ref_is(p, 10)
    np.testing.assert_allclose(inception_score(logits, splits=10), ref, rtol=RTOL)
    np.testing.assert_allclose(inception_score(probs=p, splits=10), ref, rtol=RTOL)
    one_hot = np.eye(10)[np.arange(100) % 10]
    np.testing.assert_allclose(inception_score(probs=one_hot, splits=1)[0], 10.0, rtol=RTOL)
    with pytest.raises(ValueError, match="exactly one"):
        inception_score()


# ----------------------------------------------------------------------------- extractor slot
def _toy_extractor():
    w = jnp.asarray(np.random.default_rng(14).standard_normal((4 * 4 * 2, 6)))

    def fn(images):
        f = images.reshape(images.shape[0], -1) @ w
        return f, f[:, :3]

    return FeatureExtractor("toy_linear", fn, input_size=4, channels=2), w


def test_extract_sharded_padded_and_metric_names():
    ext, w = _toy_extractor()
    rng = np.random.default_rng(15)
    imgs = rng.uniform(-1, 1, (37, 4, 4, 2))
    want = imgs.reshape(37, -1) @ np.asarray(w)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    f, lg = extract(ext, imgs, batch_size=16, sharding=sharding)
    np.testing.assert_allclose(f, want, rtol=1e-10)
    np.testing.assert_allclose(lg, want[:, :3], rtol=1e-10)
    f2, _ = extract(ext, [imgs[:5], imgs[5:]], batch_size=8)  # an iterable of batches
    np.testing.assert_allclose(f2, want, rtol=1e-10)
    stats = extract_stats(ext, imgs, batch_size=16, sharding=sharding)
    np.testing.assert_allclose(stats.covariance(), np.cov(want, rowvar=False), rtol=RTOL)
    with pytest.raises(ValueError, match="cannot be split"):
        extract(ext, imgs, batch_size=12, sharding=sharding)
    with pytest.raises(ValueError, match="expected images"):
        extract(ext, imgs[..., :1])
    fake = rng.uniform(-1, 1, (30, 4, 4, 2))
    m = compute_metrics(ext, fake, imgs, kid_subsets=5, is_splits=3)
    assert m["feature_space"] == "toy_linear" and "fid" not in m
    assert {"frechet_distance", "kid_mean", "kid_std", "precision", "recall", "classifier_score_mean"} <= set(m)
    m2 = compute_metrics(ext, fake, stats)  # statistics-only reference: no KID / PR
    np.testing.assert_allclose(m2["frechet_distance"], m["frechet_distance"], rtol=RTOL)
    assert "kid_mean" not in m2


# ----------------------------------------------------------------------------- digits classifier
def test_shipped_digits_classifier_accuracy():
    from jaxdiff.data.digits import load_digits_arrays
    from jaxdiff.extractors import classifier_weights_path, digits_classifier, digits_classifier_info
    for r in (16, 32):
        if r == 32 and not os.path.exists(classifier_weights_path(32)):
            continue
        assert os.path.getsize(classifier_weights_path(r)) < 1_000_000
        x, y = load_digits_arrays("test", r)
        _, logits = extract(digits_classifier(r), x, batch_size=180)
        acc = float(np.mean(logits.argmax(-1) == y))
        assert acc >= 0.97, (r, acc)
        assert abs(acc - digits_classifier_info(r)["test_accuracy"]) < 0.01


def test_digits_quality_real_vs_noise():
    from jaxdiff.data.digits import load_digits_arrays
    from jaxdiff.extractors import digits_quality
    test_x, test_y = load_digits_arrays("test", 16)
    train_x, train_y = load_digits_arrays("train", 16)
    q_test = digits_quality(test_x.astype(np.float32) / 127.5 - 1, test_y, kid_subsets=10)
    assert q_test["class_agreement"] >= 0.97
    assert q_test["frechet_classifier_distance"] < 1e-6  # the test split against itself
    q_train = digits_quality(train_x, train_y, kid_subsets=10)  # uint8 accepted
    noise = np.random.default_rng(16).uniform(-1, 1, (360, 16, 16, 1)).astype(np.float32)
    q_noise = digits_quality(noise, test_y, kid_subsets=10)
    assert q_train["class_agreement"] >= 0.97
    assert q_train["frechet_classifier_distance"] * 20 < q_noise["frechet_classifier_distance"]
    assert q_train["kid_mean"] * 20 < q_noise["kid_mean"]
    assert q_train["precision"] > 0.8 and q_noise["precision"] < 0.1
    with pytest.raises(ValueError, match="requested_labels"):
        digits_quality(noise, test_y[:5])


def test_digits_classifier_missing_weights(tmp_path):
    from jaxdiff.nn.classifier import load_classifier
    with pytest.raises(FileNotFoundError, match="train_digits_classifier"):
        load_classifier(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="resolution"):
        from jaxdiff.extractors import digits_classifier
        digits_classifier(28)
