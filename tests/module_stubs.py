"""Shared by the parity tests that import torch packages against stand-ins for torchvision."""
import contextlib
import sys


@contextlib.contextmanager
def temporary_modules(entries: dict):
    """Temporarily set ``sys.modules`` entries (restored afterwards)."""
    saved = {k: sys.modules.get(k) for k in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
