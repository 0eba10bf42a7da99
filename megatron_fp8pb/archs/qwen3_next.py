"""Qwen3-Next (``qwen3_next``) and Qwen3.5-MoE (``qwen3_5_moe_text``): gated DeltaNet linear attention in the layers
``layer_types`` marks ``linear_attention`` (3 of every 4), gated full attention in the others, MoE with a shared
expert and its sigmoid gate.

Linear-attention layers, as transformers saves them (key heads nk, value heads nv, r = nv / nk):
``linear_attn.in_proj_qkvz`` rows per key head g ``[q_g (dk); k_g (dk); v (r * dv); z (r * dv)]`` and
``in_proj_ba`` per key head ``[b (r); a (r)]`` (Qwen3-Next), or split (Qwen3.5): ``in_proj_qkv`` ``[q of every head;
k; v]``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``; ``conv1d`` [q; k; v channels, 1, kernel]; ``A_log`` and
``dt_bias`` [nv]; ``norm`` [dv] (the gated RMSNorm); ``out_proj``. Megatron's GatedDeltaNet holds one
``in_proj`` whose rows on each rank are ``[q; k; v; z; b; a]`` of the rank's heads, and ``conv1d`` ``[q; k; v]``.
Full-attention layers: ``q_proj`` rows per head ``[query; gate]``; Megatron's ``linear_qkv`` with
``attention_output_gate`` holds per query group ``[query heads; gate heads; k; v]``.

Servers refuse blockwise FP8 on the b/a projections (their rows are value heads, a few per rank): those stay in the
source dtype. A Megatron model of these families is megatron-core's GatedDeltaNet built with local modules
(``parallel/gdn_local.py``), which megatron-core builds only where flash-linear-attention imports; the export from
HF checkpoints (``source.kind=hf``) needs neither.
"""
from __future__ import annotations

from dataclasses import replace

from megatron_fp8pb.plan.fused_parts import full_rows
from . import common as c
from .base import (COLUMN, COLWISE, PARTS, REPLICATED, ROW, ROWWISE, Arch, Dims, FusedParts, MemberLayout, Part,
                   Rule)

LIN = "model.layers.{i}.linear_attn."
ATTN = c.ATTN


def _linear_layers(cfg) -> tuple[int, ...]:
    types = getattr(cfg, "layer_types", None)
    if types is None:
        every = int(getattr(cfg, "full_attention_interval", 4) or 4)
        types = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(cfg.num_hidden_layers)]
    unknown = sorted(set(types) - {"linear_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{cfg.model_type}: layer_types holds {unknown}; only linear_attention and full_attention "
                         f"layers are mapped")
    if len(types) != cfg.num_hidden_layers:
        raise ValueError(f"{cfg.model_type}: layer_types has {len(types)} entries for num_hidden_layers="
                         f"{cfg.num_hidden_layers}")
    return tuple(i for i, t in enumerate(types) if t == "linear_attention")


def _dense_layers(cfg) -> tuple[int, ...]:
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    only = set(getattr(cfg, "mlp_only_layers", None) or ())
    return tuple(i for i in range(cfg.num_hidden_layers) if i in only or (i + 1) % step)


def dims(cfg) -> Dims:
    mt = cfg.model_type
    if (cfg.num_experts or 0) < 1:
        raise ValueError(f"{mt}: num_experts={cfg.num_experts} must be >= 1")
    nk, nv = int(cfg.linear_num_key_heads), int(cfg.linear_num_value_heads)
    if nv % nk:
        raise ValueError(f"{mt}: linear_num_value_heads({nv}) % linear_num_key_heads({nk}) != 0; each key head must "
                         f"serve whole value heads")
    c.refuse(cfg, "attention_bias", "which this exporter does not map")
    d = c.gqa_dims(cfg, qk_norm=True)
    dense = _dense_layers(cfg)
    return replace(d, ffn_hidden=int(getattr(cfg, "intermediate_size", 0) or 0) if dense else 0,
                   num_experts=int(cfg.num_experts), moe_ffn_hidden=int(cfg.moe_intermediate_size),
                   moe_top_k=int(cfg.num_experts_per_tok),
                   shared_expert_ffn=int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0),
                   shared_expert_gate=bool(getattr(cfg, "shared_expert_intermediate_size", 0)),
                   dense_layers=dense, linear_layers=_linear_layers(cfg), lin_k_heads=nk, lin_v_heads=nv,
                   lin_k_dim=int(cfg.linear_key_head_dim), lin_v_dim=int(cfg.linear_value_head_dim),
                   lin_conv=int(cfg.linear_conv_kernel_dim), lin_split=mt != "qwen3_next", attn_gate=True,
                   partial_rotary=c.partial_rotary(cfg))


def _r(d: Dims) -> int:
    return d.lin_v_heads // d.lin_k_heads


def _linear(d: Dims) -> tuple[int, ...]:
    return d.linear_layers


def _attention(d: Dims) -> tuple[int, ...]:
    return d.attention_layers


# Megatron's in_proj rows of one rank: [q; k; v; z; b; a] of its key-head groups
_IN_PARTS = (Part(0, lambda d: d.lin_k_dim), Part(0, lambda d: d.lin_k_dim), Part(0, lambda d: _r(d) * d.lin_v_dim),
             Part(0, lambda d: _r(d) * d.lin_v_dim), Part(1, lambda d: _r(d)), Part(1, lambda d: _r(d)))


def _in_proj(split: bool) -> FusedParts:
    if not split:   # in_proj_qkvz, in_proj_ba: per key head
        return FusedParts(lambda d: d.lin_k_heads, "linear_num_key_heads", _IN_PARTS,
                          (MemberLayout((0, 1, 2, 3)), MemberLayout((4, 5))))
    parts = tuple(replace(p, member=m) for p, m in zip(_IN_PARTS, (0, 0, 0, 1, 2, 3)))
    return FusedParts(lambda d: d.lin_k_heads, "linear_num_key_heads", parts,
                      (MemberLayout((0, 1, 2), grouped=False), MemberLayout((3,)), MemberLayout((4,)),
                       MemberLayout((5,))))


_CONV = FusedParts(lambda d: d.lin_k_heads, "linear_num_key_heads",
                   (Part(0, lambda d: d.lin_k_dim), Part(0, lambda d: d.lin_k_dim),
                    Part(0, lambda d: _r(d) * d.lin_v_dim)), (MemberLayout((0, 1, 2), grouped=False),))


def _value_dim(d: Dims) -> int:
    return d.lin_v_heads * d.lin_v_dim


def mcore(d: Dims) -> dict:
    """megatron-core arguments: GatedDeltaNet in the linear-attention layers, gated full attention in the others."""
    linear = set(d.linear_layers)
    return dict(experimental_attention_variant="gated_delta_net",
                linear_attention_freq=[1 if i in linear else 0 for i in range(d.num_layers)],
                linear_conv_kernel_dim=d.lin_conv, linear_key_head_dim=d.lin_k_dim, linear_value_head_dim=d.lin_v_dim,
                linear_num_key_heads=d.lin_k_heads, linear_num_value_heads=d.lin_v_heads, attention_output_gate=True)


def _rows_by(fp: FusedParts, *rest):
    """The full HF shapes of a fused rule: each member's rows (from ``fp``), then ``rest(d)``."""
    return lambda d: tuple((n, *(r(d) for r in rest)) for n in full_rows(fp, d))


def linear_attention_rules(d: Dims) -> list[Rule]:
    leaves = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a") if d.lin_split else ("in_proj_qkvz", "in_proj_ba")
    in_proj = _in_proj(d.lin_split)
    return [
        Rule(("self_attention.in_proj.weight",), tuple(LIN + x + ".weight" for x in leaves),
             _rows_by(in_proj, lambda d: d.hidden), COLWISE, PARTS, linear=True, layers=_linear, parts=in_proj,
             as_stored=True),
        Rule(("self_attention.conv1d.weight",), (LIN + "conv1d.weight",),
             _rows_by(_CONV, lambda d: 1, lambda d: d.lin_conv), COLWISE, PARTS, layers=_linear, parts=_CONV,
             as_stored=True),
        Rule(("self_attention.A_log",), (LIN + "A_log",), lambda d: ((d.lin_v_heads,),), COLWISE, layers=_linear,
             dtype="float32", as_stored=True),
        Rule(("self_attention.dt_bias",), (LIN + "dt_bias",), lambda d: ((d.lin_v_heads,),), COLWISE,
             layers=_linear, as_stored=True),
        Rule(("self_attention.out_norm.weight",), (LIN + "norm.weight",), lambda d: ((d.lin_v_dim,),), REPLICATED,
             layers=_linear, as_stored=True),
        Rule(("self_attention.out_proj.weight",), (LIN + "out_proj.weight",),
             lambda d: ((d.hidden, _value_dim(d)),), ROWWISE, linear=True, layers=_linear),
    ]


def _hpg(d: Dims) -> int:
    return d.heads_per_group


# linear_qkv with attention_output_gate, per query group: [query heads; gate heads; k; v]
GATED_QKV = FusedParts(lambda d: d.num_query_groups, "num_query_groups",
                       (Part(0, lambda d: _hpg(d) * d.head_dim), Part(0, lambda d: _hpg(d) * d.head_dim),
                        Part(1, lambda d: d.head_dim), Part(2, lambda d: d.head_dim)),
                       (MemberLayout((0, 1), chunks=_hpg), MemberLayout((2,)), MemberLayout((3,))),
                       mcore_grouped=True)


def gated_attention_rules(d: Dims, layers=_attention) -> list[Rule]:
    """Full attention whose q_proj holds [query; gate] rows per head (Qwen3-Next, Qwen3.5), with q/k norms."""
    return [
        Rule(("self_attention.linear_qkv.weight",), (ATTN + "q_proj.weight", ATTN + "k_proj.weight",
                                                      ATTN + "v_proj.weight"),
             _rows_by(GATED_QKV, lambda d: d.hidden), COLWISE, PARTS, linear=True, layers=layers, parts=GATED_QKV),
        Rule(("self_attention.linear_proj.weight",), (ATTN + "o_proj.weight",),
             lambda d: ((d.hidden, d.num_heads * d.head_dim),), ROWWISE, linear=True, layers=layers),
        Rule(("self_attention.q_layernorm.weight",), (ATTN + "q_norm.weight",), lambda d: ((d.head_dim,),),
             REPLICATED, layers=layers),
        Rule(("self_attention.k_layernorm.weight",), (ATTN + "k_norm.weight",), lambda d: ((d.head_dim,),),
             REPLICATED, layers=layers),
    ]


def rules(d: Dims) -> list[Rule]:
    return c.embedding_rules() + \
        [c.input_norm_rule("self_attention.linear_qkv.layer_norm_weight",
                           "self_attention.in_proj.layer_norm_weight")] + \
        linear_attention_rules(d) + gated_attention_rules(d) + [c.post_attention_norm_rule()] + \
        c.dense_mlp_rules() + c.moe_rules(shared="shared_expert.", shared_gate="shared_expert_gate") + \
        c.final_rules(d)


SERVING = {**c.GQA_SERVING, **c.MLP_SERVING, "in_proj_qkvz": COLUMN, "in_proj_qkv": COLUMN, "in_proj_z": COLUMN,
           "out_proj": ROW}
KEPT_LEAVES = ("in_proj_ba", "in_proj_b", "in_proj_a", "gate", "shared_expert_gate")
EXCLUDE = ("model.embed_tokens", "lm_head", "*norm*", "*.mlp.gate", "*.shared_expert_gate", "*.in_proj_ba",
           "*.in_proj_a", "*.in_proj_b")


def _tiny_kw(**kw) -> dict:
    """hidden 320, 4 layers (3 linear-attention, 1 full), key heads 2 x 64, value heads 4 x 80 (value rows 320,
    160 per rank at tp 2), attention heads 4 x 80 with 2 kv heads, 4 experts of 160, a shared expert of 160."""
    return {**dict(vocab_size=1003, hidden_size=320, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=80, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=160,
                   shared_expert_intermediate_size=160, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=64, linear_value_head_dim=80, linear_conv_kernel_dim=4,
                   max_position_embeddings=256), **kw}


def _qwen3_next(tie: bool = False, **kw):
    import transformers as tf
    return tf.Qwen3NextConfig(**_tiny_kw(**{"intermediate_size": 640, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                            "tie_word_embeddings": tie, **kw}))


def _qwen3_5_moe(tie: bool = False, **kw):
    import transformers as tf
    return tf.Qwen3_5MoeTextConfig(**_tiny_kw(tie_word_embeddings=tie, **kw))


def _preset(cls_name: str, **shape):
    """A preset's config factory: the published ``shape``, ``num_layers`` layers when > 0."""
    def make(num_layers: int = 0):
        import transformers as tf
        kw = {**shape, "tie_word_embeddings": False, "max_position_embeddings": 8192}
        if num_layers:
            kw["num_hidden_layers"] = num_layers
        return getattr(tf, cls_name)(**kw)
    return make


_NEXT_80B = dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=16,
                 num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
                 moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
                 linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                 linear_value_head_dim=128, linear_conv_kernel_dim=4, decoder_sparse_step=1, mlp_only_layers=[])
_QWEN35_397B = dict(vocab_size=248320, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                    num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
                    moe_intermediate_size=1024, shared_expert_intermediate_size=1024, linear_num_key_heads=16,
                    linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
                    linear_conv_kernel_dim=4)

_common = dict(dims=dims, rules=rules, serving=SERVING,
               fusion=(*c.GQA_FUSION, ("in_proj_qkv", "in_proj_z"), ("in_proj_b", "in_proj_a")),
               kv_leaves=("k_proj", "v_proj"), never_quantized=KEPT_LEAVES, exclude=EXCLUDE, block_spec=True,
               mcore=mcore, gpt=lambda d: {"rotary_percent": d.partial_rotary})
QWEN3_NEXT = Arch(model_types=("qwen3_next",), tiny={"qwen3_next": _qwen3_next},
                  presets={"qwen3-next-80b-a3b": _preset("Qwen3NextConfig", **_NEXT_80B)}, **_common)
QWEN3_5_MOE = Arch(model_types=("qwen3_5_moe_text",),
                   absent_same=("decoder_sparse_step", "intermediate_size", "mlp_only_layers"),
                   tiny={"qwen3_5_moe_text": _qwen3_5_moe},
                   presets={"qwen3.5-397b-a17b": _preset("Qwen3_5MoeTextConfig", **_QWEN35_397B)}, **_common)
UNITS = (QWEN3_NEXT, QWEN3_5_MOE)
