"""The grouped quantizer's and the one-process stream's tests (tests/gpu/test_grouped_quant.py,
tests/gpu/test_packed_stream.py) on the CPU, through Triton's interpreter, each in a process of its own (the
interpreter is chosen when triton is first imported)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


@pytest.mark.parametrize("script,passed", [("test_grouped_quant.py", "grouped quantizer tests passed"),
                                           ("test_packed_stream.py", "packed stream tests passed")])
def test_interpreted(script, passed):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", script)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and passed in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
