"""Draw samples: ``python sample.py --workdir runs/digits --num 100`` (see jaxdiff/cli/sample.py; installed, the
same program is ``jaxdiff-sample``)."""
import sys

from jaxdiff.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
