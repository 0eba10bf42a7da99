"""The Llama family (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms) as a Megatron <-> HF table."""
from __future__ import annotations

from .base import (COLWISE, GATED, GLOBAL, PLAIN, QKV, REPLICATED, ROWWISE, TIED_COPY, VOCAB, Dims, Rule)

ATTN = "model.layers.{i}.self_attn."
MLP = "model.layers.{i}.mlp."


def dims_from_hf(cfg) -> Dims:
    """An HF config object (LlamaConfig, Qwen2Config, ...) -> Dims; unsupported variants are refused by name."""
    mt = cfg.model_type
    for flag in ("mlp_bias",):
        if getattr(cfg, flag, False):
            raise ValueError(f"{mt}: config sets {flag}=True, which this exporter does not map; set it false or "
                             f"add a table for that variant")
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    if attention_bias and mt != "qwen2":
        raise ValueError(f"{mt}: attention_bias=True also puts a bias on o_proj, which Megatron's add_qkv_bias does "
                         f"not hold; only q/k/v biases (Qwen2) are supported")
    heads = cfg.num_attention_heads
    groups = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_theta", None)
    if rope is None:
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return Dims(
        model_type=mt, hidden=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_query_groups=groups, head_dim=head_dim, ffn_hidden=cfg.intermediate_size, vocab=cfg.vocab_size,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2") or attention_bias, qk_norm=(mt in ("qwen3", "qwen3_moe")),
        norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)), rope_theta=float(rope),
        max_positions=int(getattr(cfg, "max_position_embeddings", 4096)))


def _qkv_shapes(d: Dims, *, bias: bool):
    q, kv = d.num_heads * d.head_dim, d.num_query_groups * d.head_dim
    if bias:
        return (q,), (kv,), (kv,)
    return (q, d.hidden), (kv, d.hidden), (kv, d.hidden)


def embedding_rules() -> list[Rule]:
    return [Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",),
                 lambda d: ((d.vocab, d.hidden),), VOCAB, scope=GLOBAL)]


def attention_rules(d: Dims) -> list[Rule]:
    rules = [
        Rule(("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
             ("model.layers.{i}.input_layernorm.weight",), lambda d: ((d.hidden,),), REPLICATED),
        Rule(("self_attention.linear_qkv.weight",),
             (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"),
             lambda d: _qkv_shapes(d, bias=False), COLWISE, QKV, linear=True),
        Rule(("self_attention.linear_proj.weight",), (ATTN + "o_proj.weight",),
             lambda d: ((d.hidden, d.num_heads * d.head_dim),), ROWWISE, linear=True),
    ]
    if d.qkv_bias:
        rules.append(Rule(("self_attention.linear_qkv.bias",),
                          (ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias"),
                          lambda d: _qkv_shapes(d, bias=True), COLWISE, QKV))
    if d.qk_norm:
        rules += [Rule(("self_attention.q_layernorm.weight",), (ATTN + "q_norm.weight",),
                       lambda d: ((d.head_dim,),), REPLICATED),
                  Rule(("self_attention.k_layernorm.weight",), (ATTN + "k_norm.weight",),
                       lambda d: ((d.head_dim,),), REPLICATED)]
    return rules


def dense_mlp_rules() -> list[Rule]:
    return [
        Rule(("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
             ("model.layers.{i}.post_attention_layernorm.weight",), lambda d: ((d.hidden,),), REPLICATED),
        Rule(("mlp.linear_fc1.weight",), (MLP + "gate_proj.weight", MLP + "up_proj.weight"),
             lambda d: ((d.ffn_hidden, d.hidden),) * 2, COLWISE, GATED, linear=True),
        Rule(("mlp.linear_fc2.weight",), (MLP + "down_proj.weight",),
             lambda d: ((d.hidden, d.ffn_hidden),), ROWWISE, linear=True),
    ]


def final_rules(d: Dims) -> list[Rule]:
    rules = [Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), lambda d: ((d.hidden,),),
                  REPLICATED, scope=GLOBAL)]
    if d.tie_embeddings:
        # With pipeline parallelism the last stage holds a synchronized copy of the embedding: nothing to write.
        rules.append(Rule(("output_layer.weight",), (), lambda d: (), TIED_COPY, scope=GLOBAL))
    else:
        rules.append(Rule(("output_layer.weight",), ("lm_head.weight",), lambda d: ((d.vocab, d.hidden),), VOCAB,
                          linear=True, scope=GLOBAL))
    return rules


def rules(d: Dims) -> list[Rule]:
    return embedding_rules() + attention_rules(d) + dense_mlp_rules() + final_rules(d)


__all__ = ["dims_from_hf", "rules", "PLAIN"]
