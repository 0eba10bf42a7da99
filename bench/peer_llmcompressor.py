"""The peer: llm-compressor FP8_BLOCK on an HF bf16 checkpoint (load, oneshot, save_pretrained compressed), timed by
phase. Prints one JSON line prefixed PEER_RESULT.

  python bench/peer_llmcompressor.py SRC OUT
"""
from __future__ import annotations

import json
import resource
import sys
import time

t_start = time.perf_counter()


def main(src: str, out: str) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM
    t_import = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", device_map=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t_load = time.perf_counter()
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=["lm_head"]))
    if device == "cuda":
        torch.cuda.synchronize()
    t_quant = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    t_save = time.perf_counter()
    print("PEER_RESULT " + json.dumps(dict(
        imports_s=t_import - t_start, load_s=t_load - t_import, quantize_s=t_quant - t_load, save_s=t_save - t_quant,
        total_s=t_save - t_start, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
