"""Every Triton kernel variant that vim2_kernels launches compiles for a real GPU (sm_90), without one.

The interpreter-based tests check the kernels' arithmetic but run them as NumPy code, which accepts
programs the compiler rejects (e.g. a loop-carried value whose type changes). ``tools/triton_compile_check.py``
drives the public backend functions with every launch replaced by an ahead-of-time compilation (Triton's
compiler and the ptxas it ships); here it runs in a subprocess without TRITON_INTERPRET.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (the backend is optional)")

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "triton_compile_check.py"


def _cuda_compiler_missing():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:
        return f"triton's CUDA compiler backend is not importable: {exc}"
    return None


@pytest.mark.skipif(_cuda_compiler_missing() is not None, reason=str(_cuda_compiler_missing()))
def test_all_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True,
                          timeout=900, env=env)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " 0 failed" in summary and "0 cases raised" in summary, summary
    compiled = int(summary.split(" kernel variants")[0])
    assert compiled >= 60, summary  # the sweep reached every kernel family (69 variants when written)
