"""Time grids learned through the compiled sampler (the idea of LD3, "Learning to Discretize Denoising
Diffusion ODEs", Tong et al., ICLR 2025).

`sample` takes the grid as a traced input, so the few-step sampler is a differentiable function of its
time points. `learn_grid` fits them directly to what a user wants: the few-step solution from a set of
calibration noises should equal a many-step ("teacher") solution from the same noises.

    loss(grid) = mean_b  d(student(x_T^b; grid), teacher(x_T^b))          (d: squared L2 per element)

Parameterization (monotone, end points fixed): with l = logSNR, l_0 = l(t_start), l_N = l(t_end),

    l_i = l_0 + (l_N - l_0) * sum_{j < i} softmax(theta)_j,    t_i = t_from_logsnr(l_i),

so every theta gives a strictly decreasing grid from exactly t_start to exactly t_end (a grid ending at
sigma = 0 keeps that last point and learns the N-1 intervals before it). The optimizer is optax Adam
(cosine-decayed step size) in one `lax.scan`, compiled once; the best iterate on the calibration loss is
returned. Works for every deterministic solver of `jaxdiff.solvers` (the step count is found from the
NFE), any process, conditioning and classifier-free guidance.

This module runs solvers, so it lives in `solvers/` (timesteps sits below solvers in the layer order);
the file format and `load_grid` are in `jaxdiff.timesteps.learned`.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.noise import NoiseProcess
from jaxdiff.solvers.base import make_sched
from jaxdiff.solvers.dpm_solver import DPMSolverMultistep
from jaxdiff.solvers.sampling import SOLVERS, _min_steps, make_solver, sample
from jaxdiff.solvers.unipc import UniPC
from jaxdiff.timesteps import grids as _grids
from jaxdiff.timesteps.cache import optimized_grid
from jaxdiff.timesteps.learned import save_grid

__all__ = ["learn_grid", "LearnedGrid", "teacher_solution", "make_grid_loss", "grid_to_params", "params_to_grid",
           "steps_for_nfe", "solver_registry_name", "MIN_SAMPLES_PER_PARAMETER", "HAND_INITS"]

Array = jax.Array

# fewer calibration samples than this per free grid point draws a warning (the grid may fit the set): on the
# 16-D mixture, 256 samples for the 9 free points of a 10-step UniPC-3 grid (28 each) overfit (calibration
# RMSE 0.0065, held-out 0.065 and worse than time-quadratic on 1 seed of 3); 1024 did not
# (benchmarks/results/learned_grid.md)
MIN_SAMPLES_PER_PARAMETER = 32
HAND_INITS = ("uniform_t", "uniform_logsnr", "time_quadratic", "karras")


# ----------------------------------------------------------------------------------------------------
# the parameterization
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Frame:
    """The fixed part of a grid: end points (and the sigma = 0 point if the grid ends there)."""
    t_start: float
    t_end: float
    zero_tail: bool          # the grid ends at process.t_zero after t_end
    t_zero: float


def _frame(process: NoiseProcess, grid: np.ndarray) -> _Frame:
    g = np.asarray(grid, np.float64)
    zero_tail = bool(np.isclose(float(process.sigma(g[-1])), 0.0, atol=0.0))
    body = g[:-1] if zero_tail else g
    if body.size < 2:
        raise ValueError("a grid ending at sigma = 0 needs at least 2 steps to learn")
    l0, l1 = float(process.logsnr(body[0])), float(process.logsnr(body[-1]))
    if not (np.isfinite(l0) and np.isfinite(l1)):
        raise ValueError(f"logSNR is not finite at the grid's end points t={body[0]}, t={body[-1]}")
    return _Frame(float(body[0]), float(body[-1]), zero_tail, float(g[-1]))


def grid_to_params(process: NoiseProcess, grid) -> Array:
    """theta (n,) of a strictly decreasing grid: log of its logSNR increments (n intervals between the end
    points; a final sigma = 0 point is not counted). `params_to_grid` inverts it up to rounding."""
    g = np.asarray(grid, np.float64)
    fr = _frame(process, g)
    body = g[:-1] if fr.zero_tail else g
    lam = np.asarray(process.logsnr(jnp.asarray(body)), np.float64)
    inc = np.diff(lam)
    if not np.all(inc > 0):
        raise ValueError("grid logSNR must increase strictly along the grid")
    return jnp.asarray(np.log(inc / inc.sum()))


def params_to_grid(process: NoiseProcess, theta: Array, frame: _Frame) -> Array:
    """The grid (n+1,) (+1 with a sigma = 0 tail) of parameters theta (n,) in `frame` (differentiable)."""
    dtype = theta.dtype
    l0 = jnp.asarray(process.logsnr(frame.t_start), dtype)
    l1 = jnp.asarray(process.logsnr(frame.t_end), dtype)
    frac = jnp.cumsum(jax.nn.softmax(theta))[:-1]
    inner = process.t_from_logsnr(l0 + (l1 - l0) * frac).astype(dtype)
    parts = [jnp.full((1,), frame.t_start, dtype), inner, jnp.full((1,), frame.t_end, dtype)]
    if frame.zero_tail:
        parts.append(jnp.full((1,), frame.t_zero, dtype))
    return jnp.concatenate(parts)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def solver_registry_name(solver) -> str | None:
    """The name in `SOLVERS` whose factory builds this solver's class with the same fixed options
    (e.g. DPMSolverMultistep(prediction="data") -> "dpm_solver++"), or None."""
    if isinstance(solver, str):
        return solver
    items = sorted(SOLVERS.items(), key=lambda kv: -len(getattr(kv[1], "keywords", {}) or {}))
    for name, factory in items:
        cls = getattr(factory, "func", factory)
        fixed = getattr(factory, "keywords", {}) or {}
        if type(solver) is cls and all(getattr(solver, k, None) == v for k, v in fixed.items()):
            if name == "dpm_solver++" and getattr(solver, "sde", False):
                continue
            return name
    return None


def steps_for_nfe(solver, process: NoiseProcess, nfe: int, final: str = "t_min") -> int:
    """The number of grid intervals on which `solver` makes exactly `nfe` model evaluations."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    for steps in range(max(1, _min_steps(solver)), int(nfe) + 1):
        try:
            solver.validate(steps)
        except ValueError:
            continue
        g = _grids.uniform_t(process, steps, final=final)
        if int(solver.nfe(make_sched(process, g, jnp.float32))) == nfe:
            return steps
    raise ValueError(f"{type(solver).__name__} cannot make exactly {nfe} model evaluations on a grid "
                     f"(final point {final!r})")


def _xue_grid(process, solver, steps, frame_kw):
    if isinstance(solver, UniPC):
        name, order = "unipc", solver.order
    elif isinstance(solver, DPMSolverMultistep) and not solver.sde:
        name, order = "dpm_solver++", solver.order
    else:
        from jaxdiff.solvers.ddim import DDIM
        if isinstance(solver, DDIM):
            name, order = "dpm_solver++", 1
        else:
            raise ValueError(f"init 'xue' (Xue et al.'s optimized steps) exists for UniPC, DPM-Solver(++) "
                             f"multistep and DDIM, not {type(solver).__name__}")
    if frame_kw["final"] != "t_min":
        raise ValueError("init 'xue' needs final='t_min' (the optimized grids end at t_end)")
    lof = getattr(solver, "lower_final_below", None) or "always" if name == "dpm_solver++" else True
    if not getattr(solver, "lower_order_final", True):
        lof = False
    return np.asarray(optimized_grid(process, name, order, steps, t_start=frame_kw["t_start"],
                                     t_end=frame_kw["t_end"], lower_order_final=lof), np.float64)


def _init_grid(init, process, solver, steps, frame_kw) -> tuple[str, np.ndarray]:
    if isinstance(init, str):
        if init in HAND_INITS:
            return init, np.asarray(_grids.make_grid(init, process, steps, **frame_kw), np.float64)
        if init == "xue":
            return init, _xue_grid(process, solver, steps, frame_kw)
        raise ValueError(f"unknown init {init!r}; choose one of {list(HAND_INITS) + ['xue', 'best']}, "
                         "a list of them, or an explicit grid")
    g = np.asarray(init, np.float64)
    _grids.check_grid(process, g)
    if g.shape != (steps + 1,):
        raise ValueError(f"the initial grid has {g.size - 1} steps; {type(solver).__name__} needs {steps} "
                         f"for the requested NFE")
    return "explicit", g


def teacher_solution(denoiser, process: NoiseProcess, x_T: Array, grid_start: float, grid_end: float, *,
                     steps: int = 256, solver: Any = None, final: str = "t_min", prediction: str = "eps",
                     **sample_kwargs) -> Array:
    """The many-step solution learned grids are fitted to: `solver` (default DPM-Solver++(3M)) on a
    uniform-logSNR grid of `steps` steps over the same end points as the student."""
    solver = DPMSolverMultistep(order=3) if solver is None else solver
    solver = make_solver(solver) if isinstance(solver, str) else solver
    g = _grids.uniform_logsnr(process, steps, t_start=grid_start, t_end=grid_end, final=final)
    return sample(denoiser, process, x_T, g, solver=solver, prediction=prediction, **sample_kwargs)


# ----------------------------------------------------------------------------------------------------
# learn_grid
# ----------------------------------------------------------------------------------------------------

def make_grid_loss(denoiser, process: NoiseProcess, solver: Any, init_grid, *, distance=None, per_sample=False,
                   **sample_kwargs):
    """(loss(theta, x_T, target), theta0): the calibration loss of the grid with parameters theta (the frame:
    end points and any sigma = 0 tail, taken from `init_grid`) and the parameters of `init_grid` itself;
    `per_sample`: the (B,) distances instead of their mean. `learn_grid` minimizes it; exposed for tests
    (gradient against finite differences) and custom loops."""
    solver = make_solver(solver) if isinstance(solver, str) else solver
    frame = _frame(process, np.asarray(init_grid, np.float64))
    dist = _sq_l2 if distance is None else distance

    def loss_fn(theta, x_T, target):
        grid = params_to_grid(process, theta, frame)
        x = sample(denoiser, process, x_T, grid, solver=solver, **sample_kwargs)
        d = dist(x, target.astype(x.dtype))
        return d if per_sample else jnp.mean(d)

    return loss_fn, grid_to_params(process, init_grid)


@dataclasses.dataclass
class LearnedGrid:
    """The result of `learn_grid`. `grid` (numpy float64) is what `sample` takes; `save(path)` writes it
    with `provenance` for `jaxdiff.timesteps.learned.load_grid`."""
    grid: np.ndarray
    init_grid: np.ndarray
    init_name: str
    loss_init: float
    loss: float
    history: np.ndarray              # calibration loss at each optimizer step (before its update)
    teacher_s: float                 # teacher solve, compile included
    compile_s: float                 # trace + compile of the optimizer loop
    learn_s: float                   # the compiled optimizer loop
    provenance: dict

    def save(self, path: str) -> dict:
        p = dict(self.provenance)
        return save_grid(path, self.grid, process=p.pop("_process"), solver=p.pop("_solver"), nfe=p.pop("nfe"),
                         solver_name=p.pop("solver_name"), guidance_scale=p.pop("guidance_scale"),
                         model=p.pop("model"), calibration_size=p.pop("calibration_size"),
                         init_grid=[float(x) for x in self.init_grid], init=self.init_name,
                         loss_init=self.loss_init, loss=self.loss, teacher_s=self.teacher_s,
                         compile_s=self.compile_s, learn_s=self.learn_s, **p)


def _sq_l2(x, y):
    d = (x - y).reshape(x.shape[0], -1)
    return jnp.mean(d * d, axis=1)


def learn_grid(denoiser: Callable[..., Array], process: NoiseProcess, solver: Any, nfe: int,
               calibration_noise: Array, *, teacher_steps: int = 256, teacher_solver: Any = None,
               teacher: Array | None = None, init: Any = "uniform_logsnr", steps: int = 300, lr: float = 0.05,
               prediction: str = "eps", cond: Any = None, uncond: Any = None,
               guidance_scale: float | None = None, distance: Callable[[Array, Array], Array] | None = None,
               t_start: float | None = None, t_end: float | None = None, final: str = "t_min",
               remat: bool = False, model: str | None = None, soft_teacher_forcing: Any = None,
               shift_lr: float | None = None) -> LearnedGrid:
    """Learn the time grid of a few-step deterministic sampler by gradient descent through it.

    Args:
      denoiser: f(x, t[, cond]) -> prediction of kind `prediction` (as for `sample`).
      process: its noise process.
      solver: a deterministic solver (instance or name of `SOLVERS`).
      nfe: model evaluations of the student; the grid gets the steps that make exactly this many.
      calibration_noise: x_T (B, ...) the grid is fitted on (e.g. `process.prior_sample`); keep held-out
        noise apart for any evaluation.
      teacher_steps, teacher_solver: the many-step teacher (default DPM-Solver++(3M), uniform logSNR, 256
        steps), solved once from the calibration noise; teacher_steps must exceed the student's steps.
      teacher: precomputed teacher solutions (B, ...) instead (e.g. an exact ODE solution).
      init: "uniform_logsnr" (default), "uniform_t", "time_quadratic", "karras", "xue" (Xue et al.'s
        optimized grid for UniPC / DPM-Solver++ / DDIM), an explicit grid, or "best" / a list of these:
        start from the one with the lowest calibration loss.
      steps, lr: Adam steps and peak step size (cosine decay to 0) on the parameters theta.
      prediction, cond, uncond, guidance_scale: passed to `sample` (cond / uncond batched like the noise).
      distance: d(student, teacher) -> (B,) per-sample distance (e.g. a feature-space distance); default
        mean squared error per sample.
      t_start, t_end, final: end points (default the process's) and final point ('t_min' or 'zero');
        an explicit init grid sets them itself.
      remat: rematerialise each model call in the backward pass (jax.checkpoint): memory for networks.
      model: a name or hash (`timesteps.learned.tree_hash(params)`) recorded as provenance.
      soft_teacher_forcing: LD3's surrogate. None (default): fit student(x_T) to teacher(x_T). A radius r,
        or "ld3" for LD3's rule r = 0.001 * D / steps^2 (D: elements of one sample): the student starts from
        x'_T, a per-sample copy of the noise that moves (gradient step of `shift_lr` on its own loss, kept
        only where that loss falls) inside the L2 ball of radius r around x_T, so the few parameters are
        not asked to map every noise exactly. The returned grid and its losses are for the real x_T.
      shift_lr: step size of x'_T (default LD3's 12 / steps).
    Returns:
      LearnedGrid (grid, losses, timings, provenance; `.save(path)`).
    Raises:
      ValueError: stochastic solver, too few teacher steps, bad init or NFE. Warns (UserWarning) when the
      calibration set has fewer than MIN_SAMPLES_PER_PARAMETER samples per free grid point.
    """
    solver = make_solver(solver) if isinstance(solver, str) else solver
    if solver.stochastic:
        raise ValueError(f"{type(solver).__name__} is stochastic; learned grids need a deterministic solver")
    x_T = jnp.asarray(calibration_noise)
    if x_T.ndim < 2:
        raise ValueError(f"calibration_noise must be batched (B, ...), got shape {x_T.shape}")
    n_cal = int(x_T.shape[0])
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"optimizer steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")

    if soft_teacher_forcing is not None and not (soft_teacher_forcing == "ld3" or (
            isinstance(soft_teacher_forcing, (int, float)) and not isinstance(soft_teacher_forcing, bool)
            and np.isfinite(soft_teacher_forcing) and soft_teacher_forcing > 0)):
        raise ValueError(f"soft_teacher_forcing must be None, 'ld3' or a positive radius, got {soft_teacher_forcing!r}")

    # the grid's frame and the initial grid(s)
    explicit = not isinstance(init, (str, list, tuple)) or (
        isinstance(init, (list, tuple)) and not all(isinstance(i, str) for i in init))
    if explicit:
        g0 = np.asarray(init, np.float64)
        _grids.check_grid(process, g0)
        fr0 = _frame(process, g0)
        t_start, t_end, final = fr0.t_start, fr0.t_end, "zero" if fr0.zero_tail else "t_min"
    t_start = float(process.t_max if t_start is None else t_start)
    t_end = float(process.t_min if t_end is None else t_end)
    grid_steps = steps_for_nfe(solver, process, nfe, final)
    free = grid_steps - 1 - (1 if final == "zero" else 0)
    if free < 1:
        raise ValueError(f"{grid_steps} steps with final={final!r} leave no free time point to learn")
    if teacher is None and (isinstance(teacher_steps, bool) or not isinstance(teacher_steps, (int, np.integer))
                            or teacher_steps <= grid_steps):
        raise ValueError(f"the teacher needs more steps than the student: teacher_steps={teacher_steps!r}, "
                         f"student steps={grid_steps} (NFE {nfe})")
    if n_cal < MIN_SAMPLES_PER_PARAMETER * free:
        warnings.warn(f"calibration set of {n_cal} samples for {free} free grid points: the grid may fit these "
                      f"samples rather than the model; use >= {MIN_SAMPLES_PER_PARAMETER * free}", stacklevel=2)
    frame_kw = {"t_start": t_start, "t_end": t_end, "final": final}
    if explicit:
        names = [init]
    elif isinstance(init, str) and init == "best":
        names = list(HAND_INITS) + (["xue"] if _xue_ok(solver, final) else [])
    elif isinstance(init, (list, tuple)):
        names = list(init)
    else:
        names = [init]
    cands = [_init_grid(i, process, solver, grid_steps, frame_kw) for i in names]

    sample_kw = dict(prediction=prediction, cond=cond, uncond=uncond, guidance_scale=guidance_scale)
    den = jax.checkpoint(denoiser) if remat else denoiser

    # the teacher, once
    t0 = time.perf_counter()
    if teacher is None:
        target = teacher_solution(denoiser, process, x_T, t_start, t_end, steps=int(teacher_steps),
                                  solver=teacher_solver, final=final, **sample_kw)
    else:
        target = jnp.asarray(teacher)
        if target.shape[0] != n_cal:
            raise ValueError(f"teacher has {target.shape[0]} samples, calibration_noise {n_cal}")
    target = jax.block_until_ready(target)
    teacher_s = time.perf_counter() - t0

    pdtype = jnp.promote_types(x_T.dtype, jnp.float32)
    loss_fn, _ = make_grid_loss(den, process, solver, cands[0][1], distance=distance, **sample_kw)
    thetas = [grid_to_params(process, g).astype(pdtype) for _, g in cands]
    if len(cands) > 1 or steps == 0:             # one more compilation: the forward loss alone
        loss_jit = jax.jit(loss_fn)
        losses = [float(loss_jit(th, x_T, target)) for th in thetas]
        k = int(np.nanargmin(losses))
    else:                                        # the first optimizer step evaluates the start
        k, losses = 0, None
    init_name, init_grid, theta0 = cands[k][0], cands[k][1], thetas[k]

    sched = optax.cosine_decay_schedule(lr, max(int(steps), 1))
    opt = optax.adam(sched)
    radius = shift = None
    if soft_teacher_forcing is not None:
        dim = int(np.prod(x_T.shape[1:]))
        radius = 0.001 * dim / grid_steps ** 2 if soft_teacher_forcing == "ld3" else float(soft_teacher_forcing)
        shift = 12.0 / grid_steps if shift_lr is None else float(shift_lr)
        stf_run = _soft_teacher_forcing_run(make_grid_loss(den, process, solver, cands[0][1], distance=distance,
                                                             per_sample=True, **sample_kw)[0],
                                              loss_fn, opt, int(steps), radius, shift, pdtype)

    def run(theta0, x_T, target):
        def body(carry, _):
            theta, state, best, best_loss = carry
            loss, g = jax.value_and_grad(loss_fn)(theta, x_T, target)
            ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g))
            better = ok & (loss < best_loss)
            best = jnp.where(better, theta, best)
            best_loss = jnp.where(better, loss, best_loss)
            g = jnp.where(ok, g, 0.0)
            upd, state = opt.update(g, state, theta)
            return (optax.apply_updates(theta, upd), state, best, best_loss), loss

        init_carry = (theta0, opt.init(theta0), theta0, jnp.asarray(jnp.inf, pdtype))
        (theta, _, best, best_loss), hist = jax.lax.scan(body, init_carry, None, length=int(steps))
        last = loss_fn(theta, x_T, target)
        take = jnp.isfinite(last) & (last < best_loss)
        return jnp.where(take, theta, best), jnp.where(take, last, best_loss), hist

    if steps == 0:                               # nothing to optimize: the (best) initial grid
        theta, loss, hist, compile_s, learn_s = theta0, losses[k], np.zeros((0,)), 0.0, 0.0
    else:
        t0 = time.perf_counter()
        compiled = jax.jit(run if radius is None else lambda *a: stf_run(*a)[:3]).lower(theta0, x_T, target).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theta, loss, hist = jax.block_until_ready(compiled(theta0, x_T, target))
        learn_s = time.perf_counter() - t0
    loss = float(loss)
    loss0 = losses[k] if losses is not None else float(hist[0])
    if not np.isfinite(loss) or loss > loss0:        # never worse than the start on the calibration set
        theta, loss = theta0, loss0
    grid = np.asarray(params_to_grid(process, jnp.asarray(theta), _frame(process, cands[0][1])), np.float64)
    _grids.check_grid(process, grid)

    name = solver_registry_name(solver)
    provenance = {
        "_process": process, "_solver": solver, "nfe": int(nfe), "solver_name": name,
        "guidance_scale": guidance_scale, "model": model, "calibration_size": n_cal,
        "teacher": ({"solver": repr(teacher_solver or DPMSolverMultistep(order=3)), "steps": int(teacher_steps),
                     "grid": "uniform_logsnr"} if teacher is None else "given"),
        "loss_fn": "mean squared error" if distance is None else getattr(distance, "__name__", repr(distance)),
        "optimizer": {"name": "adam", "lr": float(lr), "schedule": "cosine", "steps": int(steps)},
        "parameterization": "softmax logSNR increments, end points fixed", "final": final,
        "soft_teacher_forcing": None if radius is None else {"radius": radius, "shift_lr": shift},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
    }
    return LearnedGrid(grid=grid, init_grid=np.asarray(init_grid, np.float64), init_name=init_name,
                       loss_init=float(loss0), loss=loss, history=np.asarray(hist), teacher_s=teacher_s,
                       compile_s=compile_s, learn_s=learn_s, provenance=provenance)


def _soft_teacher_forcing_run(per_sample_loss, loss_fn, opt, steps: int, radius: float, shift: float, pdtype):
    """The optimizer loop of LD3's soft teacher forcing: `run(theta0, x_T, target) -> (theta, loss, history,
    x')`, x' (B, ...) the moved noises at the end.

    Each step: the grid gradient of the mean loss at the moved noises x' (Adam), and for x' a gradient step on
    each sample's own loss, projected back into the ball |x' - x_T| <= radius and kept only where that
    sample's loss (with the updated grid) fell -- the acceptance rule of the official code. The grid returned
    is the last one (the surrogate loss of different x' is not comparable across steps); its loss is on x_T.
    """
    def vec(theta, x, target):
        v = per_sample_loss(theta, x, target)
        return jnp.mean(v), v

    def run(theta0, x_T, target):
        def body(carry, _):
            theta, state, x = carry
            (loss, v), (g, gx) = jax.value_and_grad(vec, argnums=(0, 1), has_aux=True)(theta, x, target)
            ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(gx))
            upd, state = opt.update(jnp.where(ok, g, 0.0), state, theta)
            theta = optax.apply_updates(theta, upd)
            n = x.shape[0]
            prop = x - shift * n * jnp.where(ok, gx, 0.0)        # n * d(mean)/dx_b = d(loss_b)/dx_b
            diff = (prop - x_T).reshape(n, -1)
            norm = jnp.sqrt(jnp.sum(diff * diff, axis=1))
            scale = jnp.where(norm > radius, radius / jnp.maximum(norm, 1e-30), 1.0)
            prop = x_T + (diff * scale[:, None]).reshape(x.shape)
            accept = per_sample_loss(theta, prop, target) < v
            x = jnp.where(accept.reshape((n,) + (1,) * (x.ndim - 1)), prop, x)
            return (theta, state, x), loss

        (theta, _, x), hist = jax.lax.scan(body, (theta0, opt.init(theta0), x_T), None, length=steps)
        return theta, loss_fn(theta, x_T, target).astype(pdtype), hist, x

    return run


def _xue_ok(solver, final) -> bool:
    from jaxdiff.solvers.ddim import DDIM
    return final == "t_min" and (isinstance(solver, (UniPC, DDIM)) or
                                 (isinstance(solver, DPMSolverMultistep) and not solver.sde))
