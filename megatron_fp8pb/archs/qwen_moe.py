"""Qwen3-MoE and Qwen2-MoE: router ``mlp.gate``, experts ``mlp.experts.{e}.{gate,up,down}_proj``; Qwen2-MoE adds a
shared expert ``mlp.shared_expert.{gate,up,down}_proj`` with a sigmoid gate ``mlp.shared_expert_gate`` ([1, hidden])
and q/k/v biases. Models that mix dense MLP layers in (``mlp_only_layers`` / ``decoder_sparse_step``) are refused."""
from __future__ import annotations

from dataclasses import replace

from . import common as c
from .base import Arch, Dims
from .llama import SERVING, TINY


def _dense_layers(cfg) -> list[int]:
    step = getattr(cfg, "decoder_sparse_step", 1)
    only = set(getattr(cfg, "mlp_only_layers", None) or ())
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"{cfg.model_type}: decoder_sparse_step={step!r} must be an integer >= 1")
    return [i for i in range(cfg.num_hidden_layers) if i in only or (i + 1) % step]


def dims(cfg) -> Dims:
    mt = cfg.model_type
    dense_layers = _dense_layers(cfg)
    if dense_layers:
        raise ValueError(
            f"{mt}: mlp_only_layers={getattr(cfg, 'mlp_only_layers', None)} and decoder_sparse_step="
            f"{getattr(cfg, 'decoder_sparse_step', 1)} make layer(s) {dense_layers} dense MLP layers, which this "
            f"exporter does not map; only all-MoE models (mlp_only_layers=[], decoder_sparse_step=1) are supported")
    c.refuse(cfg, "mlp_bias", "which this exporter does not map")
    if (cfg.num_experts or 0) < 1:
        raise ValueError(f"{mt}: num_experts={cfg.num_experts} must be >= 1 for a mixture-of-experts export")
    if mt == "qwen3_moe":
        c.refuse(cfg, "attention_bias", "which also puts a bias on o_proj that Megatron's add_qkv_bias does not hold")
    base = c.gqa_dims(cfg, qkv_bias=bool(getattr(cfg, "qkv_bias", False)),
                      qk_norm=(mt == "qwen3_moe"))
    shared = int(cfg.shared_expert_intermediate_size) if mt == "qwen2_moe" else 0
    return replace(base, ffn_hidden=0, num_experts=int(cfg.num_experts), moe_ffn_hidden=int(cfg.moe_intermediate_size),
                   moe_top_k=int(cfg.num_experts_per_tok), shared_expert_ffn=shared, shared_expert_gate=bool(shared))


def rules(d: Dims):
    shared = ("shared_expert.", "shared_expert_gate") if d.model_type == "qwen2_moe" else (None, None)
    return c.embedding_rules() + c.attention_rules(d) + [c.post_attention_norm_rule()] + \
        c.moe_rules(shared=shared[0], shared_gate=shared[1]) + c.final_rules(d)


def _qwen3_moe(tie: bool = False, **kw):
    import transformers as tf
    return tf.Qwen3MoeConfig(**{**TINY, "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 384, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                "norm_topk_prob": True, "tie_word_embeddings": tie, **kw})


def _qwen2_moe(tie: bool):
    import transformers as tf
    return tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=384,
                             shared_expert_intermediate_size=384, decoder_sparse_step=1, mlp_only_layers=[],
                             norm_topk_prob=False, tie_word_embeddings=tie, **TINY)


def _preset(**shape):
    return lambda num_layers=0: _qwen3_moe(**{**shape, "max_position_embeddings": 8192,
                                              **({"num_hidden_layers": num_layers} if num_layers else {})})


MOE_SERVING = {**SERVING, "gate": None, "shared_expert_gate": None}
_common = dict(serving={k: v for k, v in MOE_SERVING.items() if v}, fusion=c.GQA_FUSION, kv_leaves=("k_proj", "v_proj"),
               never_quantized=("gate", "shared_expert_gate"),
               exclude=("model.embed_tokens", "lm_head", "*norm*", "*.mlp.gate", "*.shared_expert_gate"),
               mcore=lambda d: {})
QWEN3_MOE = Arch(
    model_types=("qwen3_moe",), dims=dims, rules=rules, spec=lambda d: {"qk_layernorm": True},
    tiny={"qwen3_moe": _qwen3_moe}, absent_same=("decoder_sparse_step", "mlp_only_layers"),
    presets={
        "qwen3-moe-300m": _preset(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                  moe_intermediate_size=704, num_hidden_layers=8, num_attention_heads=16,
                                  num_key_value_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=4),
        "qwen3-30b-a3b": _preset(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                 moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                 num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8),
        "qwen3-235b-a22b": _preset(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                   moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                                   num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8),
    }, **_common)
QWEN2_MOE = Arch(model_types=("qwen2_moe",), dims=dims, rules=rules, tiny={"qwen2_moe": _qwen2_moe},
                 absent_same=("head_dim", "decoder_sparse_step", "mlp_only_layers"), **_common)
UNITS = (QWEN3_MOE, QWEN2_MOE)
