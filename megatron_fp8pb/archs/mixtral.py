"""Mixtral: router ``block_sparse_moe.gate``, experts ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) /
``w2`` (down); grouped-query attention as Llama."""
from __future__ import annotations

from dataclasses import replace

from . import common as c
from .base import COLUMN, ROW, Arch, Dims
from .llama import TINY

BLOCK = "model.layers.{i}.block_sparse_moe."


def dims(cfg) -> Dims:
    c.refuse(cfg, "attention_bias", "which this exporter does not map")
    if (cfg.num_local_experts or 0) < 1:
        raise ValueError(f"mixtral: num_local_experts={cfg.num_local_experts} must be >= 1")
    return replace(c.gqa_dims(cfg), ffn_hidden=0, num_experts=int(cfg.num_local_experts),
                   moe_ffn_hidden=int(cfg.intermediate_size), moe_top_k=int(cfg.num_experts_per_tok))


def rules(d: Dims):
    return c.embedding_rules() + c.attention_rules(d) + [c.post_attention_norm_rule()] + \
        c.moe_rules(BLOCK, ("w1", "w3", "w2")) + c.final_rules(d)


def _tiny(tie: bool):
    import transformers as tf
    return tf.MixtralConfig(**{**TINY, "head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                               "intermediate_size": 384, "tie_word_embeddings": tie})


MIXTRAL = Arch(model_types=("mixtral",), dims=dims, rules=rules,
               serving={**c.GQA_SERVING, "w1": COLUMN, "w3": COLUMN, "w2": ROW},
               fusion=(("q_proj", "k_proj", "v_proj"), ("w1", "w3")), kv_leaves=("k_proj", "v_proj"),
               never_quantized=("gate",), expert_leaves=("w1", "w3", "w2"),
               exclude=("model.embed_tokens", "lm_head", "*norm*", "*.block_sparse_moe.gate"),
               absent_same=("head_dim",), tiny={"mixtral": _tiny})
UNITS = (MIXTRAL,)
