"""Every Triton kernel compiles to cubin for Hopper (default run) and Ampere (``-m slow``), on a
machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_kernels_compile_for_gpu_targets(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.join(here, "aot_compile.py"), str(arch)], env=env,
                            capture_output=True, text=True, timeout=900)
    lines = result.stdout.splitlines()
    failures = [ln for ln in lines if ln.startswith("FAIL")]
    assert result.returncode == 0 and not failures, "\n".join(failures) or result.stderr[-3000:]
    assert all(f"sm_{arch} " in ln for ln in lines if ln.startswith("OK"))
    assert sum(ln.startswith("OK") for ln in lines) >= 64 + 8 + 2 + 2 + 8
