"""Checkpoints with orbax: asynchronous saves of the train state, the data-iterator position and the
config; keep the last K; verified restore that falls back to an older step when the newest is damaged.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}`` written by orbax's ``CheckpointManager``
(atomic: a step appears only once fully written) plus ``manifest.json``, the size and CRC-32 of every
file, written by process 0 once the step is committed. A step whose files no longer match its manifest,
or that orbax cannot read, is reported with a warning and the next older step is tried.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
import zlib
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxdiff.parallel import make_mesh
from jaxdiff.train_lib import config as config_lib

MANIFEST = "manifest.json"
ITEMS = ("state", "data", "config")
log = logging.getLogger("jaxdiff.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none could be read."""


def _file_table(step_dir: str) -> dict[str, list[int]]:
    table = {}
    for root, _, files in os.walk(step_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel in (MANIFEST, MANIFEST + ".tmp"):
                continue
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
            table[rel] = [os.path.getsize(path), crc]
    return table


class Checkpointer:
    """Save and restore ``(state, data_state, config_dict)`` under ``directory``.

    Args:
      directory: the checkpoint folder (created).
      keep: how many of the newest steps to keep.
      async_save: write in a background thread (the next save, ``wait`` or ``close`` joins it).
      verify: write and check per-file manifests (local file systems only; skipped for ``gs://``).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, verify: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        self.verify = verify and "://" not in directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: list[int] = []

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start saving ``step``; raises :class:`CheckpointError` if a previous save failed."""
        self.wait()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config)), force=True)
        except Exception as e:
            raise self._failure(step, e) from e
        self._pending.append(step)

    def wait(self) -> None:
        """Block until pending saves are committed, then write their manifests."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step = self._pending[-1] if self._pending else -1
            self._pending.clear()
            raise self._failure(step, e) from e
        if self.verify and jax.process_index() == 0:
            for step in self._pending:
                step_dir = os.path.join(self.directory, str(step))
                if os.path.isdir(step_dir):
                    table = _file_table(step_dir)
                    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
                    with open(tmp, "w") as f:
                        json.dump(table, f)
                    os.replace(tmp, os.path.join(step_dir, MANIFEST))
        self._pending.clear()

    def _failure(self, step: int, error: Exception) -> CheckpointError:
        kept = self.all_steps()
        return CheckpointError(f"saving the checkpoint of step {step} in {self.directory} failed "
                               f"({type(error).__name__}: {error}); the checkpoints already there "
                               f"({kept or 'none'}) were not modified")

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes have reached the step at which to save for a preemption notice (orbax's
        check of the JAX distributed runtime's preemption sync point: no collective unless a notice came;
        False in a single-process run, which handles SIGTERM itself)."""
        return bool(self._manager.reached_preemption(step))

    def close(self) -> None:
        """Finish pending saves and release orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    # -- reading -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        try:
            self._manager.reload()
        except Exception:
            pass
        return sorted(self._manager.all_steps())

    def check(self, step: int) -> str | None:
        """``None`` if ``step``'s files match its manifest (or it has none yet), else what is wrong."""
        step_dir = os.path.join(self.directory, str(step))
        path = os.path.join(step_dir, MANIFEST)
        if not self.verify or not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                expected = json.load(f)
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        actual = _file_table(step_dir)
        for name, (size, crc) in expected.items():
            if name not in actual:
                return f"file {name} is missing"
            if actual[name][0] != size:
                return f"file {name} has {actual[name][0]} bytes, expected {size} (truncated?)"
            if actual[name][1] != crc:
                return f"file {name} fails its CRC-32 check (corrupted)"
        return None

    def read_config(self, step: int) -> dict:
        """The config dict stored with ``step`` (no arrays are read)."""
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:   # noqa: BLE001
            raise CheckpointError(f"cannot read the config of step {step} in {self.directory}: {e}") from e
        return dict(out.config)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """``(step, state, data_state, config)`` of the newest readable step (or exactly ``step``);
        ``None`` when the folder holds no checkpoint. ``abstract_state``: a tree of
        ``jax.ShapeDtypeStruct`` with the target shardings (any mesh: 8 devices restore on 1 and back).
        A damaged newest step gives a warning and the previous one is used; :class:`CheckpointError`
        if none can be read."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; steps: {steps}")
            steps = [step]
        if not steps:
            return None
        problems = []
        for s in reversed(steps):
            problem = self.check(s)
            if problem is None:
                try:
                    out = self._manager.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore()))
                    if problems:
                        warnings.warn(f"restored step {s} instead: newer checkpoints are damaged "
                                      f"({'; '.join(problems)})", stacklevel=2)
                    return s, out.state, out.data, out.config
                except Exception as e:   # noqa: BLE001 - any read failure means a damaged step
                    problem = f"{type(e).__name__}: {str(e)[:300]}"
            problems.append(f"step {s}: {problem}")
            warnings.warn(f"checkpoint of step {s} in {self.directory} is damaged ({problem}); "
                          "trying the previous one", stacklevel=2)
        raise CheckpointError(f"no readable checkpoint in {self.directory}: {'; '.join(problems)}")


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree (with shardings) of a live tree: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_workdir(workdir: str, build: Callable, *, task: str | None = None, step: int | None = None,
                    mesh=None) -> tuple[Any, Any, int]:
    """``(experiment, state, step)``: the config stored with a run's newest readable (or the given) step,
    ``build(config, mesh)`` on ``mesh`` (default: all devices), and the state restored into its shardings.
    Raises FileNotFoundError when ``<workdir>/checkpoints`` holds no checkpoint, ValueError when the run's
    task is not ``task`` (a name or a tuple of names; None: any)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}: train first (jaxdiff-train --workdir {workdir})")
    reader = Checkpointer(directory, async_save=False)
    try:
        steps = reader.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no committed checkpoint")
        config = config_lib.config_from_dict(reader.read_config(step if step is not None else steps[-1]))
        allowed = (task,) if isinstance(task, str) else tuple(task or ())
        if task is not None and config.task not in allowed:
            name = " or ".join(allowed)
            article = "an" if name[0] in "aeiou" else "a"
            raise ValueError(f"{workdir} is a {config.task!r} run, not {article} {name} run")
        exp = build(config, mesh if mesh is not None else make_mesh())
        restored_step, state, _, _ = reader.restore(exp.abstract_sharded_state(), step)
    finally:
        reader.close()
    return exp, state, restored_step
