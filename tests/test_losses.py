"""Tests of jaxdiff.losses: time samplers, weightings, and the denoising loss.

Ground truth: the exact Gaussian-mixture denoiser of jaxdiff.analytic (the posterior mean minimises
every weighted MSE), exact CDFs (scipy KS tests, fixed seeds), and weight values derived by hand from
the papers' formulas in the comments.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff import losses, noise, predictions
from jaxdiff.analytic import GaussianMixture


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(jax.random.PRNGKey(4), 3, 2, separation=4.0, std_range=(0.2, 0.4),
                                  mean_scale=0.7)


def _process_time(process, model_time):
    """Invert process.model_time (the test's apply_fn receives the network's time input)."""
    if isinstance(process, noise.VPDiscrete):
        n = process.log_alphas.shape[0]
        return model_time / process.num_train_steps + 1.0 / n
    if isinstance(process, noise.EDM):
        return jnp.exp(4.0 * model_time)
    return model_time / process.time_scale


def _apply(gm, process, kind, x0_shift=0.0, x0_scale=1.0):
    """apply_fn(x_t, model_time) predicting `kind` from a (possibly perturbed) exact x0 denoiser,
    converted with jaxdiff.predictions."""
    def apply_fn(x, m):
        t = _process_time(process, m)
        x0 = x0_scale * gm.x0_prediction(x, t, process) + x0_shift
        tb = noise.broadcast_to_batch(t, x)
        eps = (x - process.alpha(tb) * x0) / process.sigma(tb)
        return predictions.from_x0_eps(x0, eps, kind, x, t, process)
    return apply_fn


# ---------------------------------------------------------------------------------------------------
# the analytic denoiser minimises every weighted loss
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vp_continuous_linear", "edm"])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_exact_denoiser_beats_perturbed(gm, name, target):
    # E[w(t) |pred - target|^2] is minimised by the posterior mean for every t and every w >= 0, so the
    # exact denoiser must beat perturbed ones under each weighting (common random numbers).
    p = noise.make_process(name)
    x0 = gm.sample(jax.random.PRNGKey(0), 4096)
    key = jax.random.PRNGKey(1)
    sampling = "lognormal" if name == "edm" else "uniform"
    for weighting in losses.WEIGHTINGS:
        def mean_loss(apply_fn):
            return float(jnp.mean(losses.denoising_loss(apply_fn, x0, key, p, target=target,
                                                        time_sampling=sampling, weighting=weighting)))
        exact = mean_loss(_apply(gm, p, target))
        for kw in [dict(x0_scale=0.9), dict(x0_shift=0.1)]:
            assert exact < mean_loss(_apply(gm, p, target, **kw)), (weighting, kw)


def test_weightings_do_not_depend_on_the_target(gm):
    # Apart from "simple", a weighting is a weight on the x0 MSE carried to each target, so the same
    # denoiser gives the same per-example loss whichever kind it outputs (here a perturbed denoiser,
    # so the errors are not zero). Also the classic identities: x0 loss with SNR weight == simple eps
    # loss (Ho et al. 2020 / Kingma et al. 2021), simple v loss == (1 + SNR) * x0 loss (VP).
    x0 = gm.sample(jax.random.PRNGKey(0), 64)
    key = jax.random.PRNGKey(2)
    for name in ["vp_linear", "flow"]:
        p = noise.make_process(name)
        for weighting in ["snr", "min_snr", "edm", "vdm"]:
            vals = {k: np.asarray(losses.denoising_loss(_apply(gm, p, k, x0_shift=0.2), x0, key, p, target=k,
                                                        weighting=weighting)) for k in predictions.KINDS}
            for k in predictions.KINDS:
                np.testing.assert_allclose(vals[k], vals["eps"], rtol=1e-9, err_msg=f"{name} {weighting} {k}")
        simple_eps = losses.denoising_loss(_apply(gm, p, "eps", x0_shift=0.2), x0, key, p, target="eps")
        snr_x0 = losses.denoising_loss(_apply(gm, p, "x0", x0_shift=0.2), x0, key, p, target="x0", weighting="snr")
        np.testing.assert_allclose(snr_x0, simple_eps, rtol=1e-10)
    p = noise.make_process("vp_continuous_linear")
    t = losses.sample_time(jax.random.split(key)[0], 64, p)          # the times denoising_loss draws
    snr = np.exp(np.asarray(p.logsnr(t)))
    simple_v = losses.denoising_loss(_apply(gm, p, "v", x0_shift=0.2), x0, key, p, target="v")
    simple_x0 = losses.denoising_loss(_apply(gm, p, "x0", x0_shift=0.2), x0, key, p, target="x0")
    np.testing.assert_allclose(simple_v, (1 + snr) * simple_x0, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# weights against hand-derived values
# ---------------------------------------------------------------------------------------------------

def test_min_snr_weights():
    # Hang et al. 2023 eq. (9)-(10), gamma = 5: eps w = min(SNR, 5)/SNR, v w = min(SNR, 5)/(SNR + 1),
    # x0 w = min(SNR, 5). At SNR = 1: 1, 1/2, 1. At SNR = 10: 1/2, 5/11, 5. At SNR = 3 with gamma = 2: 2/3.
    p = noise.make_process("vp_continuous_linear")
    t = p.t_from_logsnr(jnp.log(jnp.array([1.0, 10.0])))
    np.testing.assert_allclose(losses.loss_weight("min_snr", p, t, "eps"), [1.0, 0.5], rtol=1e-12)
    np.testing.assert_allclose(losses.loss_weight("min_snr", p, t, "v"), [0.5, 5 / 11], rtol=1e-12)
    np.testing.assert_allclose(losses.loss_weight("min_snr", p, t, "x0"), [1.0, 5.0], rtol=1e-12)
    t3 = p.t_from_logsnr(jnp.log(jnp.array([3.0])))
    np.testing.assert_allclose(losses.loss_weight("min_snr", p, t3, "eps", gamma=2.0), [2 / 3], rtol=1e-12)


def test_snr_and_simple_weights():
    # "snr": weight SNR on x0 (4 at SNR = 4), 1 on eps, SNR/(SNR + 1) = 4/5 on v (VP); "simple": 1.
    p = noise.make_process("vp_continuous_linear")
    t = p.t_from_logsnr(jnp.log(jnp.array([4.0])))
    np.testing.assert_allclose(losses.loss_weight("snr", p, t, "x0"), [4.0], rtol=1e-12)
    np.testing.assert_allclose(losses.loss_weight("snr", p, t, "eps"), [1.0], rtol=1e-12)
    np.testing.assert_allclose(losses.loss_weight("snr", p, t, "v"), [0.8], rtol=1e-12)
    for target in predictions.KINDS:
        np.testing.assert_array_equal(losses.loss_weight("simple", p, t, target), [1.0])


def test_edm_weights():
    # Karras et al. 2022 Table 1: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0 (D) error.
    # At sigma = sd = 0.5: 2 sd^2 / sd^4 = 2 / sd^2 = 8. At sigma = 1: 1.25 / 0.25 = 5. On eps the error
    # is sigma times smaller: (sigma^2 + sd^2) / sd^2 = 2 and 5.
    edm = noise.make_process("edm")
    t = jnp.array([0.5, 1.0])
    np.testing.assert_allclose(losses.loss_weight("edm", edm, t, "x0"), [8.0, 5.0], rtol=1e-12)
    np.testing.assert_allclose(losses.loss_weight("edm", edm, t, "eps"), [2.0, 5.0], rtol=1e-12)
    # with sigma_data = 1 at sigma = 1: 2 / 1 = 2
    np.testing.assert_allclose(losses.loss_weight("edm", edm, t[1:], "x0", sigma_data=1.0), [2.0], rtol=1e-12)
    # a VP process at EDM noise level sigma/alpha = 0.5 (logsnr = 2 ln 2) gets the same x0 weight 8
    vp = noise.make_process("vp_continuous_linear")
    tv = vp.t_from_logsnr(jnp.array([2 * math.log(2.0)]))
    np.testing.assert_allclose(losses.loss_weight("edm", vp, tv, "x0"), [8.0], rtol=1e-10)


def test_vdm_weights():
    # Kingma et al. 2021 eq. 17: w = -d logsnr/dt on the eps MSE. Derived by hand:
    #   VP linear: log alpha = -(b1-b0) t^2/4 - b0 t/2, logsnr = 2 log alpha - log(1 - alpha^2)
    #              => -d logsnr/dt = beta(t) / sigma^2 with beta(t) = b0 + (b1 - b0) t.
    #   EDM (sigma = t): logsnr = -2 log t => 2 / t.   Flow: logsnr = 2 log((1-t)/t) => 2 / (t (1 - t)).
    vp = noise.make_process("vp_continuous_linear")
    t = np.array([0.01, 0.3, 0.9])
    beta = 0.1 + 19.9 * t
    sigma2 = 1 - np.exp(2 * (-(19.9) * t ** 2 / 4 - 0.1 * t / 2))
    np.testing.assert_allclose(losses.loss_weight("vdm", vp, t, "eps"), beta / sigma2, rtol=1e-10)
    np.testing.assert_allclose(losses.loss_weight("vdm", noise.make_process("edm"), t, "eps"), 2 / t, rtol=1e-12)
    np.testing.assert_allclose(losses.loss_weight("vdm", noise.make_process("flow"), t, "eps"),
                               2 / (t * (1 - t)), rtol=1e-12)


def test_vdm_weight_integrates_to_the_logsnr_range():
    # The VDM loss is an integral over logsnr: with a unit eps error, (t_max - t_min) E_t[w] must equal
    # logsnr(t_min) - logsnr(t_max), whatever the schedule (stratified t keeps the estimate tight).
    # (VE: w = 2 log(sigma_max / sigma_min) is constant. EDM's and flow's 1/t ends make uniform t a poor
    # estimator, so they are left to test_vdm_weights.)
    for name in ["vp_continuous_linear", "vp_continuous_cosine", "ve"]:
        p = noise.make_process(name)
        t = losses.sample_time(jax.random.PRNGKey(0), 200_000, p, "stratified")
        est = (p.t_max - p.t_min) * float(jnp.mean(losses.loss_weight("vdm", p, t, "eps")))
        exact = float(p.logsnr(p.t_min) - p.logsnr(p.t_max))
        # (the stratum at t_min, where w ~ 1/t, dominates the error: ~ w(t_min) * stratum width)
        assert abs(est - exact) < 1e-3 * exact, (name, est, exact)


# ---------------------------------------------------------------------------------------------------
# time samplers
# ---------------------------------------------------------------------------------------------------

def test_uniform_time_distribution():
    p = noise.make_process("vp_continuous_linear")
    t = np.asarray(losses.sample_time(jax.random.PRNGKey(0), 5000, p, "uniform"))
    assert stats.kstest(t, stats.uniform(p.t_min, p.t_max - p.t_min).cdf).pvalue > 1e-3
    assert t.min() >= p.t_min and t.max() < p.t_max


def test_uniform_discrete_time():
    p = noise.make_process("vp_linear", num_train_steps=10)
    t = np.asarray(losses.sample_time(jax.random.PRNGKey(1), 5000, p, "uniform_discrete"))
    n = np.rint(t * 10).astype(int) - 1                      # t = (n + 1) / N
    np.testing.assert_allclose(t, (n + 1) / 10, rtol=0, atol=1e-15)
    counts = np.bincount(n, minlength=10)
    assert counts.size == 10 and counts.min() > 0
    assert stats.chisquare(counts).pvalue > 1e-3
    # the model sees the integer training index
    np.testing.assert_allclose(p.model_time(t), n, atol=1e-9)


def test_stratified_time_one_per_stratum():
    p = noise.make_process("flow")
    for seed in range(3):
        t = np.asarray(losses.sample_time(jax.random.PRNGKey(seed), 64, p, "stratified"))
        u = (t - p.t_min) / (p.t_max - p.t_min)
        assert np.all((u >= 0) & (u < 1))
        np.testing.assert_array_equal(np.sort(np.floor(64 * u).astype(int)), np.arange(64))
    # each sample is marginally uniform: KS over the first sample of many keys
    first = np.asarray(jax.vmap(lambda k: losses.sample_time(k, 8, p, "stratified")[0])(
        jax.random.split(jax.random.PRNGKey(9), 2000)))
    assert stats.kstest(first, stats.uniform(p.t_min, p.t_max - p.t_min).cdf).pvalue > 1e-3


def test_lognormal_time():
    # EDM: t = sigma, ln sigma ~ N(-1.2, 1.2^2) (clipping to [0.002, 80] has probability < 2e-5)
    edm = noise.make_process("edm")
    key = jax.random.PRNGKey(3)
    t_edm = np.asarray(losses.sample_time(key, 5000, edm, "lognormal"))
    assert stats.kstest(np.log(t_edm), stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3
    # a VP process with the same key lands on the same EDM noise level sigma/alpha, clipped to its range
    vp = noise.make_process("vp_continuous_linear")
    t_vp = losses.sample_time(key, 5000, vp, "lognormal")
    sig_vp = np.asarray(vp.sigma(t_vp) / vp.alpha(t_vp))
    lo, hi = float(vp.sigma(vp.t_min) / vp.alpha(vp.t_min)), float(vp.sigma(vp.t_max) / vp.alpha(vp.t_max))
    np.testing.assert_allclose(sig_vp, np.clip(t_edm, lo, hi), rtol=1e-9)
    # custom parameters
    t2 = np.asarray(losses.sample_time(key, 5000, edm, "lognormal", p_mean=0.5, p_std=0.3))
    assert stats.kstest(np.log(t2), stats.norm(0.5, 0.3).cdf).pvalue > 1e-3


def test_logit_normal_time():
    # SD3: t = sigmoid(z), z ~ N(0, 1): CDF(t) = Phi(logit(t))
    flow = noise.make_process("flow")
    key = jax.random.PRNGKey(5)
    t = np.asarray(losses.sample_time(key, 5000, flow, "logit_normal"))
    assert stats.kstest(np.log(t / (1 - t)), stats.norm(0, 1).cdf).pvalue > 1e-3
    t2 = np.asarray(losses.sample_time(key, 5000, flow, "logit_normal", loc=0.5, scale=0.5))
    assert stats.kstest(np.log(t2 / (1 - t2)), stats.norm(0.5, 0.5).cdf).pvalue > 1e-3
    # on another process: the same logSNR as the flow time (inside its range)
    vp = noise.make_process("vp_continuous_cosine")
    tv = losses.sample_time(key, 5000, vp, "logit_normal")
    inside = (np.asarray(tv) > vp.t_min) & (np.asarray(tv) < vp.t_max)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(np.asarray(vp.logsnr(tv))[inside], np.asarray(flow.logsnr(t))[inside],
                               rtol=1e-8, atol=1e-8)


def test_uniform_logsnr_time():
    p = noise.make_process("vp_continuous_linear")
    t = losses.sample_time(jax.random.PRNGKey(6), 5000, p, "uniform_logsnr")
    lam = np.asarray(p.logsnr(t))
    lo, hi = float(p.logsnr(p.t_max)), float(p.logsnr(p.t_min))
    assert stats.kstest(lam, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    flow = noise.make_process("flow")
    with pytest.raises(ValueError, match="logsnr_min"):   # flow: logsnr(t_max = 1) = -inf
        losses.sample_time(jax.random.PRNGKey(0), 4, flow, "uniform_logsnr")
    with pytest.raises(ValueError, match="logsnr_min"):   # ... caught when the loss is configured
        losses.make_denoising_loss(flow, time_sampling="uniform_logsnr")
    t = losses.sample_time(jax.random.PRNGKey(0), 4000, flow, "uniform_logsnr", logsnr_min=-6.0)
    assert stats.kstest(np.asarray(flow.logsnr(t)), stats.uniform(-6.0, float(flow.logsnr(flow.t_min)) + 6.0).cdf
                        ).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------
# transformations, shapes, errors
# ---------------------------------------------------------------------------------------------------

def test_jit_and_vmap_match_eager(gm):
    p = noise.make_process("vp_linear")
    loss = losses.make_denoising_loss(p, target="v", time_sampling="stratified", weighting="min_snr",
                                      weight_params={"gamma": 3.0})
    apply_fn = _apply(gm, p, "v", x0_shift=0.1)
    x0 = gm.sample(jax.random.PRNGKey(0), 16)
    key = jax.random.PRNGKey(1)
    eager = loss(apply_fn, x0, key)
    assert eager.shape == (16,) and np.all(np.asarray(eager) > 0)
    np.testing.assert_allclose(jax.jit(lambda x, k: loss(apply_fn, x, k))(x0, key), eager, rtol=1e-12)
    keys = jax.random.split(key, 2)
    batched = jax.jit(jax.vmap(lambda k: loss(apply_fn, x0, k)))(keys)
    for i in range(2):
        np.testing.assert_allclose(batched[i], loss(apply_fn, x0, keys[i]), rtol=1e-12)


def test_reduce_and_image_shapes():
    # (B, H, W, C) data; "sum" = "mean" * number of elements; extra model args are passed through
    p = noise.make_process("flow")
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 2, 2))

    def apply_fn(x, m, scale, *, shift):
        return scale * x + shift

    kw = dict(target="flow", time_sampling="logit_normal")
    mean = losses.denoising_loss(apply_fn, x0, jax.random.PRNGKey(1), p, 0.5, shift=0.1, **kw)
    total = losses.denoising_loss(apply_fn, x0, jax.random.PRNGKey(1), p, 0.5, shift=0.1, reduce="sum", **kw)
    np.testing.assert_allclose(total, 12 * mean, rtol=1e-12)
    # by hand: target eps - x0 for flow
    k_t, k_eps = jax.random.split(jax.random.PRNGKey(1))
    t = losses.sample_time(k_t, 4, p, "logit_normal")
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    tb = t[:, None, None, None]
    xt = (1 - tb) * x0 + tb * eps
    want = np.mean(np.asarray(0.5 * xt + 0.1 - (eps - x0)).reshape(4, -1) ** 2, axis=1)
    np.testing.assert_allclose(mean, want, rtol=1e-12)


def test_bad_names_raise():
    p = noise.make_process("vp_continuous_linear")
    x0 = jnp.zeros((2, 3))
    f = lambda x, m: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown weighting 'p2'.*min_snr"):
        losses.make_denoising_loss(p, weighting="p2")
    with pytest.raises(ValueError, match="unknown time sampling 'beta'.*logit_normal"):
        losses.make_denoising_loss(p, time_sampling="beta")
    with pytest.raises(ValueError, match="prediction kind"):
        losses.make_denoising_loss(p, target="noise")
    with pytest.raises(ValueError, match="reduce"):
        losses.make_denoising_loss(p, reduce="max")
    with pytest.raises(ValueError, match="accepted: \\['gamma'\\]"):
        losses.make_denoising_loss(p, weighting="min_snr", weight_params={"gama": 5})
    with pytest.raises(ValueError, match="p_mean"):
        losses.make_denoising_loss(p, time_sampling="lognormal", time_params={"mean": 0.0})
    with pytest.raises(ValueError, match="VPDiscrete"):
        losses.make_denoising_loss(p, time_sampling="uniform_discrete")
    with pytest.raises(ValueError, match="unknown weighting"):
        losses.loss_weight("likelihood", p, jnp.ones(2) * 0.5)
    # checked before tracing: the error comes out of jit too, from the Python arguments
    with pytest.raises(ValueError, match="unknown weighting"):
        jax.jit(lambda x, k: losses.denoising_loss(f, x, k, p, weighting="nope"))(x0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="shape"):
        losses.denoising_loss(lambda x, m: x[:, :2], x0, jax.random.PRNGKey(0), p)
