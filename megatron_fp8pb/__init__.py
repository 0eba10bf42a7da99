"""megatron-fp8pb: export a Megatron-core LLM under TP/PP/EP to a Hugging Face block-FP8 (W8A8) checkpoint.

The public names are imported on first use, so that the torch-free modules (``config``, ``readahead``) load without
importing torch: the command line starts reading the source while torch is still being imported."""
from __future__ import annotations

import importlib

_PUBLIC = {"export": "api", "iter_fp8": "stream_api", "iter_fp8_buckets": "stream_api", "FP8Stream": "stream_api",
           "quantize_blockfp8": "quant.reference",
           "dequantize_blockfp8": "quant.reference"}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
