"""Mixture-of-experts tables, with HF names as each architecture's checkpoints spell them (and as transformers 5.x
``from_pretrained`` and vLLM load them, per expert, each with its own ``weight_scale_inv``):

- Qwen3-MoE: router ``mlp.gate``, experts ``mlp.experts.{e}.{gate,up,down}_proj``.
- Qwen2-MoE: the same plus a shared expert ``mlp.shared_expert.{gate,up,down}_proj`` and its sigmoid gate
  ``mlp.shared_expert_gate`` ([1, hidden]); q/k/v biases.
- Mixtral: router ``block_sparse_moe.gate``, experts ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) /
  ``w2`` (down).

Megatron holds the experts of a rank as SequentialMLP (``mlp.experts.local_experts.{x}.linear_fc1.weight``) or in the
TE grouped layout (``mlp.experts.linear_fc1.weight{x}``); local index x becomes global expert
``ep_rank * num_local_experts + x``. Each expert's fc1 ``[2 * moe_ffn / etp, hidden]`` is ``[gate; up]`` rows split
along expert tensor parallel, fc2 ``[hidden, moe_ffn / etp]`` its input columns. The shared expert is split along tp.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import dense
from .base import COLWISE, EXPERT, GATED, REPLICATED, ROWWISE, Dims, Rule


@dataclass(frozen=True)
class _Arch:
    block: str              # the MoE block of layer {i}
    gate: str               # expert leaves: gate (w1), up (w3), down (w2)
    up: str
    down: str
    num_experts: str        # config attributes
    expert_ffn: str
    dense_layer_settings: bool  # has mlp_only_layers / decoder_sparse_step
    shared_expert: bool = False


_ARCHS = {
    "qwen3_moe": _Arch("model.layers.{i}.mlp.", "gate_proj", "up_proj", "down_proj", "num_experts",
                       "moe_intermediate_size", True),
    "qwen2_moe": _Arch("model.layers.{i}.mlp.", "gate_proj", "up_proj", "down_proj", "num_experts",
                       "moe_intermediate_size", True, shared_expert=True),
    "mixtral": _Arch("model.layers.{i}.block_sparse_moe.", "w1", "w3", "w2", "num_local_experts",
                     "intermediate_size", False),
}
MODEL_TYPES = tuple(_ARCHS)


def _dense_layers(cfg) -> list[int]:
    """Layers that transformers builds as a dense MLP (Qwen-MoE ``mlp_only_layers`` / ``decoder_sparse_step``)."""
    step = getattr(cfg, "decoder_sparse_step", 1)
    only = set(getattr(cfg, "mlp_only_layers", None) or ())
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"{cfg.model_type}: decoder_sparse_step={step!r} must be an integer >= 1")
    return [i for i in range(cfg.num_hidden_layers) if i in only or (i + 1) % step]


def dims_from_hf(cfg) -> Dims:
    """An HF MoE config -> Dims with num_experts, moe_ffn_hidden (one expert's intermediate size), moe_top_k and,
    for Qwen2-MoE, the shared expert. Models that mix dense MLP layers in are refused by name."""
    mt = cfg.model_type
    a = _ARCHS[mt]
    if a.dense_layer_settings:
        dense_layers = _dense_layers(cfg)
        if dense_layers:
            raise ValueError(
                f"{mt}: mlp_only_layers={getattr(cfg, 'mlp_only_layers', None)} and decoder_sparse_step="
                f"{getattr(cfg, 'decoder_sparse_step', 1)} make layer(s) {dense_layers} dense MLP layers, which this "
                f"exporter does not map; only all-MoE models (mlp_only_layers=[], decoder_sparse_step=1) are supported")
    experts, ffn = getattr(cfg, a.num_experts), getattr(cfg, a.expert_ffn)
    if (experts or 0) < 1:
        raise ValueError(f"{mt}: {a.num_experts}={experts} must be >= 1 for a mixture-of-experts export")
    base = dense.dims_from_hf(cfg)
    shared = int(cfg.shared_expert_intermediate_size) if a.shared_expert else 0
    return replace(base, ffn_hidden=0, num_experts=int(experts), moe_ffn_hidden=int(ffn),
                   moe_top_k=int(cfg.num_experts_per_tok), shared_expert_ffn=shared, shared_expert_gate=bool(shared),
                   qkv_bias=base.qkv_bias or bool(getattr(cfg, "qkv_bias", False)))


def moe_rules(d: Dims) -> list[Rule]:
    """The MLP block of a MoE layer: pre-MLP norm, router (unquantized, listed), experts, shared expert."""
    a = _ARCHS[d.model_type]
    experts = a.block + "experts.{e}."
    rules = [
        Rule(("pre_mlp_layernorm.weight",), ("model.layers.{i}.post_attention_layernorm.weight",),
             lambda d: ((d.hidden,),), REPLICATED),
        Rule(("mlp.router.weight",), (a.block + "gate.weight",), lambda d: ((d.num_experts, d.hidden),),
             REPLICATED, linear=True),
        Rule(("mlp.experts.local_experts.{x}.linear_fc1.weight", "mlp.experts.linear_fc1.weight{x}"),
             (experts + a.gate + ".weight", experts + a.up + ".weight"),
             lambda d: ((d.moe_ffn_hidden, d.hidden),) * 2, COLWISE, GATED, linear=True, scope=EXPERT),
        Rule(("mlp.experts.local_experts.{x}.linear_fc2.weight", "mlp.experts.linear_fc2.weight{x}"),
             (experts + a.down + ".weight",), lambda d: ((d.hidden, d.moe_ffn_hidden),), ROWWISE, linear=True,
             scope=EXPERT),
    ]
    if d.shared_expert_ffn:
        shared = a.block + "shared_expert."
        rules += [
            Rule(("mlp.shared_experts.linear_fc1.weight",), (shared + "gate_proj.weight", shared + "up_proj.weight"),
                 lambda d: ((d.shared_expert_ffn, d.hidden),) * 2, COLWISE, GATED, linear=True),
            Rule(("mlp.shared_experts.linear_fc2.weight",), (shared + "down_proj.weight",),
                 lambda d: ((d.hidden, d.shared_expert_ffn),), ROWWISE, linear=True),
        ]
    if d.shared_expert_gate:
        rules.append(Rule(("mlp.shared_experts.gate_weight",), (a.block + "shared_expert_gate.weight",),
                          lambda d: ((1, d.hidden),), REPLICATED, linear=True))
    return rules


def rules(d: Dims) -> list[Rule]:
    return dense.embedding_rules() + dense.attention_rules(d) + moe_rules(d) + dense.final_rules(d)
