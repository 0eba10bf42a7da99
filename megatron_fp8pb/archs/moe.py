"""Mixture-of-experts tables: Qwen3-MoE (``mlp.experts.{e}.gate/up/down_proj``, router ``mlp.gate``) and Mixtral
(``block_sparse_moe.experts.{e}.w1/w3/w2``, router ``block_sparse_moe.gate``), as their HF checkpoints name them.

Megatron holds the experts of a rank as SequentialMLP (``mlp.experts.local_experts.{x}.linear_fc1.weight``) or in the
grouped layout (``mlp.experts.linear_fc1.weight{x}``); local index x becomes global expert ``ep_rank * local + x``.
Each expert's fc1 is ``[gate; up]`` split along expert tensor parallel, fc2 along its input.
"""
from __future__ import annotations

from dataclasses import replace

from . import dense
from .base import COLWISE, EXPERT, GATED, REPLICATED, ROWWISE, Dims, Rule

MODEL_TYPES = ("qwen3_moe", "mixtral")

_NAMES = {  # model_type -> (MLP prefix, router, gate, up, down)
    "qwen3_moe": ("model.layers.{i}.mlp.", "gate", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("model.layers.{i}.block_sparse_moe.", "gate", "w1", "w3", "w2"),
}


def dims_from_hf(cfg) -> Dims:
    mt = cfg.model_type
    if mt == "qwen3_moe":
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            raise ValueError(f"qwen3_moe: mlp_only_layers={cfg.mlp_only_layers} / decoder_sparse_step="
                             f"{cfg.decoder_sparse_step} mixes dense and MoE layers, which this exporter does not map; "
                             f"only all-MoE models (mlp_only_layers=[], decoder_sparse_step=1) are supported")
        experts, ffn = cfg.num_experts, cfg.moe_intermediate_size
    else:
        experts, ffn = cfg.num_local_experts, cfg.intermediate_size
    base = dense.dims_from_hf(cfg)
    return replace(base, num_experts=experts, moe_ffn_hidden=ffn, moe_top_k=cfg.num_experts_per_tok, ffn_hidden=0)


def expert_rules(d: Dims) -> list[Rule]:
    mlp, router, gate, up, down = _NAMES[d.model_type]
    experts = mlp + "experts.{e}."
    return [
        Rule(("pre_mlp_layernorm.weight",), ("model.layers.{i}.post_attention_layernorm.weight",),
             lambda d: ((d.hidden,),), REPLICATED),
        Rule(("mlp.router.weight",), (mlp + router + ".weight",), lambda d: ((d.num_experts, d.hidden),),
             REPLICATED, linear=True),
        Rule(("mlp.experts.local_experts.{x}.linear_fc1.weight", "mlp.experts.linear_fc1.weight{x}"),
             (experts + gate + ".weight", experts + up + ".weight"),
             lambda d: ((d.moe_ffn_hidden, d.hidden),) * 2, COLWISE, GATED, linear=True, scope=EXPERT),
        Rule(("mlp.experts.local_experts.{x}.linear_fc2.weight", "mlp.experts.linear_fc2.weight{x}"),
             (experts + down + ".weight",), lambda d: ((d.hidden, d.moe_ffn_hidden),), ROWWISE, linear=True,
             scope=EXPERT),
    ]


def rules(d: Dims) -> list[Rule]:
    return dense.embedding_rules() + dense.attention_rules(d) + expert_rules(d) + dense.final_rules(d)
