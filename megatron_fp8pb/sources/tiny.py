"""The embedded default model: a small HF config per architecture (each unit in ``archs/`` owns its own) and
seeded bf16 weights for it.

Llama-family full dims are multiples of 128 (transformers can load the FP8 result) while TP=2 shards are not (192 q
rows and 576 gate/up rows per rank), so every default export exercises blocks that straddle shard boundaries.
"""
from __future__ import annotations

import torch

from megatron_fp8pb.archs import dims_from_hf, rules_for, tiny_config
from megatron_fp8pb.plan.params import expected_tensors


def tiny_hf_config(arch: str, tie_embeddings: bool = False):
    """A small transformers config of ``arch`` (any registered model_type with a tiny config)."""
    return tiny_config(arch, tie_embeddings)


def random_hf_state(hf_config, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded weights for every HF tensor the architecture has (norms near 1, the rest N(0, 0.02)).

    Embeddings use N(0, 1) so that logits are well separated and top-1 comparisons are meaningful. Tensors the
    architecture keeps in their own dtype (the float32 expert score correction bias) get that dtype.
    """
    d = dims_from_hf(hf_config)
    rules = rules_for(d)
    gen = torch.Generator().manual_seed(seed)
    own = tensor_dtypes(rules, d)
    out = {}
    for name, shape in expected_tensors(rules, d).items():
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            x = 1.0 + 0.1 * x
        elif "embed_tokens" not in name:
            x = 0.02 * x
        out[name] = x.to(own.get(name, dtype))
    for r in rules:   # HF tensors written from one Megatron tensor (lm_head and MTP shared heads) are copies
        if r.fusion == "plain" and r.scope == "global" and len(r.hf) > 1:
            for h in r.hf[1:]:
                out[h] = out[r.hf[0]].clone()
    return out


def tensor_dtypes(rules, d) -> dict[str, torch.dtype]:
    """HF tensors that the architecture writes in their own dtype."""
    from megatron_fp8pb.plan.params import expected_tensors as exp
    out = {}
    for r in rules:
        if r.dtype:
            for name in exp([r], d):
                out[name] = getattr(torch, r.dtype)
    return out
