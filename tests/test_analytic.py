"""Tests of jaxdiff.analytic: the exact Gaussian-mixture ground truth.

Every check compares against an independent route to the same quantity: finite differences of the
log-density, Monte-Carlo risk, scipy densities, moments computed here from the definition, closed-form
single-Gaussian ODE solutions, and the flow-matching identity dx/dt = E[alpha' x0 + sigma' eps | x_t].
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from jaxdiff import noise
from jaxdiff.analytic import DENOISER_KINDS, GaussianMixture

PROCESSES = ["vp_linear", "vp_continuous_linear", "vp_continuous_cosine", "ve", "edm", "flow"]


@pytest.fixture(scope="module")
def gm3():
    return GaussianMixture.random(jax.random.PRNGKey(0), 4, 3)


@pytest.fixture(scope="module")
def gm16():
    return GaussianMixture.random(jax.random.PRNGKey(1), 8, 16)


def _times(p):
    """A spread of times inside [t_min, t_max], log-spaced for the sigma-as-time processes."""
    if isinstance(p, (noise.EDM,)):
        return np.geomspace(p.t_min, p.t_max, 5)
    return np.linspace(p.t_min, p.t_max, 5)


def _noisy(gm, p, t, n, seed=0):
    """(x_t, x0) with x0 ~ data, x_t ~ q(x_t | x0) at t (scalar or (n,)), as numpy float64 arrays."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x0 = np.asarray(gm.sample(k1, n))
    z = np.asarray(jax.random.normal(k2, x0.shape, jnp.float64))
    a, s = (np.asarray(f(jnp.asarray(t, jnp.float64))).reshape(-1, 1) for f in (p.alpha, p.sigma))
    return a * x0 + s * z, x0


# ---------------------------------------------------------------------------------------------------
# score and denoiser
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PROCESSES)
def test_score_is_gradient_of_marginal_log_prob(gm3, name):
    # central finite differences (float64) of log p_t, coordinate by coordinate, at 5 times x 4 points
    p = noise.make_process(name)
    t = np.repeat(_times(p), 4)
    x, _ = _noisy(gm3, p, t, len(t), seed=1)
    a, s = np.asarray(p.alpha(t)), np.asarray(p.sigma(t))
    h = 1e-5 * np.sqrt(a ** 2 * float(gm3.variances.min()) + s ** 2)            # (n,)
    dim = x.shape[1]
    steps = np.eye(dim)[:, None, :] * h[None, :, None]                         # (D, n, D)
    xs = np.concatenate([(x[None] + steps).reshape(-1, dim), (x[None] - steps).reshape(-1, dim)])
    lp = np.asarray(gm3.marginal_log_prob(xs, np.tile(t, 2 * dim), p)).reshape(2, dim, -1)
    fd = ((lp[0] - lp[1]) / (2 * h)).T                                          # (n, D)
    score = np.asarray(gm3.score(x, t, p))
    np.testing.assert_allclose(score, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_marginal_log_prob_matches_scipy(gm3):
    # x_t | k ~ N(alpha mu_k, alpha^2 v_k + sigma^2): evaluate the mixture density with scipy
    p = noise.make_process("vp_continuous_linear")
    t = 0.4
    x, _ = _noisy(gm3, p, t, 6)
    a, s = float(p.alpha(t)), float(p.sigma(t))
    w, m, v = (np.asarray(z) for z in (gm3.weights, gm3.means, gm3.variances))
    dens = sum(w[k] * stats.multivariate_normal(a * m[k], np.diag(a ** 2 * v[k] + s ** 2)).pdf(x)
               for k in range(len(w)))
    np.testing.assert_allclose(gm3.marginal_log_prob(x, t, p), np.log(dens), rtol=1e-12)
    dens0 = sum(w[k] * stats.multivariate_normal(m[k], np.diag(v[k])).pdf(x) for k in range(len(w)))
    np.testing.assert_allclose(gm3.log_prob(x), np.log(dens0), rtol=1e-10)


@pytest.mark.parametrize("name", ["vp_linear", "edm", "flow"])
def test_x0_prediction_is_the_posterior_mean(gm3, name):
    # The posterior mean minimises E|D(x_t) - x0|^2 and its error is orthogonal to any function of x_t:
    # risk(D + delta) - risk(D) = E|delta|^2 (the cross term vanishes). Monte-Carlo over x0 ~ data,
    # t ~ U(grid), x_t ~ q(x_t | x0), common random numbers for every candidate; the cross term must
    # vanish within 5 standard errors.
    p = noise.make_process(name)
    n = 20000
    t = np.random.default_rng(0).choice(_times(p)[:4], n)
    x, x0 = _noisy(gm3, p, t, n, seed=3)
    d = np.asarray(gm3.x0_prediction(x, t, p))
    err = d - x0

    def risk(pred):
        return np.mean(np.sum((pred - x0) ** 2, -1))

    base = risk(d)
    perturbations = {
        "scaled": 0.05 * d,
        "shifted": 0.05 * np.ones_like(d),
        "towards_x": 0.05 * (x - d),
        "data_mean": 0.05 * (np.asarray(gm3.mean()) - d),
    }
    for label, delta in perturbations.items():
        excess = risk(d + delta) - base
        sq = np.mean(np.sum(delta ** 2, -1))
        cross = 2 * np.sum(err * delta, -1)            # per-sample cross term, mean 0 in theory
        assert excess > 0, label
        assert abs(excess - sq) < 5 * np.std(cross) / np.sqrt(n), (label, excess, sq)


def test_prediction_kinds_are_consistent(gm3):
    # v, eps, score, x0 and flow from their definitions in terms of (x0, eps)
    for name in ["vp_linear", "vp_continuous_cosine", "edm", "flow"]:
        p = noise.make_process(name)
        t = np.linspace(p.t_min, p.t_max, 6)[1:5]   # interior: FD in t below
        x, _ = _noisy(gm3, p, t, 4)
        a, s = np.asarray(p.alpha(t))[:, None], np.asarray(p.sigma(t))[:, None]
        pred = {k: np.asarray(gm3.denoiser(p, k)(x, t)) for k in DENOISER_KINDS}
        x0, eps = pred["x0"], pred["eps"]
        np.testing.assert_allclose(a * x0 + s * eps, x, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pred["v"], a * eps - s * x0, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pred["score"], -eps / s, rtol=1e-10, atol=1e-12)
        dt = 1e-6 * t
        da = (np.asarray(p.alpha(t + dt)) - np.asarray(p.alpha(t - dt))) / (2 * dt)
        ds = (np.asarray(p.sigma(t + dt)) - np.asarray(p.sigma(t - dt))) / (2 * dt)
        np.testing.assert_allclose(pred["flow"], da[:, None] * x0 + ds[:, None] * eps, rtol=1e-6, atol=1e-8)


def test_tiny_and_zero_sigma(gm3):
    x = np.asarray(gm3.sample(jax.random.PRNGKey(2), 8))
    for name in ["vp_linear", "vp_continuous_linear", "ve", "edm", "flow"]:
        p = noise.make_process(name)
        # exactly at sigma = 0: E[x0 | x] = x / alpha, eps = 0, everything finite; and at a tiny sigma
        # (sigma / alpha = 1e-6) E[x0 | x] is within O(sigma^2 / v) of x / alpha. One batch: [t_zero, tiny].
        t_small = float(p.t_from_logsnr(2 * np.log(1e6)))
        t = np.repeat([p.t_zero, t_small], 8)
        xx = np.concatenate([x, x])
        a = np.asarray(p.alpha(t))[:, None]
        x0 = np.asarray(gm3.x0_prediction(xx, t, p))
        np.testing.assert_allclose(x0[:8], x / a[:8], rtol=1e-12)
        np.testing.assert_allclose(x0[8:], x / a[8:], atol=1e-9)
        np.testing.assert_array_equal(gm3.eps_prediction(xx, t, p)[:8], 0.0)
        assert np.all(np.isfinite(gm3.score(xx, t, p)))


def test_zero_alpha_gives_data_mean(gm3):
    p = noise.make_process("flow")   # alpha(1) = 0: pure noise carries no information about x0
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (5, 3), jnp.float64))
    np.testing.assert_allclose(gm3.x0_prediction(x, 1.0, p), np.broadcast_to(gm3.mean(), x.shape), rtol=1e-12)
    np.testing.assert_allclose(gm3.eps_prediction(x, 1.0, p), x, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# data distribution
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["toy_2d", "random_4d"])
def test_sample_moments(which):
    gm = GaussianMixture.toy_2d() if which == "toy_2d" else GaussianMixture.random(jax.random.PRNGKey(5), 3, 4)
    w, m, v = (np.asarray(z) for z in (gm.weights, gm.means, gm.variances))
    # moments from the definition, written out here
    mean = sum(w[k] * m[k] for k in range(len(w)))
    cov = sum(w[k] * (np.diag(v[k]) + np.outer(m[k] - mean, m[k] - mean)) for k in range(len(w)))
    np.testing.assert_allclose(gm.mean(), mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gm.covariance(), cov, rtol=1e-12, atol=1e-14)
    n = 200_000
    xs = np.asarray(gm.sample(jax.random.PRNGKey(11), n))
    assert xs.shape == (n, gm.dim)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(xs.mean(0) - mean) < 5 * se)
    np.testing.assert_allclose(np.cov(xs.T), cov, atol=0.02 * np.abs(cov).max())


def test_random_mixture_is_well_separated():
    for seed, (k, d) in enumerate([(8, 2), (8, 16), (3, 1)]):
        gm = GaussianMixture.random(jax.random.PRNGKey(seed), k, d, separation=6.0)
        m = np.asarray(gm.means)
        dist = np.linalg.norm(m[:, None] - m[None], axis=-1)[~np.eye(k, dtype=bool)]
        assert dist.min() >= 6.0 * np.sqrt(np.asarray(gm.variances).max()) * (1 - 1e-9)
        assert gm.weights.dtype == jnp.float64
        np.testing.assert_allclose(float(gm.weights.sum()), 1.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# probability-flow ODE
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vp_linear", "vp_continuous_linear", "edm", "flow", "ve"])
def test_reference_ode_single_gaussian_closed_form(name):
    # For one Gaussian N(mu, v) the PF-ODE in EDM variables (xh = x/alpha, sh = sigma/alpha) keeps
    # (xh - mu) / sqrt(v + sh^2) constant.
    mu, v = np.array([0.5, -1.0]), np.array([0.04, 2.0])
    gm = GaussianMixture(jnp.ones(1), jnp.asarray(mu[None]), jnp.asarray(v[None]))
    p = noise.make_process(name)
    x = np.asarray(p.prior_sample(jax.random.PRNGKey(0), (5, 2)))
    hi = p.t_max if float(p.alpha(p.t_max)) > 0 else 0.9 * p.t_max   # start needs alpha > 0 here
    for ts, te in [(hi, p.t_min), (p.t_min, 0.9 * hi), (0.9 * hi, p.t_zero)]:
        a_s, s_s, a_e, s_e = float(p.alpha(ts)), float(p.sigma(ts)), float(p.alpha(te)), float(p.sigma(te))
        c = (x / a_s - mu) / np.sqrt(v + (s_s / a_s) ** 2)
        want = a_e * (mu + c * np.sqrt(v + (s_e / a_e) ** 2))
        got = gm.reference_ode_solution(p, x, ts, te)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def test_reference_ode_from_pure_noise():
    # flow at t = 1 (alpha = 0, lambda = -inf): x_1 = eps, and for one Gaussian x_t = alpha mu + eps *
    # sqrt(alpha^2 v + sigma^2) (the limit of the closed form above)
    mu, v = np.array([0.5, -1.0]), np.array([0.04, 2.0])
    gm = GaussianMixture(jnp.ones(1), jnp.asarray(mu[None]), jnp.asarray(v[None]))
    p = noise.make_process("flow")
    eps = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 2)))
    for te in [0.5, 0.0]:
        want = (1 - te) * mu + eps * np.sqrt((1 - te) ** 2 * v + te ** 2)
        np.testing.assert_allclose(gm.reference_ode_solution(p, eps, 1.0, te), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["vp_continuous_linear", "edm"])
def test_reference_ode_step_halving(gm16, name):
    # documented accuracy: halving the step changes the answer by < 1e-9 relative (float64, 16-D)
    p = noise.make_process(name)
    x = p.prior_sample(jax.random.PRNGKey(3), (8, 16))
    for te in [p.t_min, p.t_zero]:
        a = gm16.reference_ode_solution(p, x, p.t_max, te)
        b = gm16.reference_ode_solution(p, x, p.t_max, te, num_steps=8192)
        assert a.dtype == jnp.float64
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-9


@pytest.mark.parametrize("name", ["vp_linear", "edm", "flow"])
def test_reference_ode_velocity_matches_flow_prediction(gm16, name):
    # d/dt of the ODE solution (central difference) == alpha'(t) E[x0|x] + sigma'(t) E[eps|x]
    p = noise.make_process(name)
    x = p.prior_sample(jax.random.PRNGKey(4), (8, 16))
    t1 = 0.5 * (p.t_min + p.t_max) if name != "edm" else 1.0
    dt = 1e-4 * t1
    x1 = gm16.reference_ode_solution(p, x, p.t_max, t1)
    xp = gm16.reference_ode_solution(p, x1, t1, t1 + dt, num_steps=64)
    xm = gm16.reference_ode_solution(p, x1, t1, t1 - dt, num_steps=64)
    v = gm16.prediction(x1, t1, p, "flow")
    np.testing.assert_allclose((xp - xm) / (2 * dt), v, rtol=1e-6, atol=1e-6 * float(jnp.abs(v).max()))


@pytest.mark.parametrize("name", ["vp_linear", "edm"])
def test_reference_ode_is_invertible(gm16, name):
    # data -> t_max -> data along the PF-ODE returns the sample
    p = noise.make_process(name)
    x0 = gm16.sample(jax.random.PRNGKey(9), 16)
    xT = gm16.reference_ode_solution(p, x0, p.t_zero, p.t_max)
    back = gm16.reference_ode_solution(p, xT, p.t_max, p.t_zero)
    assert float(jnp.max(jnp.abs(xT - x0))) > 1.0   # it really went somewhere
    np.testing.assert_allclose(back, x0, rtol=0, atol=1e-9 * float(jnp.abs(x0).max()))


# ---------------------------------------------------------------------------------------------------
# transformations and sharding
# ---------------------------------------------------------------------------------------------------

def test_jit_vmap_and_shapes(gm3):
    p = noise.make_process("vp_linear")
    t = jnp.linspace(0.05, 0.9, 6)
    x, _ = _noisy(gm3, p, t, 6)
    f = gm3.denoiser(p, "flow")   # the kind with the most machinery (jvp of the schedule)
    eager = f(x, t)
    # scalar t equals a constant (B,) t
    np.testing.assert_allclose(f(x, t[2]), f(x, jnp.full((6,), t[2])), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jax.jit(f)(x, t), eager, rtol=1e-13, atol=1e-13)
    per_ex = jax.vmap(lambda xi, ti: f(xi[None], ti)[0])(x, t)
    np.testing.assert_allclose(per_ex, eager, rtol=1e-13, atol=1e-13)
    # the mixture is a pytree: it can be a jit argument
    g = jax.jit(lambda mix, x, t: mix.x0_prediction(x, t, p))
    np.testing.assert_allclose(g(gm3, x, t), gm3.x0_prediction(x, t, p), rtol=1e-13)
    # (B, ...) inputs are flattened and the shape is kept; float32 in -> float32 out
    x4 = x.reshape(6, 3, 1).astype(jnp.float32)
    out = gm3.denoiser(p, "eps")(x4, t)
    assert out.shape == (6, 3, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(out.reshape(6, 3), gm3.eps_prediction(x4.reshape(6, 3), t, p), rtol=1e-6)


def test_mixture_is_a_differentiable_pytree():
    # grad w.r.t. the mixture's parameters returns a GaussianMixture of gradients (not a valid mixture:
    # unflattening must not re-validate). One Gaussian: d/dmu log N(x; mu, v) = (x - mu) / v.
    gm = GaussianMixture(jnp.ones(1), jnp.array([[0.5, -1.0]]), jnp.array([[0.25, 2.0]]))
    x = jnp.array([[1.0, 1.0], [0.0, -2.0]])
    g = jax.grad(lambda m: m.log_prob(x).sum())(gm)
    assert isinstance(g, GaussianMixture)
    np.testing.assert_allclose(g.means[0], ((x - gm.means[0]) / gm.variances[0]).sum(0), rtol=1e-12)
    zeros = jax.tree.map(jnp.zeros_like, gm)
    assert float(zeros.weights.sum()) == 0.0


def test_sharded_batch_gives_same_values(gm3):
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8
    mesh = Mesh(devices, ("data",))
    p = noise.make_process("edm")
    t = jnp.geomspace(0.01, 50.0, 16)
    x, _ = _noisy(gm3, p, t, 16)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ts = jax.device_put(t, NamedSharding(mesh, P("data")))
    f = jax.jit(gm3.denoiser(p, "x0"))
    out = f(xs, ts)
    np.testing.assert_allclose(out, gm3.x0_prediction(x, t, p), rtol=1e-13, atol=1e-13)
    assert len(out.sharding.device_set) == 8
    ode = gm3.reference_ode_solution(p, xs, p.t_max, p.t_min, num_steps=256)
    np.testing.assert_allclose(ode, gm3.reference_ode_solution(p, x, p.t_max, p.t_min, num_steps=256),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w, m, v, match", [
    ([0.5, 0.5], [[0.0, 0.0]], [[1.0, 1.0]], "means"),
    ([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0]], "variances"),
    ([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [[1.0, -1.0], [1.0, 1.0]], "variances"),
    ([0.5, 0.6], [[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], "sum to 1"),
    ([[1.0]], [[0.0]], [[1.0]], "weights"),
    ([1.5, -0.5], [[0.0], [1.0]], [[1.0], [1.0]], "weights"),
])
def test_bad_mixture_raises(w, m, v, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(jnp.asarray(w), jnp.asarray(m), jnp.asarray(v))


def test_bad_arguments_raise(gm3):
    p = noise.make_process("vp_linear")
    with pytest.raises(ValueError, match="kind"):
        gm3.denoiser(p, "noise")
    with pytest.raises(ValueError, match="dimension 3"):
        gm3.x0_prediction(jnp.zeros((2, 4)), 0.5, p)
    with pytest.raises(ValueError, match="outside the range"):
        gm3.x0_prediction(jnp.zeros((2, 3)), 1.5, p)
