"""Score samples: ``python evaluate.py --workdir runs/digits --features digits --ref_stats ...`` (see
jaxdiff/cli/evaluate.py; installed, the same program is ``jaxdiff-evaluate``)."""
import sys

from jaxdiff.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
