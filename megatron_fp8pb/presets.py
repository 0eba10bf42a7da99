"""Real architectures' shapes (random weights) for benchmarks and layout checks: ``source.kind=random``."""
from __future__ import annotations

PRESETS = {
    "llama-200m": ("llama", dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                 num_attention_heads=16, num_key_value_heads=4)),
    "qwen3-moe-300m": ("qwen3_moe", dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                         moe_intermediate_size=704, num_hidden_layers=8, num_attention_heads=16,
                                         num_key_value_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                         norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1)),
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)),
    "llama3-70b": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0)),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128,
                                        num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[],
                                        decoder_sparse_step=1)),
    "qwen3-235b-a22b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                          moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                                          num_key_value_heads=4, head_dim=128, num_experts=128,
                                          num_experts_per_tok=8, norm_topk_prob=True, mlp_only_layers=[],
                                          decoder_sparse_step=1)),
}


def preset_hf_config(name: str, num_layers: int = 0):
    """The transformers config of a preset; ``num_layers`` > 0 keeps only that many layers."""
    import transformers as tf
    if name not in PRESETS:
        raise ValueError(f"source.arch={name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    model_type, kw = PRESETS[name]
    kw = dict(kw, max_position_embeddings=8192, tie_word_embeddings=False)
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    cls = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config, "qwen3_moe": tf.Qwen3MoeConfig}[model_type]
    return cls(**kw)
