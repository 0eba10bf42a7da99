#!/usr/bin/env bash
# One node, no Slurm: runs torchrun with as many processes as the config's layout needs.
#   launch/export_local.sh [--config FILE.yaml] [dotted.key=value ...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python3}
[ -x "$here/../.venv/bin/python" ] && PY=${PYTHON:-$here/../.venv/bin/python}
nproc=$("$PY" "$here/nproc.py" --nodes 1 "$@")
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$here/export.py" "$@"
