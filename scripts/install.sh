#!/usr/bin/env bash
# Creates .venv with torch and this package (pip install -e .[test]) and says what it installed. Idempotent.
#
# torch is installed first, pinned to TORCH_VERSION (default 2.13.0), so that no later requirement picks another
# build. Which build that is depends on where pip looks: a local index or wheel directory that holds the CPU wheel
# (as on the test machines) gives the CPU build; the public PyPI index gives the default Linux build of that version,
# which is the CUDA one. The last line names the build installed.
#
# Installing into an environment that already has torch and megatron-core (an NGC PyTorch container, a training
# venv): do not run this script; run `pip install --no-build-isolation -e .` there (see README, "Installing").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python - <<'PY'
from importlib.metadata import version
import torch
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
print(f"install.sh: .venv has torch {torch.__version__} ({build}), megatron-core {version('megatron-core')}, "
      f"transformers {version('transformers')} and megatron-fp8pb (editable)")
PY
