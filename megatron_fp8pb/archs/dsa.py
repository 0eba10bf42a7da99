"""DeepSeek-V3.2 (``deepseek_v32``) and GLM-5 (``glm_moe_dsa``): DeepSeek-V3's multi-latent attention and MoE plus
the sparse-attention indexer of DeepSeek sparse attention (DSA) in each layer that computes its own top-k.

The indexer, as transformers saves it: ``self_attn.indexer.wq_b`` [index_n_heads * index_head_dim, q_lora_rank]
and ``wk`` [index_head_dim, hidden] (FP8 in the releases), ``k_norm.weight`` / ``.bias`` (a LayerNorm over
index_head_dim) and ``weights_proj`` [index_n_heads, hidden] (kept in the source dtype: vLLM fuses it with ``wk``
into one bf16 weight). Megatron's DSAIndexer (``self_attention.core_attention.indexer``) builds all of them
replicated (``parallel_mode="duplicated"``): each is quantized whole on the rank that exports it.

GLM-5's ``indexer_types`` marks each layer ``full`` (it has an indexer) or ``shared`` (it reuses the previous full
layer's top-k and holds no indexer tensors). DeepSeek-V3.2's release uses power-of-two scales: export it with
``quant.scale_fmt=ue8m0``.
"""
from __future__ import annotations

from dataclasses import replace

from . import common as c
from .base import WHOLE, REPLICATED, Arch, Dims, Rule
from .deepseek import DEEPSEEK_V3, dims as deepseek_dims, mcore as deepseek_mcore, mla_rules

INDEXER = "model.layers.{i}.self_attn.indexer."
MC = "self_attention.core_attention.indexer."


def _indexer_layers(cfg, d: Dims) -> tuple[int, ...]:
    types = getattr(cfg, "indexer_types", None)
    if not types:
        return d.all_layers
    if len(types) != cfg.num_hidden_layers:
        raise ValueError(f"{cfg.model_type}: indexer_types has {len(types)} entries for num_hidden_layers="
                         f"{cfg.num_hidden_layers}")
    unknown = sorted(set(types) - {"full", "shared"})
    if unknown:
        raise ValueError(f"{cfg.model_type}: indexer_types holds {unknown}; only 'full' and 'shared' are mapped")
    # multi-token-prediction layers compute their own top-k
    return tuple(i for i, t in enumerate(types) if t == "full") + \
        tuple(range(d.num_layers, d.num_layers + d.mtp_layers))


def _dense_layers(cfg, d: Dims) -> tuple[int, ...]:
    types = getattr(cfg, "mlp_layer_types", None)
    if not types:
        return d.dense_layers
    unknown = sorted(set(types) - {"dense", "sparse"})
    if unknown:
        raise ValueError(f"{cfg.model_type}: mlp_layer_types holds {unknown}; only 'dense' and 'sparse' are mapped")
    return tuple(i for i, t in enumerate(types) if t == "dense")


def dims(cfg) -> Dims:
    d = deepseek_dims(cfg)
    if not d.q_lora_rank:
        raise ValueError(f"{cfg.model_type}: q_lora_rank={cfg.q_lora_rank}: the indexer's wq_b reads the query "
                         f"latent, so q_lora_rank must be set")
    d = replace(d, model_type=cfg.model_type, dense_layers=_dense_layers(cfg, d),
                index_heads=int(cfg.index_n_heads), index_head_dim=int(cfg.index_head_dim),
                index_topk=int(cfg.index_topk))
    return replace(d, indexer_layers=_indexer_layers(cfg, d))


def indexer_rules() -> list[Rule]:
    layers = lambda d: d.indexer_layers  # noqa: E731
    return [
        Rule((MC + "linear_wq_b.weight",), (INDEXER + "wq_b.weight",),
             lambda d: ((d.index_heads * d.index_head_dim, d.q_lora_rank),), REPLICATED, linear=True, layers=layers),
        Rule((MC + "linear_wk.weight",), (INDEXER + "wk.weight",), lambda d: ((d.index_head_dim, d.hidden),),
             REPLICATED, linear=True, layers=layers),
        Rule((MC + "k_norm.weight",), (INDEXER + "k_norm.weight",), lambda d: ((d.index_head_dim,),), REPLICATED,
             layers=layers, as_stored=True),
        Rule((MC + "k_norm.bias",), (INDEXER + "k_norm.bias",), lambda d: ((d.index_head_dim,),), REPLICATED,
             layers=layers, as_stored=True),
        Rule((MC + "linear_weights_proj.weight",), (INDEXER + "weights_proj.weight",),
             lambda d: ((d.index_heads, d.hidden),), REPLICATED, linear=True, layers=layers, as_stored=True),
    ]


def rules(d: Dims) -> list[Rule]:
    return c.embedding_rules() + mla_rules(d) + indexer_rules() + [c.post_attention_norm_rule()] + \
        c.dense_mlp_rules() + c.moe_rules(shared="shared_experts.") + c.final_rules(d) + c.mtp_rules(d)


def mcore(d: Dims) -> dict:
    """megatron-core arguments: the indexer's heads and top-k; from megatron-core 0.19 on (which rotates the first
    rope dims of each indexer head, as DeepSeek's reference does) also the indexer rope's pairing: GLM-5's is
    interleaved, DeepSeek-V3.2's half-split. megatron-core 0.16 rotates the last dims, interleaved, with no switch."""
    from megatron.core.transformer import TransformerConfig
    kw = dict(deepseek_mcore(d), experimental_attention_variant="dsa", dsa_indexer_n_heads=d.index_heads,
              dsa_indexer_head_dim=d.index_head_dim, dsa_indexer_topk=d.index_topk)
    if "dsa_indexer_rope_interleaved" in TransformerConfig.__dataclass_fields__:
        kw["dsa_indexer_rope_interleaved"] = d.model_type == "glm_moe_dsa"
    return kw


def _tiny_kw(**kw) -> dict:
    """A small DSA config: 2 layers (layer 0 dense, layer 1 MoE; GLM-5's: 4, two dense, every second one's indexer
    shared), hidden 320, q latent 96, kv latent 128 (+ 64 rope rows: 192), indexer 4 heads of 80 (wq_b 320 rows),
    dense ffn 640, experts and shared expert of 160."""
    return {**dict(vocab_size=1003, hidden_size=320, intermediate_size=640, moe_intermediate_size=160,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                q_lora_rank=96, kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                index_n_heads=4, index_head_dim=80, index_topk=16, max_position_embeddings=256), **kw}


def _v32(tie: bool = False, **kw):
    import transformers as tf
    return tf.DeepseekV32Config(**_tiny_kw(tie_word_embeddings=tie, num_nextn_predict_layers=0, **kw))


def _glm5(tie: bool = False, **kw):
    import transformers as tf
    kw.setdefault("num_hidden_layers", 4)
    kw.setdefault("first_k_dense_replace", 2)
    n = kw["num_hidden_layers"]
    kw.setdefault("indexer_types", ["full", "shared"] * (n // 2) + ["full"] * (n % 2))
    return tf.GlmMoeDsaConfig(**_tiny_kw(tie_word_embeddings=tie, num_nextn_predict_layers=0, **kw))


def _preset(cls_name: str, **shape):
    def make(num_layers: int = 0):
        import transformers as tf
        kw = dict(shape, max_position_embeddings=8192, tie_word_embeddings=False, rope_scaling=None,
                  num_nextn_predict_layers=0)
        if num_layers:
            kw["num_hidden_layers"] = num_layers
            if "indexer_types" in kw:
                kw["indexer_types"] = kw["indexer_types"][:num_layers]
        return getattr(tf, cls_name)(**kw)
    return make


_V32 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
            n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
            q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
            routed_scaling_factor=2.5, norm_topk_prob=True, index_n_heads=64, index_head_dim=128, index_topk=2048)
# GLM-5: 78 layers, 3 dense, every fourth layer's indexer shared with the one before (a published-shape guess of
# the pattern; a real config.json names its own indexer_types)
_GLM5 = dict(vocab_size=154880, hidden_size=6144, intermediate_size=12288, moe_intermediate_size=2048,
             num_hidden_layers=78, num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1,
             n_routed_experts=256, num_experts_per_tok=8, n_group=1, topk_group=1, first_k_dense_replace=3,
             q_lora_rank=2048, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=192, v_head_dim=256,
             routed_scaling_factor=2.5, norm_topk_prob=True, index_n_heads=32, index_head_dim=128, index_topk=2048,
             indexer_types=["shared" if i % 4 == 3 else "full" for i in range(78)])

_common = dict(dims=dims, rules=rules,
               serving={**DEEPSEEK_V3.serving, "wq_b": WHOLE, "wk": WHOLE},
               fusion=DEEPSEEK_V3.fusion, never_quantized=("gate", "weights_proj"),
               exclude=DEEPSEEK_V3.exclude + ("*.indexer.weights_proj",), mcore=mcore, block_spec=True,
               absent_same=("moe_layer_freq", "head_dim", "indexer_types"))
DEEPSEEK_V32 = Arch(model_types=("deepseek_v32",), tiny={"deepseek_v32": _v32},
                    presets={"deepseek-v3.2": _preset("DeepseekV32Config", **_V32)}, **_common)
GLM_MOE_DSA = Arch(model_types=("glm_moe_dsa",), tiny={"glm_moe_dsa": _glm5},
                   presets={"glm-5": _preset("GlmMoeDsaConfig", **_GLM5)}, **_common)
UNITS = (DEEPSEEK_V32, GLM_MOE_DSA)
