"""Where a Triton kernel's test runs: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``. Such a test file is also
run as a plain script (tests/unit/test_grouped_interpreted.py runs them interpreted), so this is a module it imports
rather than a conftest. Under pytest with neither, the importing module is skipped."""
from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def skip_without_a_kernel_device() -> None:
    """Skip the importing test module (under pytest) unless CUDA and triton are there or Triton is interpreted."""
    if INTERPRETED:
        return
    try:
        import pytest
        from megatron_fp8pb.quant import triton_kernel
        if not (torch.cuda.is_available() and triton_kernel.available()):
            pytest.skip("needs CUDA and triton (or TRITON_INTERPRET=1)", allow_module_level=True)
    except ImportError:
        pass
