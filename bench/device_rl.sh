#!/usr/bin/env bash
# One device call: the stream's and the quantizers' GPU tests and the RL weight-sync benchmark at Llama-3-8B shapes.
# megatron-core's wheel in .whl/ is optional: without it the test of iter_fp8 on a Megatron model is skipped, and the
# benchmark needs none. Usage on the device machine: bash bench/device_rl.sh [rl_sync.py arguments]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHL=${WHL:-.whl}
if ls $WHL/megatron_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $WHL/megatron_core*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q tests/gpu/test_stream_cuda.py tests/gpu/test_grouped_quant.py tests/gpu/test_packed_stream.py \
  tests/gpu/test_blockfp8_triton.py 2>&1 | tee "$OUT/gpu_stream_test.log" | tail -8
python3 bench/rl_sync.py --repeats ${REPEATS:-5} "$@" 2>&1 | tee "$OUT/rl_sync.log" | tail -16
