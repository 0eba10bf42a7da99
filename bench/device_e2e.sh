#!/usr/bin/env bash
# One device call: end-to-end export per source file layout (save_pretrained, hub-like many shards, export-ordered),
# software warm and data cold, ours (the megatron-fp8pb-export command, and once under torchrun) vs the sequential and concurrent read+write floors
# vs llm-compressor with its sync. About 6-7 minutes at Llama-3-8B shapes (16 GB source, written three times).
# Wheels: megatron-core in .whl/, llm-compressor and its missing dependencies in .whl/peer/ (each installed only
# where python3 cannot already import it). Usage: bash bench/device_e2e.sh [e2e.py arguments]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WHL=${WHL:-.whl}
SITE=/tmp/site; mkdir -p $SITE
python3 -m pip install -q --no-index --no-deps --target $SITE $WHL/megatron_core*.whl
for pair in loguru:loguru pynvml:nvidia_ml_py requests:requests urllib3:urllib3 certifi:certifi idna:idna \
            charset_normalizer:charset_normalizer pydantic_core:pydantic_core pydantic:pydantic \
            annotated_types:annotated_types typing_inspection:typing_inspection psutil:psutil compressed_tensors:compressed_tensors llmcompressor:llmcompressor; do
  mod=${pair%%:*}; whl=${pair##*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target $SITE \
    $WHL/peer/${whl}-*.whl
done
export PYTHONPATH=$SITE
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
df -h /tmp | tail -1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# E2E=bench/e2e_depths.py: the two-depth bench instead (RSS slope, --megatron, --trace)
python3 ${E2E:-bench/e2e.py} --gpu --workdir /tmp/fp8pb-e2e --json "$OUT/e2e.json" "$@" 2>&1 | tee "$OUT/e2e.log" | tail -40
