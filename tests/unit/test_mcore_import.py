"""The CLI's import of megatron-core: every module the export uses is imported, and torch.compile is torch's own
again afterwards. Real megatron-core in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_megatron_core_imported_and_torch_compile_restored():
    pytest.importorskip("megatron.core")
    code = ("import json, sys, torch\n"
            "real = torch.compile\n"
            "from megatron_fp8pb.parallel.megatron_import import MEGATRON_MODULES, import_without_compiling\n"
            "import_without_compiling()\n"
            "print(json.dumps({'imported': [m for m in MEGATRON_MODULES if m not in sys.modules],\n"
            "                  'restored': torch.compile is real}))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"imported": [], "restored": True}
