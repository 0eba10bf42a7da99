#!/usr/bin/env bash
# One device call for the release numbers: the end-to-end export per source file layout (bench/e2e.py), then the
# in-memory stream (GPU test + bench/rl_sync.py at Llama-3-8B shapes). Usage: bash bench/device_all.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash bench/device_e2e.sh "$@"
REPEATS=${REPEATS:-3} bash bench/device_rl.sh
