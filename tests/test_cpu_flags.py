"""jaxdiff.nn.cpu_flags: the XLA flags a CLI applies before the backend starts (issue 13)."""
import subprocess
import sys

from jaxdiff.nn import cpu_flags


def test_recommended_flags_only_for_cpu(monkeypatch):
    monkeypatch.setattr(cpu_flags, "RECOMMENDED_CPU_FLAGS", ("--xla_cpu_a=true", "--xla_cpu_b=1"))
    assert cpu_flags.recommended_xla_flags("cpu") == "--xla_cpu_a=true --xla_cpu_b=1"
    assert cpu_flags.recommended_xla_flags("gpu") == "" and cpu_flags.recommended_xla_flags("tpu") == ""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert cpu_flags.recommended_xla_flags() == ""


def test_apply_keeps_user_flags(monkeypatch):
    monkeypatch.setattr(cpu_flags, "RECOMMENDED_CPU_FLAGS", ("--xla_cpu_a=true", "--xla_cpu_b=1"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_a=false --xla_dump_to=/tmp/d")
    out = cpu_flags.apply_recommended_xla_flags("cpu")
    assert out == "--xla_cpu_a=false --xla_dump_to=/tmp/d --xla_cpu_b=1"
    assert cpu_flags.apply_recommended_xla_flags("cpu") == out          # idempotent


def test_recommended_flags_are_accepted_by_this_jaxlib():
    """Every recommended flag parses (XLA aborts the process on an unknown flag)."""
    flags = cpu_flags.recommended_xla_flags("cpu")
    code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda a: a + 1)(jnp.ones(2)).sum()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and r.stdout.strip() == "4.0", r.stderr[-2000:]


def test_applying_does_not_start_a_backend():
    """Importing the module and applying the flags leaves the JAX backend unstarted (so they take effect)."""
    code = ("import jaxdiff.nn.cpu_flags as c; c.apply_recommended_xla_flags(); "
            "from jax._src import xla_bridge; print(len(xla_bridge._backends))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("0"), r.stderr[-2000:]
