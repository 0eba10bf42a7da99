"""Prove a written block-FP8 checkpoint right (FORMAT.md) and say at which tensor-parallel sizes it serves.

``verify_checkpoint(out_dir, source=..., serve_tp=..., logits=...)`` reads the checkpoint lazily: safetensors headers
first, then one tensor (or a block of 128-row chunks of one) at a time, never the whole model. Checks:

- config.json ``quantization_config`` exactly as FORMAT.md; without one, no FP8 tensor anywhere;
- ``model.safetensors.index.json`` complete and true (every tensor listed, every listed tensor present, total_size),
  or a single ``model.safetensors`` without an index;
- every F8_E4M3 ``<m>.weight`` [N, K] has a float32 ``<m>.weight_scale_inv`` [ceil(N/128), ceil(K/128)] in the
  same file, finite and > 0 (a power of two under ``scale_fmt: ue8m0``); no ``input_scale`` / ``weight_scale``;
  every linear not matched by ``modules_to_not_convert`` (transformers' matching rule) is FP8 and every matched
  one is not;
- ``vocab_size`` and ``tie_word_embeddings`` agree with the tensors;
- against a source: FP8 tensors byte-identical to ``quant.reference.quantize_blockfp8_reference`` of the source tensor
  (``tolerance="bound"``: or within the e4m3 dequantization bound); the rest equal to the source cast to the output
  dtype;
- transformers loads it on the meta device: every tensor name and shape fits the architecture of config.json;
- serve-check (vLLM / SGLang partition rules) and transformers-check (weights its dequantize gets wrong);
- optionally logits on a fixed batch of token ids, weight-only (W8A16) and with dynamic activation quantization
  simulated (W8A8), of the output and of the reference quantization of the source, both against the bf16 source:
  the reference's numbers are what the format costs (reported), and the output fails only when it is further from
  bf16 than the reference beyond a small slack.

Modules: names (which tensors are linears), report, reading (headers, index), format (FORMAT.md checks), source
(comparison), serving (serve-check, transformers), logits, cli (``verify_checkpoint`` and the command line).

CLI: ``python -m megatron_fp8pb.verify OUT_DIR [--source SRC] [--serve-tp 1,2,4,8,transformers]
[--tolerance exact|bound] [--logits] [--no-load] [--json R.json]``.
"""
from __future__ import annotations

from .cli import build_parser, main, verify_checkpoint
from .format import should_convert_module
from .names import EXPERT_LEAVES, LINEAR_LEAVES, is_linear_weight, module_of, never_fp8
from .report import BOUND_SLACK, FP8, INDEX, SCALE_SUFFIX, TensorResult, VerifyReport
from .logits import compare_logits

__all__ = ["verify_checkpoint", "VerifyReport", "TensorResult", "compare_logits", "should_convert_module",
           "is_linear_weight", "module_of", "never_fp8", "main", "build_parser", "INDEX", "BOUND_SLACK", "FP8",
           "SCALE_SUFFIX", "LINEAR_LEAVES", "EXPERT_LEAVES"]
