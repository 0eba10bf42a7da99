#!/usr/bin/env bash
# One device call for the release numbers: the in-memory stream (GPU test + bench/rl_sync.py at Llama-3-8B shapes),
# then the end-to-end export per source file layout (bench/e2e.py). Usage: bash bench/device_all.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
REPEATS=${REPEATS:-3} bash bench/device_rl.sh
bash bench/device_e2e.sh "$@"
