"""The command-line programs, and what they share.

``jaxdiff-train`` / ``jaxdiff-sample`` / ``jaxdiff-evaluate`` (console scripts), ``python -m jaxdiff
train|sample|evaluate``, and the repository's ``train.py`` / ``sample.py`` / ``evaluate.py`` all run
``jaxdiff.cli.{train,sample,evaluate}.main``; each only parses its arguments and calls the package.
Shared here: process start-up (logging, the persistent compilation cache, multi-host start), where a model
comes from and the sampling options, and turning expected errors into one clear line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

log = logging.getLogger("jaxdiff")

# errors a user can fix from the command line: reported as one line, no traceback
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped ``jaxdiff.*`` log lines on stderr (once per process)."""
    root = logging.getLogger("jaxdiff")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)


def compilation_cache_dir() -> str | None:
    """Where the CLI keeps compiled XLA programs between runs: ``$JAXDIFF_COMPILATION_CACHE`` (``0`` or
    ``off`` disables it), else ``$XDG_CACHE_HOME/jaxdiff/xla`` (``~/.cache/jaxdiff/xla``). One folder per
    jax/jaxlib version, so an upgrade never reads programs of another version."""
    setting = os.environ.get("JAXDIFF_COMPILATION_CACHE")
    if setting is not None and setting.lower() in ("0", "off", "false", "none", ""):
        return None
    import jax
    import jaxlib
    base = setting or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxdiff", "xla")
    return os.path.join(base, f"jax{jax.__version__}-jaxlib{jaxlib.__version__}")


def start(level: int = logging.INFO) -> None:
    """Process start-up for a CLI: logging, the recommended XLA:CPU flags, the persistent compilation cache (unless the environment
    already names one: ``JAX_COMPILATION_CACHE_DIR``), then ``jax.distributed`` when the environment
    describes several processes. Must run before anything touches a JAX backend."""
    setup_logging(level)
    from jaxdiff.nn.cpu_flags import apply_recommended_xla_flags
    apply_recommended_xla_flags()        # XLA:CPU flags measured to help (none today), before the backend starts
    import jax
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        folder = compilation_cache_dir()
        if folder is not None:
            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from jaxdiff import parallel
    parallel.initialize_distributed()


def run(main: Callable[[], int]) -> int:
    """``main()``, with an expected error (bad input, a missing file, a damaged checkpoint, a non-finite
    loss) printed as one ``error: ...`` line: exit status 2 for bad input, 1 for a failed run."""
    from jaxdiff.train_lib.checkpoint import CheckpointError
    from jaxdiff.train_lib.loop import NonFiniteLossError
    try:
        return main()
    except (NonFiniteLossError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# --- where a model comes from, and how to sample it --------------------------------------------------

def add_source_arguments(parser: argparse.ArgumentParser, required: bool = True):
    """``--workdir`` (a training run) or ``--diffusers`` (a pipeline or UNet folder); returns the group."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--workdir", help="training run folder (its newest readable checkpoint, or --step)")
    source.add_argument("--diffusers", help="diffusers pipeline or UNet folder with a scheduler config")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    parser.add_argument("--raw", action="store_true", help="the raw parameters instead of the EMA")
    return source


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Solver, grid, steps, guidance, labels and seed; unset values come from the model's defaults."""
    g = parser.add_argument_group("sampling (unset: the run's config.sample)")
    g.add_argument("--solver", default=None, help="a name of jaxdiff.solvers.SOLVERS")
    g.add_argument("--solver_kwargs", default=None, help='JSON, e.g. \'{"order": 3}\'')
    g.add_argument("--grid", default=None, help="uniform_t | uniform_logsnr | time_quadratic | karras | optimized | "
                                                "learned:PATH (a grid file of jaxdiff.solvers.learn_grid)")
    g.add_argument("--steps", type=int, default=None, help="solver steps (NFE for multistep solvers)")
    g.add_argument("--guidance_scale", type=float, default=None)
    g.add_argument("--labels", default=None, help="comma-separated class labels, cycled to --num "
                                                  "(default: 0, 1, 2, ... cycled)")
    g.add_argument("--seed", type=int, default=0)


def load_model(args):
    """``(SamplingModel, mesh)`` from ``--workdir`` (+ ``--step``, ``--raw``) or ``--diffusers``."""
    from jaxdiff import parallel
    if args.workdir:
        import jaxdiff.research.sadm  # noqa: F401  (registers task "sadm": its runs sample like diffusion runs)
        from jaxdiff.train_lib.experiment import load_sampling_model
        return load_sampling_model(args.workdir, step=args.step, ema=not args.raw)
    if args.step is not None or args.raw:
        raise ValueError("--step and --raw apply to --workdir runs, not to --diffusers folders")
    from jaxdiff.convert import load_diffusers_model
    return load_diffusers_model(args.diffusers), parallel.make_mesh()


def sampler_settings(defaults, args):
    """The :class:`~jaxdiff.sampling.SamplerSettings` of the command line over ``defaults`` (a model's)."""
    from jaxdiff.sampling import SamplerSettings
    try:
        kwargs = json.loads(args.solver_kwargs) if args.solver_kwargs else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--solver_kwargs must be a JSON object, got {args.solver_kwargs!r}: {e}") from None
    return SamplerSettings.resolve(defaults, solver=args.solver, solver_kwargs=kwargs, grid=args.grid,
                                   steps=args.steps, guidance_scale=args.guidance_scale)
