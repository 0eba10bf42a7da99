"""megatron-fp8pb: export a Megatron-core LLM under TP/PP/EP to a Hugging Face block-FP8 (W8A8) checkpoint."""
from .api import export
from .blockfp8 import dequantize_blockfp8, quantize_blockfp8
from .stream_api import iter_fp8

__all__ = ["export", "iter_fp8", "quantize_blockfp8", "dequantize_blockfp8"]
