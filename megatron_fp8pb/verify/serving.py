"""Where the checkpoint serves: vLLM/SGLang partition rules, transformers loading, and logits."""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .. import serve_check
from .names import is_linear_weight, module_of
from .report import FP8, TensorInfo, VerifyReport

def compare_logits(out_dir: str | os.PathLike, src_dir: str | os.PathLike, *, batch: int = 4, seq: int = 16,
                   seed: int = 0, max_rel_err: float = 0.1, min_top1: float = 0.9) -> dict:
    """Load both checkpoints with transformers on CPU (the FP8 one dequantized), run ``batch`` x ``seq`` seeded
    random token ids below vocab_size. Returns {rel_err = ||a-b||/||b||, top1 agreement, ok, thresholds}."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(out_dir))
    vocab = cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ref = _logits_of(src_dir, ids, None)
    out = _logits_of(out_dir, ids, getattr(cfg, "quantization_config", None))
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_err": rel, "top1": top1, "max_rel_err": max_rel_err, "min_top1": min_top1,
            "ok": rel <= max_rel_err and top1 >= min_top1, "batch": batch, "seq": seq, "seed": seed}


def _logits_of(path, ids: torch.Tensor, qc) -> torch.Tensor:
    """logits [batch, seq, vocab] float32 of the checkpoint at ``path`` (FP8 dequantized on load)."""
    from transformers import AutoModelForCausalLM
    kw = {}
    if qc is not None:
        from transformers import FineGrainedFP8Config
        qd = qc if isinstance(qc, dict) else qc.to_dict()
        kw["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=tuple(qd.get("weight_block_size") or (128, 128)),
            modules_to_not_convert=qd.get("modules_to_not_convert"))
    from transformers.utils import logging as tf_logging
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu", **kw)
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    del model
    return logits


def quantized_modules(tensors: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """module -> (N, K) of every 2-D FP8 weight."""
    return {module_of(n): (t.shape[0], t.shape[1]) for n, t in tensors.items() if t.dtype == FP8 and
            len(t.shape) == 2}


def run_serve_checks(tensors: dict[str, TensorInfo], cfg: dict, serve_tp: Iterable[int], info_tp: Iterable[int],
                     rep: VerifyReport) -> None:
    """Serve problems are errors at the required ``serve_tp``, warnings at the ``info_tp``; transformers problems
    are warnings."""
    mods = quantized_modules(tensors)
    unq = [module_of(n) for n, t in tensors.items() if t.dtype != FP8 and is_linear_weight(n, t.shape)]
    kv = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    rep.serve_required = sorted(set(serve_tp))
    for tp in sorted(set(serve_tp) | set(info_tp)):
        probs = serve_check.serve_problems(mods, tp, num_kv_heads=kv)
        rep.serve[tp] = probs
        if tp in rep.serve_required:
            rep.errors.extend(f"serve-check: {p}" for p in probs)
        elif probs:
            rep.warn(f"serve-check tp={tp}: vLLM/SGLang refuse {len(probs)} layer(s), e.g. {probs[0]}")
    rep.fused_partial = serve_check.fused_partial_problems(mods, unq)
    if rep.fused_partial and rep.serve_required:
        rep.errors.extend(f"serve-check: {p}" for p in rep.fused_partial)
    elif rep.fused_partial:
        rep.warn(f"serve-check: {len(rep.fused_partial)} quantized module(s) fused with unquantized ones, e.g. "
                 f"{rep.fused_partial[0]}")
    rep.transformers = serve_check.transformers_problems(mods)
    if rep.transformers:
        rep.warn(f"transformers-check: {len(rep.transformers)} layer(s) have dims that are not multiples of 128 "
                 f"(transformers cannot load them; vLLM/SGLang can), e.g. {rep.transformers[0]}")
