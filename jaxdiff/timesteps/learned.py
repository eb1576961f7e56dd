"""Learned time grids as artifacts: a JSON file holding the grid and where it came from.

A grid learned for one model, process, solver and step count (`jaxdiff.solvers.learned_grid.learn_grid`)
is only good for that combination, so the file records it and `load_grid` refuses a file made for
anything else, naming what differs:

    {"format": "jaxdiff learned time grid", "version": 1,
     "grid": [t_0, ..., t_N],                       float64 times, strictly decreasing
     "process": "VPLinear(beta_min=0.1, ...)",      cache.process_key(process)
     "solver": {"name": "unipc", "class": "UniPC", "options": {"order": 3, ...}},
     "order": 3, "nfe": 8, "steps": 8,
     "guidance_scale": null, "model": "<name or hash>", "calibration_size": 256,
     ... (teacher, init, optimizer settings, losses, timings, library versions)}

This module is pure (no solver import: timesteps sits below solvers in the layer order); a solver is
described by its class name and dataclass fields, which is what `load_grid` compares.

Public API: `save_grid`, `load_grid`, `read_grid_file`, `solver_description`, `tree_hash`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from jaxdiff.noise import NoiseProcess
from jaxdiff.timesteps.cache import process_key
from jaxdiff.timesteps.grids import check_grid

__all__ = ["FORMAT", "VERSION", "save_grid", "load_grid", "read_grid_file", "solver_description", "tree_hash"]

FORMAT = "jaxdiff learned time grid"
VERSION = 1


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"class": type(v).__name__, **{f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    return repr(v)


def solver_description(solver: Any, name: str | None = None) -> dict:
    """{"name", "class", "options"} of a solver: `name` is its registry name (`jaxdiff.solvers.SOLVERS`)
    when known; a solver given as a plain name has no class or options."""
    if isinstance(solver, str):
        return {"name": solver, "class": None, "options": None}
    if not dataclasses.is_dataclass(solver):
        raise ValueError(f"cannot describe solver {solver!r}: expected a name or a solver dataclass")
    opts = {f.name: _jsonable(getattr(solver, f.name)) for f in dataclasses.fields(solver)}
    return {"name": name, "class": type(solver).__name__, "options": opts}


def tree_hash(tree: Any) -> str:
    """A short SHA-256 of a pytree of arrays (e.g. a model's parameters), to record which model a grid was
    learned for. Leaves are hashed in flattening order with their dtype and shape."""
    import jax   # jax is a dependency of every layer; imported here to keep module import light

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()[:24]


def save_grid(path: str, grid, *, process: NoiseProcess, solver: Any, nfe: int, solver_name: str | None = None,
              guidance_scale: float | None = None, model: str | None = None, calibration_size: int | None = None,
              **provenance: Any) -> dict:
    """Write a learned grid and its provenance to `path` (JSON, atomically). Returns the written record.

    Args:
      grid: (N+1,) strictly decreasing times.
      process, solver, nfe: what the grid was learned for (solver: a name or a solver instance).
      solver_name: the solver's registry name when `solver` is an instance.
      guidance_scale, model (a name or `tree_hash` of the parameters), calibration_size: provenance that
        `load_grid` can check; any further keyword is stored as given (JSON-serialisable values).
    """
    g = np.asarray(grid, np.float64)
    check_grid(process, g)
    desc = solver_description(solver, solver_name)
    order = (desc["options"] or {}).get("order")
    record = {"format": FORMAT, "version": VERSION, "grid": [float(x) for x in g],
              "process": process_key(process), "process_class": type(process).__name__,
              "solver": desc, "order": order, "nfe": int(nfe), "steps": int(g.size - 1),
              "guidance_scale": None if guidance_scale is None else float(guidance_scale),
              "model": model, "calibration_size": calibration_size}
    record.update({k: _jsonable(v) for k, v in provenance.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return record


def read_grid_file(path: str) -> dict:
    """The record of a learned-grid file, checked for format and version (ValueError otherwise)."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"learned grid file {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"learned grid file {path!r} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a jaxdiff learned time grid (no format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise ValueError(f"{path!r} has learned-grid format version {record.get('version')!r}; "
                         f"this jaxdiff reads version {VERSION}")
    return record


_UNSET = object()


def load_grid(path: str, process: NoiseProcess, solver: Any, nfe: int, *, model: str | None = None,
              guidance_scale: Any = _UNSET) -> np.ndarray:
    """The grid of a learned-grid file, after checking that it was learned for this use.

    Args:
      path: a file written by `save_grid` (`LearnedGrid.save`).
      process: the noise process sampling will use (compared by `cache.process_key`).
      solver: the solver sampling will use: an instance (class and every option compared, e.g.
        `make_solver("unipc", order=3)`) or a registry name (compared with the recorded name only).
      nfe: the number of model evaluations sampling will use.
      model: if given, must equal the recorded model name / hash (a file without one is accepted).
      guidance_scale: if given (None included), must equal the recorded scale.
    Returns:
      numpy float64 (steps+1,) strictly decreasing grid.
    Raises:
      ValueError naming every mismatch (process, solver, options, NFE, model, guidance).
    """
    rec = read_grid_file(path)
    problems = []
    if rec.get("process") != process_key(process):
        problems.append(f"process: file {rec.get('process')}, requested {process_key(process)}")
    want = solver_description(solver)
    have = rec.get("solver") or {}
    if isinstance(solver, str):
        if have.get("name") != solver:
            problems.append(f"solver: file {have.get('name') or have.get('class')!r}, requested {solver!r}")
    else:
        if have.get("class") != want["class"]:
            problems.append(f"solver: file {have.get('class')!r}, requested {want['class']!r}")
        else:
            diff = {k: (have.get("options", {}).get(k), v) for k, v in want["options"].items()
                    if have.get("options", {}).get(k) != v}
            if diff:
                problems.append("solver options: " + ", ".join(f"{k} file {a!r} requested {b!r}"
                                                               for k, (a, b) in sorted(diff.items())))
    if int(rec.get("nfe", -1)) != int(nfe):
        problems.append(f"NFE: file {rec.get('nfe')}, requested {nfe}")
    if model is not None and rec.get("model") is not None and rec["model"] != model:
        problems.append(f"model: file {rec['model']!r}, requested {model!r}")
    if guidance_scale is not _UNSET:
        g = None if guidance_scale is None else float(guidance_scale)
        if rec.get("guidance_scale") != g:
            problems.append(f"guidance scale: file {rec.get('guidance_scale')!r}, requested {g!r}")
    if problems:
        raise ValueError(f"learned grid {path!r} was made for another setting: " + "; ".join(problems))
    g = np.asarray(rec["grid"], np.float64)
    check_grid(process, g)
    return g
