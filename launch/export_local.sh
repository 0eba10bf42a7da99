#!/usr/bin/env bash
# One node, no Slurm: torchrun (launch/torchrun.py: a one-line failure summary) with as many processes as the
# resolved layout (file + overrides) needs (launch/nproc.py).
#   launch/export_local.sh [--config FILE.yaml] [dotted.key=value ...]
#   launch/export_local.sh --config configs/tiny-qwen3-tp2.yaml parallel.backend=gloo parallel.device=cpu
# Environment:
#   FP8PB_NPROC_PER_NODE  processes to start (default: from the layout and the file's "# gpus_per_node:")
#   FP8PB_PYTHON          python to run (default: the repository's .venv, else python3)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PY=${FP8PB_PYTHON:-python3}
[ -z "${FP8PB_PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ] && PY=$repo/.venv/bin/python
nproc=${FP8PB_NPROC_PER_NODE:-$("$PY" "$repo/launch/nproc.py" --nodes 1 "$@")}
echo "export_local: $nproc process(es) on this node" >&2
exec "$PY" "$repo/launch/torchrun.py" --standalone --nnodes 1 --nproc_per_node "$nproc" "$repo/launch/export.py" "$@"
