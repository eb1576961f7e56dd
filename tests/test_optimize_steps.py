"""Optimized time steps (Xue et al. CVPR 2024): objective, optimizer, cache, validation.

The reference objective below is written from the formulas only (plain numpy loops): alpha, sigma from the
processes' defining equations, the Lagrange weights w_{s,j} = int e^lambda l_j by Gauss-Legendre quadrature
(not the closed-form H-functions the library uses), and separately the official code's closed form.
"""
import dataclasses
import functools
import importlib
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.noise import EDM, NoiseProcess, VPDiscrete, make_process
from jaxdiff.timesteps import grids
from jaxdiff.timesteps.cache import cache_key, optimized_grid
from jaxdiff.timesteps.objective import objective, order_pattern
from jaxdiff.timesteps.optimize import optimize, trace_count

# ------------------------------------------------------------------------------------------------
# independent numpy reference
# ------------------------------------------------------------------------------------------------


def np_log_alpha_sigma(name, t):
    """log alpha, log sigma from the defining formulas of each process (no jaxdiff code)."""
    t = np.asarray(t, np.float64)
    if name == "vp_continuous_linear":
        la = -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
    elif name == "vp_linear":
        betas = np.linspace(1e-4, 0.02, 1000)
        knots_la = np.concatenate([[0.0], 0.5 * np.cumsum(np.log(1 - betas))])
        knots_t = np.arange(1001) / 1000.0
        la = np.array([np.interp(x, knots_t, knots_la) for x in np.atleast_1d(t)])
    elif name == "edm":
        return np.zeros_like(t), np.log(t)
    else:
        raise KeyError(name)
    ls = 0.5 * np.log(1.0 - np.exp(2 * la))
    return la, ls


def np_pattern(solver, order, steps):
    out = []
    for k in range(1, steps + 1):
        o = min(k, order)
        o = min(o, steps + 1 - k)                     # jaxdiff lowers the final orders always, for both
        out.append(o)
    return out


def np_objective(name, grid, orders, p, variant, trunc=3, nquad=48):
    """Sum over nodes of eps~_i |sum of weights|, weights by quadrature of e^lam times Lagrange basis."""
    la, ls = np_log_alpha_sigma(name, grid)
    lam = la - ls
    eps = np.exp(p * ls - la)
    n_steps = len(grid) - 1
    xg, wg = np.polynomial.legendre.leggauss(nquad)
    per_node = np.zeros(n_steps + 1)
    total = 0.0
    for s in range(n_steps):
        k = orders[s]
        nodes = list(range(s - k + 1, s + 1))
        a, b = lam[s], lam[s + 1]
        x = 0.5 * (b - a) * xg + 0.5 * (a + b)
        terms = []
        for j in nodes:
            basis = np.ones_like(x)
            for m in nodes:
                if m != j:
                    basis *= (x - lam[m]) / (lam[j] - lam[m])
            w = 0.5 * (b - a) * np.sum(wg * np.exp(x) * basis)
            terms.append((j, eps[j] * w))
        if variant == "paper" or (k > 1 and s >= trunc):
            for j, u in terms:
                per_node[j] += u
        elif k == 1:
            total += abs(terms[0][1])
        else:
            total += math.sqrt(sum(u * u for _, u in terms))
    return total + np.abs(per_node).sum()


def np_official(name, grid, p=2.0):
    """The official DM-NonUniform objective (orders 1,2,3..3,2,1; truncNum 3) from its closed-form weights."""
    la, ls = np_log_alpha_sigma(name, grid)
    lv = la - ls
    n = len(lv) - 1
    hv = [lv[i + 1] - lv[i] for i in range(n)]
    e = np.exp(lv)
    d = np.exp(p * ls - la)
    H0 = lambda h: math.exp(h) - 1          # noqa: E731
    H1 = lambda h: math.exp(h) * h - H0(h)  # noqa: E731
    H2 = lambda h: math.exp(h) * h * h - 2 * H1(h)  # noqa: E731
    res, c = 0.0, np.zeros(n)
    for s in range(n):
        if s in (0, n - 1):
            res += abs((e[s + 1] - e[s]) * d[s])
            continue
        if s in (1, n - 2):
            q = s - 1
            h, a = hv[q + 1], hv[q]
            js = [-e[q + 1] * H1(h) / a, e[q + 1] * (H1(h) + a * H0(h)) / a]
        else:
            q = s - 2
            h, a, b = hv[q + 2], hv[q], hv[q + 1]
            js = [e[q + 2] * (H2(h) + b * H1(h)) / (a * (a + b)),
                  -e[q + 2] * (H2(h) + (a + b) * H1(h)) / (a * b),
                  e[q + 2] * (H2(h) + (2 * b + a) * H1(h) + b * (a + b) * H0(h)) / (b * (a + b))]
        terms = [d[q + j] * js[j] for j in range(len(js))]
        if s >= 3:
            for j, u in enumerate(terms):
                c[q + j] += u
        else:
            res += math.sqrt(sum(u * u for u in terms))
    return res + np.abs(c).sum()


def random_grid(rng, name, n):
    proc = make_process(name)
    inner = np.sort(rng.uniform(proc.t_min, proc.t_max, n - 1))[::-1]
    return np.concatenate([[proc.t_max], inner, [proc.t_min]])


# ------------------------------------------------------------------------------------------------
# order pattern
# ------------------------------------------------------------------------------------------------


def test_order_pattern_matches_solvers():
    assert order_pattern("unipc", 3, 6) == (1, 2, 3, 3, 2, 1)
    assert order_pattern("unipc", 3, 12) == (1, 2) + (3,) * 8 + (2, 1)          # UniPC: always lowered
    assert order_pattern("dpm_solver++", 3, 9) == (1, 2, 3, 3, 3, 3, 3, 2, 1)    # jaxdiff: always lowered
    assert order_pattern("dpm_solver++", 3, 10) == (1, 2) + (3,) * 6 + (2, 1)
    assert order_pattern("dpm_solver++", 3, 14)[-2:] == (2, 1)
    assert order_pattern("dpm_solver++", 3, 15) == (1, 2) + (3,) * 11 + (2, 1)   # ... also at >= 15 steps
    assert order_pattern("dpm_solver++", 2, 10) == (1,) + (2,) * 8 + (1,)
    assert order_pattern("dpm_solver++", 2, 15) == (1,) + (2,) * 13 + (1,)
    assert order_pattern("dpm_solver++", 3, 15, lower_order_final=15) == (1, 2) + (3,) * 13     # diffusers
    assert order_pattern("dpm_solver++", 3, 10, lower_order_final=10) == (1, 2) + (3,) * 8   # official code
    assert order_pattern("dpm_solver++", 3, 9, lower_order_final=10)[-2:] == (2, 1)
    assert order_pattern("unipc", 2, 5) == (1, 2, 2, 2, 1)
    assert order_pattern("unipc", 1, 4) == (1, 1, 1, 1)
    assert order_pattern("unipc", 3, 7, lower_order_final=False) == (1, 2, 3, 3, 3, 3, 3)
    assert order_pattern("dpm_solver++", 3, 12, lower_order_final="always")[-2:] == (2, 1)
    assert order_pattern("dpm_solver++", 3, 12, lower_order_final=15)[-2:] == (2, 1)      # diffusers' rule
    assert order_pattern("dpm_solver++", 3, 15, lower_order_final=15)[-2:] == (3, 3)
    with pytest.raises(ValueError, match="lower_order_final"):
        order_pattern("unipc", 3, 8, lower_order_final="sometimes")
    for solver in ("unipc", "dpm_solver++"):
        for order in (1, 2, 3):
            for steps in range(1, 20):
                assert list(order_pattern(solver, order, steps)) == np_pattern(solver, order, steps)


def test_order_pattern_is_what_jaxdiff_solvers_run():
    solvers = pytest.importorskip("jaxdiff.solvers")
    for name in ("unipc", "dpm_solver++"):
        for order in (1, 2, 3):
            solver = solvers.make_solver(name, order=order)
            lof = getattr(solver, "lower_final_below", None) or "always"
            for steps in range(order, 20):
                # the default pattern is what the solver runs by default (always lowered at the end) ...
                assert tuple(solver.orders(steps)) == order_pattern(name, order, steps)
                assert tuple(solver.orders(steps)) == order_pattern(name, order, steps, lower_order_final=lof)
    # ... and DPM-Solver++'s default threshold is the one constant both read
    dpm = solvers.DPMSolverMultistep()
    assert dpm.lower_final_below is None and dpm.lower_final_below == grids.LOWER_FINAL_BELOW
    for lfb in (10, 15, None):
        s = solvers.DPMSolverMultistep(order=3, lower_final_below=lfb)
        for steps in range(3, 20):
            assert tuple(s.orders(steps)) == order_pattern("dpm_solver++", 3, steps, lower_order_final=lfb or "always")


@pytest.mark.parametrize("first", ["jaxdiff.timesteps", "jaxdiff.solvers", "jaxdiff.timesteps.optimize",
                                   "jaxdiff.timesteps.cache", "jaxdiff.timesteps.objective"])
def test_no_import_cycle(first):
    import subprocess
    import sys
    code = (f"import importlib; importlib.import_module({first!r}); import jaxdiff.timesteps as ts; "
            "assert ts.order_pattern('dpm_solver++', 3, 12)[-2:] == (2, 1); "
            "assert callable(ts.optimize) and callable(ts.objective) and callable(ts.optimized_grid)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_exports():
    import jaxdiff.timesteps as ts
    assert ts.optimize is optimize and ts.optimized_grid is optimized_grid
    assert ts.objective is objective and ts.order_pattern is order_pattern
    assert ts.order_schedule is grids.order_schedule


def test_explicit_orders_override_and_validation():
    proc = make_process("vp_continuous_linear")
    g, info = optimize(proc, "unipc", 3, 6, orders=(1, 2, 2, 2, 2, 1), return_info=True)
    assert g.shape == (7,) and info.orders == (1, 2, 2, 2, 2, 1)
    np.testing.assert_allclose(info.objective, objective(proc, g, orders=(1, 2, 2, 2, 2, 1)), rtol=1e-12)
    with pytest.raises(ValueError, match="only 2 model outputs"):
        optimize(proc, "unipc", 3, 6, orders=(1, 3, 3, 3, 2, 1))
    with pytest.raises(ValueError, match="one per step"):
        optimize(proc, "unipc", 3, 6, orders=(1, 2, 3))


# ------------------------------------------------------------------------------------------------
# objective
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp_continuous_linear", "vp_linear", "edm"])
def test_objective_matches_independent_numpy(name):
    rng = np.random.default_rng(hash(name) % 2 ** 32)
    proc = make_process(name)
    checked = 0
    for solver, n in (("unipc", 7), ("dpm_solver++", 7), ("dpm_solver++", 11)):
        for order in (1, 2, 3):
            for p in (1.0, 2.0):
                for variant in ("paper", "official"):
                    grid = random_grid(rng, name, n)
                    pattern = np_pattern(solver, order, n)
                    want = np_objective(name, grid, pattern, p, variant)
                    got = objective(proc, grid, solver=solver, order=order, p=p, variant=variant)
                    assert np.isfinite(want) and want > 0
                    np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=f"{solver} {order} {p} {variant}")
                    checked += 1
    assert checked == 36


def test_official_variant_is_the_official_objective():
    rng = np.random.default_rng(3)
    proc = make_process("vp_continuous_linear")
    for n in (5, 8, 12):
        grid = random_grid(rng, "vp_continuous_linear", n)
        # the official code: UniPC-3 pattern, truncNum = 3, p = 2 hard-coded
        got = objective(proc, grid, solver="unipc", order=3, p=2.0, variant="official", trunc=3)
        np.testing.assert_allclose(got, np_official("vp_continuous_linear", grid, 2.0), rtol=1e-9)
        # and the paper variant differs from it
        assert abs(objective(proc, grid, p=2.0, variant="paper") - got) > 1e-6 * got


def test_objective_rejects_bad_grid():
    proc = make_process("edm")
    with pytest.raises(ValueError, match="decreasing"):
        objective(proc, [1.0, 2.0, 0.5])


# ------------------------------------------------------------------------------------------------
# optimizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [
    ("vp_linear", {}), ("vp_continuous_linear", {"t_end": 2e-3}), ("edm", {"t_start": 40.0, "t_end": 0.01}),
    ("flow", {"t_start": 0.995}), ("ve", {}), ("vp_continuous_cosine", {}),
])
def test_grid_is_strictly_decreasing_with_exact_end_points(name, kwargs):
    proc = make_process(name)
    g, info = optimize(proc, "unipc", 3, 6, return_info=True, **kwargs)
    t0 = kwargs.get("t_start", proc.t_max)
    t1 = kwargs.get("t_end", proc.t_min)
    assert g.shape == (7,) and g.dtype == np.float64
    assert g[0] == t0 and g[-1] == t1
    assert np.all(np.diff(g) < 0) and np.all(np.isfinite(g))
    # the optimum is at least as good as every initial grid, and the reported objective is the exact one
    assert info.objective <= info.init_objectives.min() * (1 + 1e-9)
    np.testing.assert_allclose(info.objective, objective(proc, g, solver="unipc", order=3), rtol=1e-9)
    assert info.objective < 0.9 * info.init_objectives.min()


def test_first_order_optimum_is_uniform_logsnr():
    # order 1, p = 1, VP: E = sum_s (e^{h_s} - 1), convex with sum h fixed => equal lambda steps
    proc = make_process("vp_continuous_linear")
    g = optimize(proc, "unipc", 1, 6, p=1.0, variant="paper")
    want = np.asarray(grids.uniform_logsnr(proc, 6))
    np.testing.assert_allclose(np.asarray(proc.logsnr(g)), np.asarray(proc.logsnr(want)), atol=1e-5)


def test_no_recompilation_for_new_grids_of_the_same_nfe():
    vp1, vp2 = make_process("vp_linear"), make_process("vp_continuous_linear")
    optimize(vp1, "unipc", 3, 6, init="all")
    before = trace_count()
    optimize(vp2, "unipc", 3, 6, init="all", p=2.0)
    optimize(vp1, "dpm_solver++", 2, 6, init="all", variant="paper", t_end=0.01)
    optimize(make_process("vp_scaled_linear"), "unipc", 3, 6, init="all", t_start=0.9)
    assert trace_count() == before
    optimize(vp1, "unipc", 3, 7, init="all")        # another NFE compiles once
    assert trace_count() == before + 1


@pytest.mark.parametrize("nfe", [6])
def test_at_least_as_low_as_scipy_trust_constr(nfe):
    from jaxdiff.timesteps._scipy_reference import trust_constr
    proc = make_process("vp_linear")
    for variant in ("official",):
        ref = trust_constr(proc, "unipc", 3, nfe, p=2.0, variant=variant, init="uniform_logsnr", maxiter=400)
        _, info = optimize(proc, "unipc", 3, nfe, p=2.0, variant=variant, init="uniform_logsnr",
                           return_info=True)
        assert info.objective <= ref["objective"] * (1 + 1e-7), (info.objective, ref["objective"])


@pytest.mark.slow
@pytest.mark.parametrize("solver,variant,p", [("unipc", "official", 2.0), ("dpm_solver++", "official", 1.0),
                                              ("unipc", "paper", 1.0)])
def test_at_least_as_low_as_scipy_all_nfe(solver, variant, p):
    from jaxdiff.timesteps._scipy_reference import trust_constr
    proc = make_process("vp_linear")
    for nfe in range(5, 16):
        ref = trust_constr(proc, solver, 3, nfe, p=p, variant=variant, init="uniform_logsnr")
        _, info = optimize(proc, solver, 3, nfe, p=p, variant=variant, init="uniform_logsnr", return_info=True)
        assert info.objective <= ref["objective"] * (1 + 1e-7), (nfe, info.objective, ref["objective"])


# ------------------------------------------------------------------------------------------------
# bad input, non-convergence
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["amp"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class WigglyProcess(NoiseProcess):
    """A custom pytree process whose logSNR rises again near t = 0.5 (not invertible there) when amp > 0.08."""
    amp: jax.Array = dataclasses.field(default_factory=lambda: jnp.asarray(0.5))
    t_min = 1e-3
    t_max = 1.0

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, float))

    def log_sigma(self, t):
        t = jnp.asarray(t)
        return jnp.log(t) - self.amp * jnp.exp(-((t - 0.5) / 0.02) ** 2)

    def t_from_logsnr(self, logsnr):
        return jnp.exp(-0.5 * jnp.asarray(logsnr))     # exact where the bump is negligible (t < 0.3)


@pytest.mark.parametrize("call,match", [
    (lambda p: optimize(p, "unipc", 3, 4), "too small"),
    (lambda p: optimize(p, "dpm_solver++", 2, 2), "too small"),
    (lambda p: optimize(p, "unipc", 1, 1), "too small"),
    (lambda p: optimize(p, "unipc", 3, 8, t_end=1e-5), "outside the range"),
    (lambda p: optimize(p, "unipc", 3, 8, t_start=1.5), "outside the range"),
    (lambda p: optimize(p, "unipc", 3, 8, t_start=0.1, t_end=0.2), "t_start > t_end"),
    (lambda p: optimize(p, "heun", 3, 8), "unknown solver"),
    (lambda p: optimize(p, "unipc", 4, 8), "order must be"),
    (lambda p: optimize(p, "unipc", 3, 8, p=-1.0), "p must be"),
    (lambda p: optimize(p, "unipc", 3, 8, init="cosine"), "unknown init"),
    (lambda p: optimize(p, "unipc", 3, 8, variant="v3"), "unknown variant"),
    (lambda p: optimize(WigglyProcess(), "unipc", 3, 8), "not strictly decreasing"),
])
def test_bad_input_raises_before_compiling(call, match):
    proc = make_process("vp_continuous_linear")
    before = trace_count()
    with pytest.raises(ValueError, match=match):
        call(proc)
    assert trace_count() == before


def test_custom_pytree_process_on_a_monotone_range():
    # the same wiggly process is accepted on a range where its logSNR is monotone; it goes through the
    # generic path (t_from_logsnr inside the compiled optimizer) as a traced pytree: no recompilation for
    # another instance
    g1 = optimize(WigglyProcess(), "unipc", 2, 5, t_start=0.3, t_end=0.01, init="uniform_logsnr")
    assert np.all(np.diff(g1) < 0) and g1[0] == 0.3 and g1[-1] == 0.01
    # away from the bump the process is EDM (sigma = t, alpha = 1): generic path == EDM's closed form
    for g in (g1, np.asarray(grids.uniform_t(EDM(), 5, t_start=0.3, t_end=0.01))):
        np.testing.assert_allclose(objective(WigglyProcess(), g, order=2), objective(EDM(), g, order=2), rtol=1e-9)
    before = trace_count()
    g2 = optimize(WigglyProcess(jnp.asarray(0.05)), "unipc", 2, 5, t_start=0.3, t_end=0.01, init="uniform_logsnr")
    assert trace_count() == before and np.all(np.diff(g2) < 0)


class PlainProcess(NoiseProcess):
    """EDM's alpha = 1, sigma = t as a plain class (not a pytree): it enters the optimizer as a static argument."""
    t_min = 1e-3
    t_max = 1.0

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, float))

    def log_sigma(self, t):
        return jnp.log(jnp.asarray(t))

    def t_from_logsnr(self, logsnr):
        return jnp.exp(-0.5 * jnp.asarray(logsnr))


def test_plain_process_is_a_static_argument():
    proc = PlainProcess()
    g1 = optimize(proc, "unipc", 2, 5, t_start=0.3, t_end=0.01, init="uniform_logsnr")
    before = trace_count()
    g2 = optimize(proc, "unipc", 2, 5, t_start=0.3, t_end=0.01, init="uniform_logsnr", p=2.0)
    assert trace_count() == before                    # the same object: the same program
    assert np.all(np.diff(g1) < 0) and np.all(np.diff(g2) < 0)
    np.testing.assert_allclose(objective(proc, g1, order=2), objective(EDM(), g1, order=2), rtol=1e-12)


def test_nan_objective_returns_finite_grid_with_warning():
    # sigma^p / alpha with p = 300 on EDM overflows to inf at t = 80 => inf - inf = NaN objective everywhere
    proc = EDM()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        g = optimize(proc, "unipc", 3, 6, p=300.0)
    assert np.all(np.isfinite(g)) and np.all(np.diff(g) < 0)
    assert g[0] == proc.t_max and g[-1] == proc.t_min


def test_iteration_limit_warns_and_returns_best_found():
    proc = make_process("vp_continuous_linear")
    # explicit initial grids (4 of them: the executable the default init="all" uses)
    init = np.stack([np.asarray(grids.make_grid(n, proc, 6)) for n in ("karras", "uniform_logsnr", "uniform_t",
                                                                        "time_quadratic")])
    with pytest.warns(RuntimeWarning, match="did not converge"):
        g, info = optimize(proc, "unipc", 3, 6, maxiter=2, init=init, return_info=True)
    assert np.all(np.isfinite(g)) and np.all(np.diff(g) < 0)
    assert not info.converged and info.inits == (0, 1, 2, 3)
    np.testing.assert_allclose(info.init_objectives, [objective(proc, x) for x in init], rtol=1e-9)
    assert info.objective <= info.init_objectives.min() * (1 + 1e-12)
    with pytest.raises(ValueError, match="explicit init"):
        optimize(proc, "unipc", 3, 6, init=init[:, :-1])


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------


def test_cache_miss_optimizes_writes_and_hits(tmp_path, monkeypatch):
    import json
    m = importlib.import_module("jaxdiff.timesteps.cache")
    path = str(tmp_path / "grids.json")
    proc = make_process("vp_continuous_linear")
    g1 = optimized_grid(proc, "unipc", 2, 6, p=2.0, cache_path=path, write=True)
    data = json.load(open(path))
    key = cache_key(proc, "unipc", 2, 6, p=2.0)
    assert key in data["entries"] and data["entries"][key]["grid"] == list(g1)
    copy = str(tmp_path / "copy.json")                # a path not read yet: loaded from the file
    shutil.copy(path, copy)

    def boom(*a, **k):
        raise AssertionError("re-optimized on a cache hit")
    monkeypatch.setattr(m, "optimize", boom)
    g2 = optimized_grid(proc, "unipc", 2, 6, p=2.0, cache_path=copy)
    np.testing.assert_array_equal(g1, g2)
    with pytest.raises(KeyError):
        optimized_grid(proc, "unipc", 2, 6, p=1.0, cache_path=copy, optimize_on_miss=False)
    # keys separate everything that changes the grid
    keys = {cache_key(proc, "unipc", 2, 6, p=2.0), cache_key(proc, "unipc", 2, 6, p=1.0),
            cache_key(proc, "dpm_solver++", 2, 6, p=2.0), cache_key(proc, "unipc", 3, 6, p=2.0),
            cache_key(proc, "unipc", 2, 7, p=2.0), cache_key(proc, "unipc", 2, 6, p=2.0, variant="paper"),
            cache_key(proc, "unipc", 2, 6, p=2.0, init="karras"), cache_key(make_process("edm"), "unipc", 2, 6),
            cache_key(VPDiscrete.from_betas(np.linspace(1e-4, 0.03, 1000)), "unipc", 2, 6)}
    assert len(keys) == 9
    # a discrete schedule keys the same whether it was built with or without x64 (float32 knots)
    vp = make_process("vp_linear")
    vp32 = VPDiscrete(log_alphas=jnp.asarray(np.asarray(vp.log_alphas, np.float32)))
    assert vp32.log_alphas.dtype == jnp.float32
    assert cache_key(vp32, "unipc", 3, 8) == cache_key(vp, "unipc", 3, 8)
