"""Llama and Mistral: grouped-query attention, gated SiLU MLP, RMSNorm."""
from __future__ import annotations

from . import common as c
from .base import Arch, Dims

TINY = dict(vocab_size=1003, hidden_size=384, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-6, intermediate_size=1152)


def dims(cfg) -> Dims:
    c.refuse(cfg, "mlp_bias", "which this exporter does not map; set it false or add a table for that variant")
    c.refuse(cfg, "attention_bias", "which also puts a bias on o_proj that Megatron's add_qkv_bias does not hold")
    return c.gqa_dims(cfg)


def rules(d: Dims):
    return c.embedding_rules() + c.attention_rules(d) + [c.post_attention_norm_rule()] + c.dense_mlp_rules() + \
        c.final_rules(d)


def _llama(**kw):
    import transformers as tf
    return tf.LlamaConfig(**kw)


def _preset(**shape):
    def make(num_layers: int = 0):
        kw = dict(shape, max_position_embeddings=8192, tie_word_embeddings=False)
        if num_layers:
            kw["num_hidden_layers"] = num_layers
        return _llama(**kw)
    return make


SERVING = {**c.GQA_SERVING, **c.MLP_SERVING}
LLAMA = Arch(
    model_types=("llama",), dims=dims, rules=rules, serving=SERVING, fusion=c.GQA_FUSION,
    kv_leaves=("k_proj", "v_proj"), absent_same=("head_dim",),
    tiny={"llama": lambda tie: _llama(head_dim=64, tie_word_embeddings=tie, **TINY)},
    presets={
        "llama-200m": _preset(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                              num_attention_heads=16, num_key_value_heads=4),
        "llama3-8b": _preset(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
        "llama3-70b": _preset(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0),
    })


def _mistral(tie: bool):
    import transformers as tf
    return tf.MistralConfig(head_dim=64, sliding_window=None, tie_word_embeddings=tie, **TINY)


MISTRAL = Arch(model_types=("mistral",), dims=dims, rules=rules, serving=SERVING, fusion=c.GQA_FUSION,
               kv_leaves=("k_proj", "v_proj"), absent_same=("head_dim",), tiny={"mistral": _mistral})
UNITS = (LLAMA, MISTRAL)
