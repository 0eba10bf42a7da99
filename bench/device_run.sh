#!/usr/bin/env bash
# One device call: GPU tests (Triton kernel byte-equality, Megatron forward == HF), the quantizer benchmark and the
# export benchmark. Usage on the device machine: bash bench/device_run.sh  (wheels for megatron-core in .whl/)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
df -h /tmp | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|rel err" | tail -20
python3 bench/quant.py 2>&1 | tee "$OUT/bench_quant.log" | tail -16
python3 bench/export.py --gpu --repeats ${REPEATS:-3} --layers ${LAYERS:-8,32} --workdir /tmp/fp8pb-bench \
  --json "$OUT/bench_export.json" 2>&1 | tee "$OUT/bench_export.log" | tail -14
