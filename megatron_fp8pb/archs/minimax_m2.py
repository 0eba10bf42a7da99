"""MiniMax-M2 (``minimax_m2``): grouped-query attention whose q/k RMSNorms span all heads at once
(``self_attn.q_norm.weight`` [heads * head_dim], ``k_norm.weight`` [kv_heads * head_dim]), a sigmoid router
``block_sparse_moe.gate`` with its float32 score correction ``block_sparse_moe.e_score_correction_bias`` beside it,
and experts ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down).

Megatron holds the full-width norms split along heads with the attention (``parallel/qk_norm_local.py``: each rank
normalizes its own heads' slice of the weight, the statistic all-reduced over the tensor-parallel group), so they are
column-parallel here: the rows of rank r are its heads. Where ``num_key_value_heads < tp`` megatron-core gives each
rank one kv head (several ranks the same one) and splits ``linear_qkv`` inside query groups; the export refuses that
layout (``plan.validate``) and the k norm's module says it is head-replicated, which no rule here maps.
"""
from __future__ import annotations

from dataclasses import replace

from . import common as c
from .base import COLUMN, COLWISE, ROW, Arch, Dims, Rule

BLOCK = "model.layers.{i}.block_sparse_moe."


def dims(cfg) -> Dims:
    c.refuse(cfg, "attention_bias", "which this exporter does not map")
    if (cfg.num_local_experts or 0) < 1:
        raise ValueError(f"minimax_m2: num_local_experts={cfg.num_local_experts} must be >= 1")
    norm = getattr(cfg, "use_qk_norm", True)
    kind = getattr(cfg, "qk_norm_type", "per_layer")
    if norm and kind not in (None, "per_layer"):
        raise ValueError(f"minimax_m2: qk_norm_type={kind!r} is not mapped; only per_layer (one RMSNorm over all "
                         f"heads) is supported")
    return replace(c.gqa_dims(cfg), ffn_hidden=0, num_experts=int(cfg.num_local_experts),
                   moe_ffn_hidden=int(cfg.intermediate_size), moe_top_k=int(cfg.num_experts_per_tok),
                   router_score="sigmoid", expert_bias=True, qk_norm_full=bool(norm),
                   partial_rotary=c.partial_rotary(cfg, legacy_rotary_dim=True))


def _norm_layers(d: Dims) -> tuple[int, ...]:
    return d.all_layers if d.qk_norm_full else ()


def full_width_qk_norm_rules() -> list[Rule]:
    attn = c.ATTN
    return [Rule(("self_attention.q_layernorm.weight",), (attn + "q_norm.weight",),
                 lambda d: ((d.num_heads * d.head_dim,),), COLWISE, layers=_norm_layers, as_stored=True),
            Rule(("self_attention.k_layernorm.weight",), (attn + "k_norm.weight",),
                 lambda d: ((d.num_query_groups * d.head_dim,),), COLWISE, layers=_norm_layers, as_stored=True)]


def rules(d: Dims):
    return c.embedding_rules() + c.attention_rules(d) + full_width_qk_norm_rules() + \
        [c.post_attention_norm_rule()] + c.moe_rules(BLOCK, ("w1", "w3", "w2"), bias="e_score_correction_bias") + \
        c.final_rules(d)


def _config(**kw):
    import transformers as tf
    return tf.MiniMaxM2Config(**kw)


def _tiny(tie: bool = False, **kw):
    """hidden 320, 4 query heads and 2 kv heads of 80 (q_norm 320 wide, 160 per rank at tp 2), 4 experts of 160."""
    return _config(**{**dict(vocab_size=1003, hidden_size=320, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=80, num_local_experts=4, num_experts_per_tok=2,
                             intermediate_size=160, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=tie), **kw})


def _m2(num_layers: int = 0):
    return _config(vocab_size=200064, hidden_size=3072, num_hidden_layers=num_layers or 62, num_attention_heads=48,
                   num_key_value_heads=8, head_dim=128, num_local_experts=256, num_experts_per_tok=8,
                   intermediate_size=1536, rotary_dim=64, max_position_embeddings=8192, tie_word_embeddings=False)


MINIMAX_M2 = Arch(
    model_types=("minimax_m2",), dims=dims, rules=rules,
    serving={**c.GQA_SERVING, "w1": COLUMN, "w3": COLUMN, "w2": ROW},
    fusion=(("q_proj", "k_proj", "v_proj"), ("w1", "w3")), kv_leaves=("k_proj", "v_proj"),
    never_quantized=("gate",), expert_leaves=("w1", "w3", "w2"),
    exclude=("model.embed_tokens", "lm_head", "*norm*", "*.block_sparse_moe.gate"),
    gpt=lambda d: {"rotary_percent": d.partial_rotary},
    absent_same=("qk_norm_type", "use_qk_norm", "partial_rotary_factor", "rotary_dim"), tiny={"minimax_m2": _tiny},
    presets={"minimax-m2": _m2})
UNITS = (MINIMAX_M2,)
