"""Declarative name tables: one Rule per Megatron parameter, naming its HF tensors, how it is fused and sharded, and
the layers it covers; one Arch per architecture family, owning everything the exporter knows about it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Sharding kinds of a Megatron parameter along its tensor-parallel axis.
COLWISE, ROWWISE, REPLICATED, VOCAB, TIED_COPY = "colwise", "rowwise", "replicated", "vocab", "tied_copy"
# Fusion kinds: how one Megatron tensor becomes several HF tensors. DUPLICATE: the same tensor under each HF name
# (the embedding written again as an untied lm_head).
PLAIN, QKV, GATED, DUPLICATE = "plain", "qkv", "gated", "duplicate"
# PARTS: one Megatron tensor holding several HF tensors' rows in head groups, as ``Rule.parts`` describes
PARTS = "parts"
# Scopes: where the rule's names are expanded.
GLOBAL, LAYER, EXPERT = "global", "layer", "expert"
# Serving-side parallel styles of an HF linear (vLLM / SGLang).
COLUMN, ROW, WHOLE = "column", "row", "replicated"


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
    # layers built with a dense MLP in a mixture-of-experts model (DeepSeek / GLM first_k_dense_replace)
    dense_layers: tuple[int, ...] = ()
    # multi-latent attention (DeepSeek-V3): kv_lora_rank > 0; q_lora_rank 0 means a plain q_proj
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # router: "softmax" or "sigmoid"; expert_bias: a per-expert score correction (e_score_correction_bias)
    router_score: str = "softmax"
    expert_bias: bool = False
    router_groups: int = 0
    router_group_topk: int = 0
    router_scale: float = 1.0
    norm_topk: bool = False
    partial_rotary: float = 1.0
    mtp_layers: int = 0       # multi-token prediction layers written after the decoder layers
    # gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): the layers that have it, its head counts and dims;
    # lin_split: the input projection saved split (in_proj_qkv / in_proj_z / in_proj_b / in_proj_a)
    linear_layers: tuple[int, ...] = ()
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    lin_conv: int = 0
    lin_split: bool = False
    attn_gate: bool = False   # full attention with an output gate: q_proj rows per head [query; gate]
    # DeepSeek sparse attention's indexer: heads, head dim, keys each query keeps, and the layers that hold one
    index_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    indexer_layers: tuple[int, ...] = ()
    qk_norm_full: bool = False   # q/k RMSNorm over all heads at once ([heads * head_dim]; MiniMax-M2)
    # tensors of a vision-language checkpoint written unquantized as the source stores them (the vision tower and
    # its projector): (HF name, shape, whether it is a linear layer's weight)
    carried: tuple[tuple[str, tuple[int, ...], bool], ...] = ()

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def all_layers(self) -> tuple[int, ...]:
        """Decoder layers, then multi-token-prediction layers (numbered on: ``num_layers + k``)."""
        return tuple(range(self.num_layers + self.mtp_layers))

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Layers with (softmax) self-attention: all but the linear-attention ones."""
        return tuple(i for i in self.all_layers if i not in set(self.linear_layers))

    @property
    def moe_layers(self) -> tuple[int, ...]:
        if not self.num_experts:
            return ()
        return tuple(i for i in self.all_layers if i not in set(self.dense_layers))

    @property
    def mlp_dense_layers(self) -> tuple[int, ...]:
        """Layers holding a dense MLP: all of a dense model, ``dense_layers`` of a MoE model."""
        return tuple(self.dense_layers) if self.num_experts else tuple(range(self.num_layers))


ALL_LAYERS = None


def dense_mlp_layers(d: Dims) -> tuple[int, ...]:
    return d.mlp_dense_layers


def moe_layers(d: Dims) -> tuple[int, ...]:
    return d.moe_layers


@dataclass(frozen=True)
class Part:
    """One component of a fused Megatron tensor: ``rows(d)`` rows per head group, held by HF tensor ``member``."""
    member: int
    rows: Callable[[Dims], int]


@dataclass(frozen=True)
class MemberLayout:
    """How one HF tensor of a fused rule lays out its parts (indices into ``FusedParts.parts``).

    grouped: rows per head group, each group holding its parts in turn (Qwen3-Next's ``in_proj_qkvz``: per key head
    [q, k, v, z]); otherwise each part over all groups, one part after the other (Qwen3.5's ``in_proj_qkv``:
    [q of every head; k; v]). chunks: a grouped member interleaves its parts in this many chunks per group
    (Qwen3-Next's gated ``q_proj``: per head [query; gate], so heads-per-group chunks); None for one chunk."""
    parts: tuple[int, ...]
    grouped: bool = True
    chunks: Callable[[Dims], int] | None = None


@dataclass(frozen=True)
class FusedParts:
    """The rows of a fused Megatron tensor, made of parts, each a number of rows per head group.

    Tensor parallelism keeps head groups whole: rank r holds groups ``[r * G / tp, (r + 1) * G / tp)`` of every
    part, ``G = groups(d)`` (``groups_name`` names it in errors). ``mcore_grouped``: Megatron's local rows are per
    group, each group holding its parts in turn (True); or each part over the local groups, one after the other
    (False: gated DeltaNet's ``in_proj`` [q; k; v; z; b; a] of the rank's heads). ``members``: one MemberLayout per
    HF tensor of the rule. A rank's rows of an HF tensor are one range when the member is grouped, else one range
    per part."""
    groups: Callable[[Dims], int]
    groups_name: str
    parts: tuple[Part, ...]
    members: tuple[MemberLayout, ...]
    mcore_grouped: bool = False


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it holds.

    mcore: accepted Megatron names (relative to ``decoder.layers.{j}.`` for LAYER and EXPERT scope; ``{x}`` is the
    local expert index for EXPERT scope). hf: HF names with ``{i}`` the global layer and ``{e}`` the global expert.
    shapes: the full HF shape of each hf name, from Dims. linear: the HF tensors are linear weights (FP8 candidates).
    layers: which layers the rule covers (None: every layer). dtype: the dtype it is written in when not quantized
    (None: the checkpoint's dtype). alt_shard: other sharding kinds megatron-core may build the same parameter with
    (MLA down-projections: column-parallel in the local spec, replicated under TransformerEngine); the Megatron
    module decides which one applies. parts: for fusion PARTS, the layout of the fused rows (FusedParts).
    as_stored: an unquantized HF tensor is written in the dtype the source checkpoint stores it in (an HF source's
    bytes carried over unchanged: the float32 ``A_log`` of a bf16 release stays float32); ``dtype`` then only says
    what the release stores (a seeded source is made in it, and a source that does not say writes it).
    """
    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    shapes: Callable[[Dims], tuple[tuple[int, ...], ...]]
    shard: str
    fusion: str = PLAIN
    linear: bool = False
    scope: str = LAYER
    layers: Callable[[Dims], tuple[int, ...]] | None = ALL_LAYERS
    dtype: str | None = None
    alt_shard: tuple[str, ...] = ()
    parts: FusedParts | None = None     # fusion PARTS: how the Megatron tensor holds the HF tensors
    as_stored: bool = False


def rule_layers(rule: Rule, d: Dims) -> tuple[int, ...]:
    """The global layers a LAYER / EXPERT rule covers."""
    return d.all_layers if rule.layers is None else tuple(rule.layers(d))


@dataclass(frozen=True)
class Arch:
    """Everything the exporter knows about one architecture family (one registered unit per file).

    model_types: HF ``model_type`` values it reads. dims: HF config -> Dims (unsupported variants refused by name).
    rules: Dims -> the Megatron <-> HF table. serving: HF linear leaf -> serving parallel style (column / row /
    replicated) as vLLM / SGLang shard it. fusion: leaf groups a server fuses into one module (all quantized or none).
    kv_leaves: column leaves whose heads a server replicates when tp >= num_key_value_heads. expert_leaves: linear
    leaves that exist only inside experts (Mixtral's w1 / w2 / w3). never_quantized: leaves
    that are not FP8 candidates (routers, gates). exclude: default modules_to_not_convert patterns (fnmatch on HF
    module names). mcore: Dims -> megatron-core TransformerConfig arguments beyond the common ones; gpt: Dims ->
    GPTModel arguments beyond the common ones. spec: Dims ->
    keyword arguments of the local layer spec (``get_gpt_layer_local_spec``); ``block_spec`` builds per-layer specs
    (dense and MoE layers). tiny: a small transformers config (tie_embeddings) for tests and the default export.
    presets: real shapes (name -> transformers config factory taking num_layers, 0 = as published). absent_same:
    config.json attributes whose absence the dims read as transformers' class does, beyond the ones every family
    shares (``hf_config_json.ABSENT_SAME``): such a config is read without importing transformers. also_reads:
    model_type values of checkpoints with this layout that transformers has no class for (their config.json names
    their own code in ``auto_map``; e.g. kimi_k2): read, not listed as supported types of their own.
    """
    model_types: tuple[str, ...]
    dims: Callable[[object], Dims]
    rules: Callable[[Dims], list[Rule]]
    serving: dict[str, str]
    fusion: tuple[tuple[str, ...], ...] = ()
    kv_leaves: tuple[str, ...] = ()
    never_quantized: tuple[str, ...] = ()
    expert_leaves: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("model.embed_tokens", "lm_head", "*norm*")
    mcore: Callable[[Dims], dict] = lambda d: {}
    gpt: Callable[[Dims], dict] = lambda d: {}
    spec: Callable[[Dims], dict] = lambda d: {}
    block_spec: bool = False
    tiny: dict[str, Callable[[bool], object]] = field(default_factory=dict)
    presets: dict[str, Callable[[int], object]] = field(default_factory=dict)
    absent_same: tuple[str, ...] = ()
    also_reads: tuple[str, ...] = ()


def hf_module(hf_name: str) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``."""
    return hf_name.rsplit(".", 1)[0]
