"""The embedded default model: a small HF config per architecture and seeded bf16 weights for it.

Full dims are multiples of 128 (transformers can load the FP8 result) while TP=2 shards are not (192 q rows and 576
gate/up rows per rank), so every default export exercises blocks that straddle shard boundaries.
"""
from __future__ import annotations

import torch

from .archs import dims_from_hf, rules_for
from .plan import expected_tensors

_COMMON = dict(vocab_size=1003, hidden_size=384, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-6)


def tiny_hf_config(arch: str, tie_embeddings: bool = False):
    """A small transformers config of ``arch`` (llama, mistral, qwen2, qwen3, qwen3_moe, qwen2_moe, mixtral)."""
    import transformers as tf
    kw = dict(_COMMON, tie_word_embeddings=tie_embeddings, intermediate_size=1152)
    if arch == "llama":
        return tf.LlamaConfig(head_dim=64, **kw)
    if arch == "mistral":
        return tf.MistralConfig(head_dim=64, sliding_window=None, **kw)
    if arch == "qwen2":
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=64, **kw)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=384,
                                 decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **kw)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=384,
                                 shared_expert_intermediate_size=384, decoder_sparse_step=1, mlp_only_layers=[],
                                 norm_topk_prob=False, **kw)
    if arch == "mixtral":
        kw["intermediate_size"] = 384
        return tf.MixtralConfig(head_dim=64, num_local_experts=4, num_experts_per_tok=2, **kw)
    raise ValueError(f"source.arch={arch!r} has no tiny model; choose llama, mistral, qwen2, qwen3, qwen3_moe, "
                     f"qwen2_moe or mixtral")


def random_hf_state(hf_config, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded weights for every HF tensor the architecture has (norms near 1, the rest N(0, 0.02)).

    Embeddings use N(0, 1) so that logits are well separated and top-1 comparisons are meaningful.
    """
    d = dims_from_hf(hf_config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_tensors(rules_for(d), d).items():
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            x = 1.0 + 0.1 * x
        elif "embed_tokens" not in name:
            x = 0.02 * x
        out[name] = x.to(dtype)
    return out
