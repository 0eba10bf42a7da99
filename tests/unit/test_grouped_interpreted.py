"""The grouped quantizer's tests (tests/gpu/test_grouped_quant.py) on the CPU, through Triton's interpreter, in a
process of their own (the interpreter is chosen when triton is first imported)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def test_grouped_quantizer_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", "test_grouped_quant.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "grouped quantizer tests passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
