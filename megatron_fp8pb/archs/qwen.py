"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm): Llama-shaped dense models."""
from __future__ import annotations

from . import common as c
from .base import Arch, Dims
from .llama import SERVING, TINY


def dims(cfg) -> Dims:
    c.refuse(cfg, "mlp_bias", "which this exporter does not map; set it false or add a table for that variant")
    if cfg.model_type == "qwen3":
        c.refuse(cfg, "attention_bias", "which also puts a bias on o_proj that Megatron's add_qkv_bias does not hold")
        return c.gqa_dims(cfg, qk_norm=True)
    return c.gqa_dims(cfg, qkv_bias=True)


def rules(d: Dims):
    return c.embedding_rules() + c.attention_rules(d) + [c.post_attention_norm_rule()] + c.dense_mlp_rules() + \
        c.final_rules(d)


def _qwen2(tie: bool):
    import transformers as tf
    return tf.Qwen2Config(tie_word_embeddings=tie, **TINY)


def _qwen3(tie: bool, **kw):
    import transformers as tf
    return tf.Qwen3Config(**{**TINY, "head_dim": 64, "tie_word_embeddings": tie, **kw})


def _qwen3_8b(num_layers: int = 0):
    return _qwen3(False, vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                  num_hidden_layers=num_layers or 36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=8192)


QWEN2 = Arch(model_types=("qwen2",), dims=dims, rules=rules, serving=SERVING, fusion=c.GQA_FUSION,
             kv_leaves=("k_proj", "v_proj"), absent_same=("head_dim",), tiny={"qwen2": _qwen2})
QWEN3 = Arch(model_types=("qwen3",), dims=dims, rules=rules, serving=SERVING, fusion=c.GQA_FUSION,
             kv_leaves=("k_proj", "v_proj"), spec=lambda d: {"qk_layernorm": True}, tiny={"qwen3": _qwen3},
             presets={"qwen3-8b": _qwen3_8b})
UNITS = (QWEN2, QWEN3)
