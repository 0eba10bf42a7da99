"""Rule builders shared by the architecture units: embedding, grouped-query attention, dense MLP, mixture-of-experts
block, final norm and lm_head. Each unit (``archs/<family>.py``) composes them and names its own HF leaves."""
from __future__ import annotations

from .base import (COLUMN, COLWISE, EXPERT, GATED, GLOBAL, QKV, REPLICATED, ROW, ROWWISE, TIED_COPY, VOCAB, Dims,
                   Rule, dense_mlp_layers, moe_layers)

ATTN = "model.layers.{i}.self_attn."
MLP = "model.layers.{i}.mlp."

# serving styles of the Llama-style leaves
GQA_SERVING = {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "o_proj": ROW}
MLP_SERVING = {"gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW}
GQA_FUSION = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_theta", None)
    if rope is None:
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(rope)


def partial_rotary(cfg) -> float:
    """The fraction of each head's dims that rotary embedding turns (``partial_rotary_factor``, 1.0 if unset)."""
    partial = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor")
    if partial is None:
        partial = getattr(cfg, "partial_rotary_factor", 1.0)
    return float(partial or 1.0)


def refuse(cfg, flag: str, why: str) -> None:
    if getattr(cfg, flag, False):
        raise ValueError(f"{cfg.model_type}: config sets {flag}={getattr(cfg, flag)!r}, {why}")


def gqa_dims(cfg, *, qkv_bias: bool = False, qk_norm: bool = False, **extra) -> Dims:
    """The attention and shared fields of a grouped-query-attention config (Llama, Qwen, Mixtral, GLM)."""
    heads = cfg.num_attention_heads
    groups = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Dims(
        model_type=cfg.model_type, hidden=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_query_groups=groups, head_dim=head_dim, ffn_hidden=getattr(cfg, "intermediate_size", 0) or 0,
        vocab=cfg.vocab_size, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), qkv_bias=qkv_bias,
        qk_norm=qk_norm, norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)), rope_theta=rope_theta(cfg),
        max_positions=int(getattr(cfg, "max_position_embeddings", 4096)), **extra)


def _qkv_shapes(d: Dims, *, bias: bool):
    q, kv = d.num_heads * d.head_dim, d.num_query_groups * d.head_dim
    if bias:
        return (q,), (kv,), (kv,)
    return (q, d.hidden), (kv, d.hidden), (kv, d.hidden)


def embedding_rules() -> list[Rule]:
    return [Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",),
                 lambda d: ((d.vocab, d.hidden),), VOCAB, scope=GLOBAL)]


def input_norm_rule(*fused: str) -> Rule:
    return Rule(("input_layernorm.weight",) + fused, ("model.layers.{i}.input_layernorm.weight",),
                lambda d: ((d.hidden,),), REPLICATED)


def post_attention_norm_rule() -> Rule:
    """``pre_mlp_layernorm`` of every layer (TE fuses it into a dense layer's fc1 as ``layer_norm_weight``)."""
    return Rule(("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
                ("model.layers.{i}.post_attention_layernorm.weight",), lambda d: ((d.hidden,),), REPLICATED)


def attention_rules(d: Dims) -> list[Rule]:
    """Grouped-query attention: fused linear_qkv -> q/k/v_proj (per query group), linear_proj -> o_proj."""
    rules = [
        input_norm_rule("self_attention.linear_qkv.layer_norm_weight"),
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


def dense_mlp_rules(prefix: str = MLP, leaves=("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """The dense MLP of the layers ``Dims.mlp_dense_layers`` covers (all of a dense model)."""
    gate, up, down = leaves
    return [
        Rule(("mlp.linear_fc1.weight",), (prefix + gate + ".weight", prefix + up + ".weight"),
             lambda d: ((d.ffn_hidden, d.hidden),) * 2, COLWISE, GATED, linear=True, layers=dense_mlp_layers),
        Rule(("mlp.linear_fc2.weight",), (prefix + down + ".weight",),
             lambda d: ((d.hidden, d.ffn_hidden),), ROWWISE, linear=True, layers=dense_mlp_layers),
    ]


def moe_rules(block: str = MLP, leaves=("gate_proj", "up_proj", "down_proj"), shared: str | None = None,
              shared_gate: str | None = None, bias: str = "gate.e_score_correction_bias") -> list[Rule]:
    """The MoE block of the layers ``Dims.moe_layers`` covers: router ``{block}gate`` (with its score correction
    bias when Dims.expert_bias, kept in float32), experts ``{block}experts.{e}.<leaves>``, an optional shared expert
    ``{block}<shared><leaves>`` split along tp and its sigmoid gate ``{block}<shared_gate>``. The router, the bias
    and the shared expert's gate are written as the source stores them (``Rule.as_stored``).

    Megatron holds a rank's experts as SequentialMLP (``mlp.experts.local_experts.{x}.linear_fc1.weight``) or in the
    TE grouped layout (``mlp.experts.linear_fc1.weight{x}``); local index x is global expert
    ``ep_rank * num_local_experts + x``. Each expert's fc1 ``[2 * moe_ffn / etp, hidden]`` is ``[gate; up]`` rows
    split along expert tensor parallel, fc2 ``[hidden, moe_ffn / etp]`` its input columns. ``bias``: where the
    score correction bias lives under ``block`` (MiniMax-M2 holds it beside the router, not in it)."""
    gate, up, down = leaves
    experts = block + "experts.{e}."
    rules = [
        Rule(("mlp.router.weight",), (block + "gate.weight",), lambda d: ((d.num_experts, d.hidden),),
             REPLICATED, linear=True, layers=moe_layers, as_stored=True),
        Rule(("mlp.experts.local_experts.{x}.linear_fc1.weight", "mlp.experts.linear_fc1.weight{x}"),
             (experts + gate + ".weight", experts + up + ".weight"),
             lambda d: ((d.moe_ffn_hidden, d.hidden),) * 2, COLWISE, GATED, linear=True, scope=EXPERT,
             layers=moe_layers),
        Rule(("mlp.experts.local_experts.{x}.linear_fc2.weight", "mlp.experts.linear_fc2.weight{x}"),
             (experts + down + ".weight",), lambda d: ((d.hidden, d.moe_ffn_hidden),), ROWWISE, linear=True,
             scope=EXPERT, layers=moe_layers),
    ]
    rules.append(Rule(("mlp.router.expert_bias",), (block + bias,),
                      lambda d: ((d.num_experts,),), REPLICATED, layers=lambda d: d.moe_layers if d.expert_bias else (),
                      dtype="float32", as_stored=True))
    if shared is not None:
        s = block + shared
        rules += [
            Rule(("mlp.shared_experts.linear_fc1.weight",), (s + gate + ".weight", s + up + ".weight"),
                 lambda d: ((d.shared_expert_ffn, d.hidden),) * 2, COLWISE, GATED, linear=True,
                 layers=lambda d: d.moe_layers if d.shared_expert_ffn else ()),
            Rule(("mlp.shared_experts.linear_fc2.weight",), (s + down + ".weight",),
                 lambda d: ((d.hidden, d.shared_expert_ffn),), ROWWISE, linear=True,
                 layers=lambda d: d.moe_layers if d.shared_expert_ffn else ()),
        ]
    if shared_gate is not None:
        rules.append(Rule(("mlp.shared_experts.gate_weight",), (block + shared_gate + ".weight",),
                          lambda d: ((1, d.hidden),), REPLICATED, linear=True,
                          layers=lambda d: d.moe_layers if d.shared_expert_gate else (), as_stored=True))
    return rules


def final_rules(d: Dims) -> list[Rule]:
    """The final norm and lm_head; with multi-token-prediction layers the output layer is also each one's
    ``shared_head.head`` (DeepSeek-V3's and GLM-4.5's checkpoints hold it there again)."""
    rules = [Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), lambda d: ((d.hidden,),),
                  REPLICATED, scope=GLOBAL)]
    if d.tie_embeddings:
        # With pipeline parallelism the last stage holds a synchronized copy of the embedding: nothing to write.
        rules.append(Rule(("output_layer.weight",), (), lambda d: (), TIED_COPY, scope=GLOBAL))
    else:
        rules.append(Rule(("output_layer.weight",), ("lm_head.weight",), lambda d: ((d.vocab, d.hidden),), VOCAB,
                          linear=True, scope=GLOBAL))
    if d.mtp_layers:
        heads = tuple(f"model.layers.{d.num_layers + k}.shared_head.head.weight" for k in range(d.mtp_layers))
        head = rules[-1]
        rules[-1] = Rule(head.mcore, head.hf + heads, lambda d: ((d.vocab, d.hidden),) * (1 + d.mtp_layers),
                         VOCAB, linear=head.linear, scope=GLOBAL)
    return rules


def mtp_rules(d: Dims) -> list[Rule]:
    """Multi-token prediction (``num_nextn_predict_layers``; Megatron ``mtp.layers.{k}``): the decoder layer of MTP
    layer k is HF layer ``num_layers + k`` (the layer rules cover it); beside it ``enorm``, ``hnorm``, ``eh_proj``
    ([hidden, 2 * hidden], column-parallel in Megatron; a plain unquantized linear in DeepSeek's release and in
    vLLM's MTP module) and ``shared_head.norm`` (Megatron's ``final_layernorm``). ``shared_head.head`` is the
    output layer, written again by the lm_head rule."""
    rules = []
    for k in range(d.mtp_layers):
        hf, mc = f"model.layers.{d.num_layers + k}.", f"mtp.layers.{k}."
        rules += [
            Rule((mc + "enorm.weight",), (hf + "enorm.weight",), lambda d: ((d.hidden,),), REPLICATED, scope=GLOBAL),
            Rule((mc + "hnorm.weight",), (hf + "hnorm.weight",), lambda d: ((d.hidden,),), REPLICATED, scope=GLOBAL),
            Rule((mc + "eh_proj.weight",), (hf + "eh_proj.weight",), lambda d: ((d.hidden, 2 * d.hidden),), COLWISE,
                 scope=GLOBAL),
            Rule((mc + "final_layernorm.weight",), (hf + "shared_head.norm.weight",), lambda d: ((d.hidden,),),
                 REPLICATED, scope=GLOBAL),
        ]
    return rules


def moe_mcore(d: Dims, on_gpu: bool) -> dict:
    """megatron-core arguments of a mixture-of-experts model (SequentialMLP experts, no auxiliary loss)."""
    kw = dict(num_moe_experts=d.num_experts, moe_ffn_hidden_size=d.moe_ffn_hidden, moe_router_topk=d.moe_top_k,
              # the alltoall dispatcher needs CUDA streams; the export never runs tokens through either
              moe_token_dispatcher_type="alltoall" if on_gpu else "allgather", moe_grouped_gemm=False,
              moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_pre_softmax=False,
              moe_permute_fusion=False)
    if d.shared_expert_ffn:
        kw.update(moe_shared_expert_intermediate_size=d.shared_expert_ffn, moe_shared_expert_gate=d.shared_expert_gate)
    if d.router_score == "sigmoid":
        # routing in float32 as the HF models compute it
        kw.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=d.expert_bias,
                  moe_router_dtype="fp32",
                  moe_router_topk_scaling_factor=d.router_scale if d.router_scale != 1.0 else None)
        if d.router_groups > 1:
            kw.update(moe_router_num_groups=d.router_groups, moe_router_group_topk=d.router_group_topk)
    if d.dense_layers:
        kw["moe_layer_freq"] = [0 if i in d.dense_layers else 1 for i in range(d.num_layers)]
    return kw
