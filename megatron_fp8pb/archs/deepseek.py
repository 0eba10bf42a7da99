"""DeepSeek-V3 (also R1, V3.1, Kimi-K2, Moonlight: ``model_type: deepseek_v3``): multi-latent attention, dense MLP
layers below ``first_k_dense_replace``, MoE layers with shared experts and a sigmoid router whose per-expert score
correction (``mlp.gate.e_score_correction_bias``, Megatron's ``router.expert_bias``) stays in float32.

Names as transformers saves ``DeepseekV3ForCausalLM``: ``self_attn.q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or
``q_proj`` when ``q_lora_rank`` is null), ``kv_a_proj_with_mqa`` ([kv_lora_rank + qk_rope_head_dim, hidden]: K's
latent and its shared rope part), ``kv_a_layernorm``, ``kv_b_proj`` (per head [k_nope; v] rows), ``o_proj``;
``mlp.experts.{e}.{gate,up,down}_proj``, ``mlp.shared_experts.{gate,up,down}_proj``.

Megatron (MLASelfAttention): ``linear_q_down_proj`` / ``linear_q_up_proj`` / ``linear_q_proj`` / ``linear_kv_down_proj``
/ ``linear_kv_up_proj`` / ``linear_proj``; q/kv latent norms are ``q_layernorm`` / ``kv_layernorm`` (local spec) or
``layer_norm_weight`` fused into the up-projections (TransformerEngine spec). The down-projections are
column-parallel in the local spec and replicated (``TELinear``, duplicated) under TransformerEngine: the module says
which. q rows per head are [nope; rope] in both, kv_b rows per head [k_nope; v] in both, so no row permutation.
"""
from __future__ import annotations

from dataclasses import replace

from . import common as c
from .base import COLUMN, COLWISE, REPLICATED, ROW, ROWWISE, WHOLE, Arch, Dims, Rule

ATTN = c.ATTN


def dims(cfg) -> Dims:
    mt = cfg.model_type
    freq = getattr(cfg, "moe_layer_freq", 1)
    if freq != 1:
        raise ValueError(f"{mt}: moe_layer_freq={freq} (a MoE layer every {freq} layers) is not mapped; only "
                         f"moe_layer_freq=1 with first_k_dense_replace dense layers is supported")
    c.refuse(cfg, "attention_bias", "which this exporter does not map for multi-latent attention")
    if not cfg.kv_lora_rank:
        raise ValueError(f"{mt}: kv_lora_rank={cfg.kv_lora_rank} must be > 0 (multi-latent attention)")
    heads, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    k = min(int(getattr(cfg, "first_k_dense_replace", 0) or 0), cfg.num_hidden_layers)
    experts = int(cfg.n_routed_experts or 0)
    if experts < 1:
        raise ValueError(f"{mt}: n_routed_experts={cfg.n_routed_experts} must be >= 1")
    return replace(c.gqa_dims(cfg), **_mla_overrides(cfg, heads, nope, rope, experts, k))


def _mla_overrides(cfg, heads, nope, rope, experts, k) -> dict:
    return dict(
        num_query_groups=heads, head_dim=nope + rope, ffn_hidden=int(cfg.intermediate_size),
        num_experts=experts, moe_ffn_hidden=int(cfg.moe_intermediate_size), moe_top_k=int(cfg.num_experts_per_tok),
        shared_expert_ffn=int(getattr(cfg, "n_shared_experts", 0) or 0) * int(cfg.moe_intermediate_size),
        dense_layers=tuple(range(k)), q_lora_rank=int(cfg.q_lora_rank or 0), kv_lora_rank=int(cfg.kv_lora_rank),
        qk_nope_dim=nope, qk_rope_dim=rope, v_head_dim=int(cfg.v_head_dim), router_score="sigmoid",
        expert_bias=True, router_groups=int(getattr(cfg, "n_group", 1) or 1),
        router_group_topk=int(getattr(cfg, "topk_group", 1) or 1),
        router_scale=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
        norm_topk=bool(getattr(cfg, "norm_topk_prob", True)),
        mtp_layers=int(getattr(cfg, "num_nextn_predict_layers", 0) or 0))


def _q_rows(d: Dims) -> int:
    return d.num_heads * (d.qk_nope_dim + d.qk_rope_dim)


def mla_rules(d: Dims) -> list[Rule]:
    rules = [c.input_norm_rule()]
    if d.q_lora_rank:
        rules += [
            Rule(("self_attention.linear_q_down_proj.weight",), (ATTN + "q_a_proj.weight",),
                 lambda d: ((d.q_lora_rank, d.hidden),), COLWISE, linear=True, alt_shard=(REPLICATED,)),
            Rule(("self_attention.q_layernorm.weight", "self_attention.linear_q_up_proj.layer_norm_weight"),
                 (ATTN + "q_a_layernorm.weight",), lambda d: ((d.q_lora_rank,),), REPLICATED),
            Rule(("self_attention.linear_q_up_proj.weight",), (ATTN + "q_b_proj.weight",),
                 lambda d: ((_q_rows(d), d.q_lora_rank),), COLWISE, linear=True),
        ]
    else:
        rules.append(Rule(("self_attention.linear_q_proj.weight",), (ATTN + "q_proj.weight",),
                          lambda d: ((_q_rows(d), d.hidden),), COLWISE, linear=True))
    rules += [
        Rule(("self_attention.linear_kv_down_proj.weight",), (ATTN + "kv_a_proj_with_mqa.weight",),
             lambda d: ((d.kv_lora_rank + d.qk_rope_dim, d.hidden),), COLWISE, linear=True, alt_shard=(REPLICATED,)),
        Rule(("self_attention.kv_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight"),
             (ATTN + "kv_a_layernorm.weight",), lambda d: ((d.kv_lora_rank,),), REPLICATED),
        Rule(("self_attention.linear_kv_up_proj.weight",), (ATTN + "kv_b_proj.weight",),
             lambda d: ((d.num_heads * (d.qk_nope_dim + d.v_head_dim), d.kv_lora_rank),), COLWISE, linear=True),
        Rule(("self_attention.linear_proj.weight",), (ATTN + "o_proj.weight",),
             lambda d: ((d.hidden, d.num_heads * d.v_head_dim),), ROWWISE, linear=True),
    ]
    return rules


def rules(d: Dims) -> list[Rule]:
    return c.embedding_rules() + mla_rules(d) + [c.post_attention_norm_rule()] + c.dense_mlp_rules() + \
        c.moe_rules(shared="shared_experts.") + c.final_rules(d) + c.mtp_rules(d)


def mcore(d: Dims) -> dict:
    """MLATransformerConfig arguments. rope_type "rope": the export holds no rotary state, and megatron-core's YaRN
    embedding cannot be built on a CPU-only host; a training job keeps its own rope settings."""
    return dict(multi_latent_attention=True, q_lora_rank=d.q_lora_rank or None, kv_lora_rank=d.kv_lora_rank,
                qk_head_dim=d.qk_nope_dim, qk_pos_emb_head_dim=d.qk_rope_dim, v_head_dim=d.v_head_dim,
                kv_channels=d.qk_nope_dim + d.qk_rope_dim, rope_type="rope", qk_layernorm=True,
                mtp_num_layers=d.mtp_layers or None)


def _config(**kw):
    import transformers as tf
    return tf.DeepseekV3Config(**kw)


def _tiny(tie: bool):
    """2 layers (layer 0 dense, layer 1 MoE), q_proj (q_lora_rank null), kv_a_proj_with_mqa 256 rows, no
    multi-token prediction layer (transformers' model has none and would refuse its weights)."""
    return _config(vocab_size=1003, hidden_size=384, intermediate_size=1152, moe_intermediate_size=384,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                   n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                   q_lora_rank=None, kv_lora_rank=192, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                   max_position_embeddings=512, rope_scaling=None, tie_word_embeddings=tie,
                   num_nextn_predict_layers=0)


def _preset(**shape):
    def make(num_layers: int = 0):
        kw = dict(shape, max_position_embeddings=8192, tie_word_embeddings=False, rope_scaling=None,
                  num_nextn_predict_layers=0)
        if num_layers:
            kw["num_hidden_layers"] = num_layers
        return _config(**kw)
    return make


_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
           num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
           n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
           q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
           routed_scaling_factor=2.5, norm_topk_prob=True)
DEEPSEEK_V3 = Arch(
    model_types=("deepseek_v3",), also_reads=("kimi_k2",), dims=dims, rules=rules,
    serving={"q_proj": COLUMN, "q_a_proj": WHOLE, "q_b_proj": COLUMN, "kv_a_proj_with_mqa": WHOLE,
             "kv_b_proj": COLUMN, "o_proj": ROW, **c.MLP_SERVING},
    fusion=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")), never_quantized=("gate",),
    exclude=("model.embed_tokens", "lm_head", "*.shared_head.head", "*norm*", "*.mlp.gate"), mcore=mcore,
    block_spec=True, absent_same=("moe_layer_freq", "head_dim"),     # head_dim: nope + rope, whatever it says
    tiny={"deepseek_v3": _tiny},
    presets={"deepseek-v3": _preset(**_V3),
             # Kimi-K2: DeepSeek-V3's layout with 384 experts, 64 heads, one dense layer and a 163840 vocabulary
             "kimi-k2": _preset(**{**_V3, "vocab_size": 163840, "num_attention_heads": 64, "num_key_value_heads": 64,
                                   "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
                                   "first_k_dense_replace": 1, "routed_scaling_factor": 2.827})})
UNITS = (DEEPSEEK_V3,)
