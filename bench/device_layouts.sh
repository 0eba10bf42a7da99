#!/usr/bin/env bash
# One device call on two GPUs (NCCL): the GPU tests, then a MoE source (qwen3-moe-300m shapes, 4 layers, 16 experts of
# 704, none of it a multiple of 128 per rank) exported at tp=1 ep=2 and at tp=2 with node writers, from the HF
# checkpoint and from a Megatron dist checkpoint saved at tp=2 (so the first Megatron export reshards it). Each
# export is verified, and every export's files must equal the first's byte for byte.
# Usage: bash bench/device_layouts.sh [extra export keys]   (on CPU: PY=.venv/bin/python SKIP_GPU_TESTS=1 bash
# bench/device_layouts.sh parallel.device=cpu parallel.backend=gloo)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONWARNINGS=ignore
PY=${PY:-python3}
if ls .whl/megatron_core*.whl >/dev/null 2>&1 && ! $PY -c "import megatron.core" 2>/dev/null; then
  mkdir -p /tmp/site && $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/megatron_core*.whl
  export PYTHONPATH=/tmp/site
fi
T=${WORKDIR:-/tmp/fp8pb-layouts}; rm -rf "$T"; mkdir -p "$T"
S0=$(date +%s)
fail=0
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/gpu > "$T/gpu_tests.log" 2>&1 || fail=1
  grep -E "passed|failed|^FAILED|Error" "$T/gpu_tests.log" | head
fi
$PY -c "import sys; sys.path[:0] = ['.', 'bench']; from pathlib import Path; from e2e import write_random_source
print('MoE source:', write_random_source(Path('$T/moe'), 'qwen3-moe-300m', 4, shard='200MB') / 1e6, 'MB')" || fail=1
export_() {
  local name=$1; shift; local s; s=$(date +%s)
  $PY -m torch.distributed.run --nproc_per_node=2 --master_port=$((29500 + RANDOM % 500)) launch/export.py "$@" \
    output.dir="$T/$name" output.overwrite=true > "$T/$name.log" 2>&1 || { fail=1; tail -5 "$T/$name.log"; }
  echo "$name: $(grep -E '^verify ' "$T/$name.log" | tail -1) ($(( $(date +%s) - s )) s)"
  [ "$name" = hf-tp1ep2 ] && return
  for f in "$T"/hf-tp1ep2/*.safetensors "$T"/hf-tp1ep2/*.json; do
    cmp -s "$f" "$T/$name/$(basename "$f")" || { fail=1; echo "  DIFFERS from hf-tp1ep2: $(basename "$f")"; return; }
  done
  echo "  byte-identical to hf-tp1ep2"
}
MG="source.kind=megatron source.path=$T/megatron-tp2 source.hf_config=$T/moe/config.json"
export_ hf-tp1ep2 source.kind=hf source.path="$T/moe" parallel.tp=1 parallel.ep=2 "$@"
export_ hf-tp2-node source.kind=hf source.path="$T/moe" parallel.tp=2 output.writers=node "$@"
$PY -m torch.distributed.run --nproc_per_node=2 --master_port=$((29500 + RANDOM % 500)) tests/dist/dcp_worker.py \
  save "$T/moe" "$T/megatron-tp2" 2 1 1 > "$T/save.log" 2>&1 || { fail=1; tail -5 "$T/save.log"; }
export_ megatron-tp1ep2 $MG parallel.tp=1 parallel.ep=2 "$@"
export_ megatron-tp2-node $MG parallel.tp=2 output.writers=node "$@"
echo "layouts: $([ $fail = 0 ] && echo OK || echo FAILED) in $(( $(date +%s) - S0 )) s"
exit $fail
