"""GLM-4.5 / GLM-4.6 (``model_type: glm4_moe``): grouped-query attention with q/k/v biases (``attention_bias``),
optional per-head q/k norms (``use_qk_norm``), partial rotary; dense MLP layers below ``first_k_dense_replace``, then
MoE layers with a sigmoid router, its float32 ``e_score_correction_bias`` and shared experts
``mlp.shared_experts.{gate,up,down}_proj``; multi-token-prediction layers (``num_nextn_predict_layers``) as
DeepSeek-V3 holds them, HF layer ``num_hidden_layers + k``. The whole architecture is this file."""
from __future__ import annotations

from dataclasses import replace

from . import common as c
from .base import Arch, Dims


def dims(cfg) -> Dims:
    k = min(int(getattr(cfg, "first_k_dense_replace", 0) or 0), cfg.num_hidden_layers)
    experts = int(cfg.n_routed_experts or 0)
    if experts < 1:
        raise ValueError(f"glm4_moe: n_routed_experts={cfg.n_routed_experts} must be >= 1")
    partial = c.partial_rotary(cfg)
    d = c.gqa_dims(cfg, qkv_bias=bool(getattr(cfg, "attention_bias", False)),
                   qk_norm=bool(getattr(cfg, "use_qk_norm", False)))
    return replace(d, num_experts=experts, moe_ffn_hidden=int(cfg.moe_intermediate_size),
                   moe_top_k=int(cfg.num_experts_per_tok),
                   shared_expert_ffn=int(getattr(cfg, "n_shared_experts", 0) or 0) * int(cfg.moe_intermediate_size),
                   dense_layers=tuple(range(k)), router_score="sigmoid", expert_bias=True,
                   router_groups=int(getattr(cfg, "n_group", 1) or 1),
                   router_group_topk=int(getattr(cfg, "topk_group", 1) or 1),
                   router_scale=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
                   norm_topk=bool(getattr(cfg, "norm_topk_prob", True)), partial_rotary=partial,
                   mtp_layers=int(getattr(cfg, "num_nextn_predict_layers", 0) or 0))


def rules(d: Dims):
    return c.embedding_rules() + c.attention_rules(d) + [c.post_attention_norm_rule()] + c.dense_mlp_rules() + \
        c.moe_rules(shared="shared_experts.") + c.final_rules(d) + c.mtp_rules(d)


def _config(**kw):
    import transformers as tf
    return tf.Glm4MoeConfig(**kw)


def _tiny(tie: bool):
    """2 layers (layer 0 dense, layer 1 MoE), q/k/v biases, q/k norms, half-rotary heads; no multi-token prediction
    layer (transformers' model has none and would refuse its weights)."""
    return _config(vocab_size=1003, hidden_size=384, intermediate_size=1152, moe_intermediate_size=384,
                   num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                   n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                   first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, max_position_embeddings=512,
                   tie_word_embeddings=tie, num_nextn_predict_layers=0)


def _glm45_air(num_layers: int = 0):
    return _config(vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                   num_hidden_layers=num_layers or 46, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                   n_shared_experts=1, n_routed_experts=128, num_experts_per_tok=8, n_group=1, topk_group=1,
                   first_k_dense_replace=1, attention_bias=True, use_qk_norm=False, routed_scaling_factor=1.0,
                   max_position_embeddings=8192, tie_word_embeddings=False, num_nextn_predict_layers=0)


GLM4_MOE = Arch(
    model_types=("glm4_moe",), dims=dims, rules=rules, serving={**c.GQA_SERVING, **c.MLP_SERVING},
    fusion=c.GQA_FUSION, kv_leaves=("k_proj", "v_proj"), never_quantized=("gate",),
    exclude=("model.embed_tokens", "lm_head", "*.shared_head.head", "*norm*", "*.mlp.gate"), block_spec=True,
    gpt=lambda d: {"rotary_percent": d.partial_rotary}, mcore=lambda d: {"mtp_num_layers": d.mtp_layers or None},
    absent_same=("use_qk_norm", "n_group", "topk_group", "routed_scaling_factor"),
    tiny={"glm4_moe": _tiny}, presets={"glm-4.5-air": _glm45_air})
UNITS = (GLM4_MOE,)
