"""Train a model from a config: ``jaxdiff-train`` / ``python -m jaxdiff train`` / ``python train.py``.

    jaxdiff-train --config digits --workdir runs/digits [--config.train.steps=3000 ...]
    jaxdiff-train --config path/to/my_config.py:arg --workdir runs/mine

``--config`` is a shipped config by name (``configs/`` of the repository, ``jaxdiff.configs`` once
installed: digits, cifar10, imagenet64, celeba64, ae_digits, ae_photos, ldm_digits) or a file. The run
resumes from the newest readable checkpoint in ``<workdir>/checkpoints``; SIGTERM saves and exits 0.
Several processes (a pod slice, or localhost tests) start with JAXDIFF_COORDINATOR /
JAXDIFF_NUM_PROCESSES / JAXDIFF_PROCESS_ID (see jaxdiff/parallel.py). See jaxdiff.train_lib.loop.
"""
from __future__ import annotations

import argparse
import sys

from jaxdiff import cli


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(args, overrides)``: ``--config``, ``--workdir`` and any ``--config.section.key=value``."""
    parser = argparse.ArgumentParser(prog="jaxdiff-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="digits", help="shipped config name or file, [:argument]")
    parser.add_argument("--workdir", required=True, help="run folder (checkpoints, metrics, samples)")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments {bad}; overrides look like --config.train.steps=100")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cli.start()

    def run() -> int:
        import jaxdiff.research.sadm  # noqa: F401  (registers task "sadm")
        from jaxdiff.train_lib import config as config_lib
        from jaxdiff.train_lib.loop import train
        config = config_lib.load_config(args.config, overrides)
        train(config, args.workdir)
        return 0
    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
