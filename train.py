"""Train a model: ``python train.py --config configs/digits.py --workdir runs/digits`` (see jaxdiff/cli/train.py;
installed, the same program is ``jaxdiff-train``)."""
import sys

from jaxdiff.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
