"""The one interface the training loop meets every experiment at, and the registry of tasks.

An experiment is what a config determines before any data is read: the model, its optimizer, the train
state's shapes and shardings on a mesh, and the train step. ``build_experiment`` picks it by
``config.task`` from :data:`TASKS`, so the loop (``train_lib.loop``) never names a task; a new kind of
training (a research method's) registers a builder here.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from jax.sharding import Mesh

from jaxdiff.train_lib import checkpoint as ckpt
from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib.ae_experiment import build_autoencoder_experiment
from jaxdiff.train_lib.diffusion import build_diffusion_experiment
from jaxdiff.train_lib.lora_experiment import build_lora_experiment


class Experiment(Protocol):
    """What ``train_lib.loop.train`` needs of a training task.

    Attributes:
      config: the validated config; ``mesh``: the device mesh it runs on.
      abstract_state: the train state's shapes and dtypes; ``state_shardings``: its shardings on ``mesh``.
      num_params: trainable parameters (for the log).
    """

    config: Any
    mesh: Mesh
    abstract_state: Any
    state_shardings: Any
    num_params: int

    def init_state(self) -> Any:
        """A fresh train state, created in ``state_shardings``."""

    def abstract_sharded_state(self) -> Any:
        """The restore target: ``ShapeDtypeStruct`` leaves with ``state_shardings``."""

    def batch_shardings(self) -> dict:
        """Sharding of each field of a global batch (``{"image": ..., "label": ...}``)."""

    def make_train_step(self) -> Callable[[Any, dict], tuple[Any, dict]]:
        """Pure ``step(state, batch) -> (state, metrics)``; metrics hold at least ``loss`` and ``lr``."""

    def write_samples(self, state: Any, batch_images, workdir: str, step: int) -> None:
        """Write a PNG of what the model makes now under ``<workdir>/samples/``."""

    def finish(self, state: Any, data_iter, workdir: str, step: int) -> dict:
        """End-of-training work (e.g. the latent scale factor); returns scalars to log."""


def _build_diffusion(config, mesh: Mesh) -> Experiment:
    """Diffusion: text-conditioned (``config.text.encoder`` set, ``train_lib.text_diffusion``) or not."""
    if config.text.encoder is not None:
        from jaxdiff.train_lib.text_diffusion import build_text_diffusion_experiment
        return build_text_diffusion_experiment(config, mesh)
    return build_diffusion_experiment(config, mesh)


TASKS: dict[str, Callable[[Any, Mesh], Experiment]] = {
    "diffusion": _build_diffusion,
    "autoencoder": build_autoencoder_experiment,
    "lora": build_lora_experiment,
}


def register_task(name: str, build: Callable[[Any, Mesh], Experiment]) -> None:
    """Make ``config.task = name`` build its experiment with ``build(config, mesh)``: how a task defined
    above train_lib (a research method's, e.g. ``jaxdiff.research.sadm``) joins the loop. The name must be
    one of ``config.TASKS`` (its keys are in the config schema); registering it again replaces it."""
    if name not in config_lib.TASKS:
        raise ValueError(f"task {name!r} is not in the config schema's tasks {config_lib.TASKS}")
    TASKS[name] = build


def build_experiment(config, mesh: Mesh) -> Experiment:
    """Validate ``config`` and build the experiment of its ``task`` on ``mesh``."""
    config_lib.validate(config)
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} has no registered experiment in this process: import the "
                         f"module that registers it (e.g. jaxdiff.research.{config.task}; the jaxdiff-train / "
                         f"jaxdiff-sample programs do)")
    return TASKS[config.task](config, mesh)


def restore_run(workdir: str, *, task: str | None = None, step: int | None = None, mesh: Mesh | None = None):
    """``(experiment, state, step)`` of a training run's newest readable (or the given) checkpoint, rebuilt
    from the config stored with it on ``mesh`` (default: all devices). Raises FileNotFoundError when there
    is no checkpoint, ValueError when the run is not of ``task`` (None: any)."""
    return ckpt.restore_workdir(workdir, build_experiment, task=task, step=step, mesh=mesh)


#: tasks whose runs train a denoiser that ``load_sampling_model`` can sample (a research task's experiment
#: gives ``sampling_model`` as the diffusion experiment does)
SAMPLING_TASKS = ("diffusion", "sadm", "lora")


def load_sampling_model(workdir: str, *, step: int | None = None, ema: bool = True, mesh: Mesh | None = None):
    """``(SamplingModel, mesh)`` of a diffusion (SADM, LoRA) run's newest readable (or the given) checkpoint: its EMA
    (or raw, ``ema=False``) parameters in their shardings on ``mesh`` (default: all devices), with the
    run's ``config.sample`` as the default settings; latent runs decode."""
    exp, state, restored = restore_run(workdir, task=SAMPLING_TASKS, step=step, mesh=mesh)
    params = state.ema_params if ema else state.params
    return exp.sampling_model(params, step=restored, source=workdir), exp.mesh
