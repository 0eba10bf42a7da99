"""Declarative name tables: one Rule per Megatron parameter, naming its HF tensors, how it is fused and sharded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Sharding kinds of a Megatron parameter along its tensor-parallel axis.
COLWISE, ROWWISE, REPLICATED, VOCAB, TIED_COPY = "colwise", "rowwise", "replicated", "vocab", "tied_copy"
# Fusion kinds: how one Megatron tensor becomes several HF tensors.
PLAIN, QKV, GATED = "plain", "qkv", "gated"
# Scopes: where the rule's names are expanded.
GLOBAL, LAYER, EXPERT = "global", "layer", "expert"


@dataclass(frozen=True)
class Dims:
    """The shape-defining numbers of a decoder LLM, read from its HF config."""
    model_type: str
    hidden: int
    num_layers: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden: int
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    moe_ffn_hidden: int = 0
    moe_top_k: int = 0
    shared_expert_ffn: int = 0
    shared_expert_gate: bool = False
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 4096

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it holds.

    mcore: accepted Megatron names (relative to ``decoder.layers.{j}.`` for LAYER and EXPERT scope; ``{x}`` is the
    local expert index for EXPERT scope). hf: HF names with ``{i}`` the global layer and ``{e}`` the global expert.
    shapes: the full HF shape of each hf name, from Dims. linear: the HF tensors are linear weights (FP8 candidates).
    """
    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    shapes: Callable[[Dims], tuple[tuple[int, ...], ...]]
    shard: str
    fusion: str = PLAIN
    linear: bool = False
    scope: str = LAYER


def hf_module(hf_name: str) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``."""
    return hf_name.rsplit(".", 1)[0]
