"""The layer order is a contract: `lint-imports` (import-linter, configured in .importlinter) passes on the
tree, and fails on a copy of the package with deliberate upward, Flax and cross-program imports hidden inside
functions."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")

pytestmark = pytest.mark.skipif(not os.path.exists(LINT), reason="import-linter is not installed (test extra)")


def lint(root):
    """Run lint-imports on the package under `root` with `root`'s .importlinter -> (exit code, output)."""
    env = dict(os.environ, PYTHONPATH=root)
    r = subprocess.run([LINT, "--no-cache", os.path.join(root, ".importlinter")], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_lint_imports_passes():
    code, out = lint(ROOT)
    assert code == 0, out
    assert " 0 broken" in out, out


def test_upward_import_inside_a_function_fails(tmp_path):
    shutil.copytree(os.path.join(ROOT, "jaxdiff"), tmp_path / "jaxdiff",
                    ignore=shutil.ignore_patterns("__pycache__", "assets", "*.json"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    with open(tmp_path / "jaxdiff" / "noise.py", "a") as fh:
        fh.write("\n\ndef _upward():\n    from jaxdiff import train_lib\n    return train_lib\n")
    with open(tmp_path / "jaxdiff" / "metrics" / "frechet.py", "a") as fh:
        fh.write("\n\ndef _flax():\n    from flax import nnx\n    return nnx\n")
    with open(tmp_path / "jaxdiff" / "cli" / "sample.py", "a") as fh:
        fh.write("\n\ndef _other_program():\n    from jaxdiff.cli import train\n    return train\n")
    code, out = lint(str(tmp_path))
    assert code != 0, out
    assert "jaxdiff layers (docs/ARCHITECTURE.md) BROKEN" in out, out
    assert "jaxdiff.noise is not allowed to import jaxdiff.train_lib" in out, out
    assert "No Flax in the pure layers (noise .. metrics, parallel) BROKEN" in out, out
    assert "jaxdiff.metrics.frechet -> flax" in out, out
    assert "The CLI programs are independent BROKEN" in out, out
