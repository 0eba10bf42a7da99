"""Seeded fuzzing: random small models of every registered architecture (dense; and mixture-of-experts with expert
parallel / expert tensor parallel layouts) against the single-process reference.

CI runs FP8PB_FUZZ_CASES (default 2) cases; run more on demand, e.g. FP8PB_FUZZ_CASES=30 FP8PB_FUZZ_SEED=7. The
module's exports run in one torchrun launch (tests/jobs.py), each on a process group of its own world size.
"""
import os
import random

import pytest
import transformers as tf

from helpers import mismatches
from jobs import Job

CASES = int(os.environ.get("FP8PB_FUZZ_CASES", "2"))
SEED = int(os.environ.get("FP8PB_FUZZ_SEED", "2026"))
DENSE_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
MOE_ARCHS = ("deepseek_v3", "glm4_moe", "qwen3_moe", "qwen2_moe", "mixtral")
ARCHS_2026 = ("deepseek_v32", "glm_moe_dsa", "qwen3_next", "qwen3_5_moe_text", "minimax_m2")
VLM_2026 = ("qwen3_5_moe",)     # drawn as a wrapper of a qwen3_5_moe_text case (the other cases stay as they were)


def random_case(rng: random.Random):
    arch = rng.choice(DENSE_ARCHS)
    kv = rng.choice([1, 2, 4])
    heads = kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([32, 64, 80, 96])
    layers = rng.choice([1, 2, 3, 4])
    tp = rng.choice([t for t in (1, 2, 4) if kv % t == 0 and heads % t == 0])
    pp = rng.choice([p for p in (1, 2, 4) if layers % p == 0 and tp * p <= 4])
    ffn = 16 * tp * rng.randint(4, 60)
    hidden = rng.choice([h for h in (128, 192, 320, 448, 576) if h % heads == 0] or [heads * 32])
    kw = dict(vocab_size=rng.randint(300, 2100), hidden_size=hidden, intermediate_size=ffn,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              tie_word_embeddings=rng.random() < 0.5, max_position_embeddings=256)
    if arch == "qwen2":     # head_dim = hidden / heads
        cfg = tf.Qwen2Config(**kw)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config}[arch]
        cfg = cls(head_dim=head_dim, **kw)
    return cfg, tp, pp


def random_moe_case(rng: random.Random):
    """A mixture-of-experts model of any registered family (DeepSeek-V3 with multi-latent attention, GLM-4-MoE with
    dense first layers, Qwen3-MoE, Qwen2-MoE with a shared expert, Mixtral), experts split along ep / etp."""
    arch = rng.choice(MOE_ARCHS)
    layers = rng.choice([2, 3, 4])
    tp = rng.choice([1, 2])
    pp = rng.choice([p for p in (1, 2) if layers % p == 0])
    ep, etp = rng.choice([(1, 1), (2, 1), (1, 2)] if tp == 2 else [(1, 1), (2, 1)] if pp == 1 else [(1, 1)])
    heads = rng.choice([2, 4])
    hidden = rng.choice([192, 320, 448])
    moe_ffn = 16 * etp * rng.randint(4, 20)
    kw = dict(vocab_size=rng.randint(300, 2100), hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_experts_per_tok=2, max_position_embeddings=256,
              tie_word_embeddings=rng.random() < 0.3)
    kv = rng.choice([k for k in (1, 2) if k % tp == 0 and heads % k == 0])
    if arch in ("deepseek_v3", "glm4_moe"):
        kw.update(intermediate_size=16 * tp * rng.randint(4, 40), moe_intermediate_size=moe_ffn, n_routed_experts=4,
                  n_shared_experts=rng.choice([0, 1]), n_group=1, topk_group=1,
                  first_k_dense_replace=rng.choice([0, 1]), tie_word_embeddings=False)
    if arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(num_key_value_heads=heads, q_lora_rank=rng.choice([None, 32 * rng.randint(2, 6)]),
                                  kv_lora_rank=32 * rng.randint(2, 6), qk_rope_head_dim=rng.choice([32, 64]),
                                  qk_nope_head_dim=rng.choice([32, 64]), v_head_dim=rng.choice([32, 64]),
                                  rope_scaling=None, **kw)
    elif arch == "glm4_moe":
        cfg = tf.Glm4MoeConfig(num_key_value_heads=kv, head_dim=rng.choice([64, 80]),
                               attention_bias=rng.random() < 0.5, use_qk_norm=rng.random() < 0.5, **kw)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(num_key_value_heads=kv, head_dim=rng.choice([64, 80]), num_experts=4,
                                moe_intermediate_size=moe_ffn, intermediate_size=16 * tp * rng.randint(4, 40),
                                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=rng.random() < 0.5, **kw)
    elif arch == "qwen2_moe":     # head_dim = hidden / heads; the shared expert is split along tp
        cfg = tf.Qwen2MoeConfig(num_key_value_heads=kv, num_experts=4, moe_intermediate_size=moe_ffn,
                                shared_expert_intermediate_size=16 * tp * rng.randint(4, 20),
                                intermediate_size=16 * tp * rng.randint(4, 40), decoder_sparse_step=1,
                                mlp_only_layers=[], norm_topk_prob=rng.random() < 0.5, **kw)
    else:
        cfg = tf.MixtralConfig(num_key_value_heads=kv, head_dim=rng.choice([64, 80]), num_local_experts=4,
                               intermediate_size=moe_ffn, **kw)
    return cfg, tp, pp, ep, etp


def random_2026_case(rng: random.Random):
    """A model of a 2026 family: DeepSeek-V3.2 / GLM-5 (indexer heads and dims, GLM-5's shared indexers), Qwen3-Next
    / Qwen3.5 (key and value heads, their dims, which layers are linear attention), MiniMax-M2 (full-width q/k
    norms); ragged dims, split along tp / pp / ep / etp."""
    arch = rng.choice(ARCHS_2026)
    layers = rng.choice([2, 4])
    tp = rng.choice([1, 2])
    pp = rng.choice([1, 2])
    ep, etp = rng.choice([(1, 1), (2, 1), (1, 2)] if tp == 2 else [(1, 1), (2, 1)] if pp == 1 else [(1, 1)])
    hidden = rng.choice([192, 320, 448])
    kw = dict(vocab_size=rng.randint(300, 2100), hidden_size=hidden, num_hidden_layers=layers,
              num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=rng.random() < 0.3)
    moe_ffn = 16 * etp * rng.randint(4, 20)
    if arch in ("deepseek_v32", "glm_moe_dsa"):
        heads = rng.choice([2, 4])
        kw.update(num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=16 * tp * rng.randint(4, 40),
                  moe_intermediate_size=moe_ffn, n_routed_experts=4, n_shared_experts=rng.choice([0, 1]), n_group=1,
                  topk_group=1, first_k_dense_replace=rng.choice([0, 1]), q_lora_rank=32 * rng.randint(2, 6),
                  kv_lora_rank=32 * rng.randint(2, 6), qk_rope_head_dim=rng.choice([32, 64]),
                  qk_nope_head_dim=rng.choice([32, 64]), v_head_dim=rng.choice([32, 64]),
                  index_n_heads=rng.choice([2, 4, 6]), index_head_dim=rng.choice([32, 64, 80]), index_topk=8,
                  rope_scaling=None, num_nextn_predict_layers=0, tie_word_embeddings=False)
        if arch == "deepseek_v32":
            return tf.DeepseekV32Config(**kw), tp, pp, ep, etp
        types = ["full"] + [rng.choice(["full", "shared"]) for _ in range(layers - 1)]
        return tf.GlmMoeDsaConfig(indexer_types=types, **kw), tp, pp, ep, etp
    kv = rng.choice([k for k in (1, 2) if k % tp == 0])
    kw.update(num_attention_heads=kv * rng.choice([1, 2]), num_key_value_heads=kv, head_dim=rng.choice([64, 80]))
    if arch == "minimax_m2":
        return tf.MiniMaxM2Config(num_local_experts=4, intermediate_size=moe_ffn, **kw), tp, pp, ep, etp
    nk = rng.choice([k for k in (1, 2, 4) if k % tp == 0])
    types = [rng.choice(["linear_attention", "full_attention"]) for _ in range(layers)]
    types[rng.randrange(layers)] = "linear_attention"
    kw.update(num_experts=4, moe_intermediate_size=moe_ffn, shared_expert_intermediate_size=16 * tp * rng.randint(4, 20),
              linear_num_key_heads=nk, linear_num_value_heads=nk * rng.choice([1, 2, 3]),
              linear_key_head_dim=rng.choice([32, 64]), linear_value_head_dim=rng.choice([48, 80]),
              linear_conv_kernel_dim=4, layer_types=types)
    if arch == "qwen3_next":
        return tf.Qwen3NextConfig(intermediate_size=16 * tp * rng.randint(4, 40), decoder_sparse_step=1,
                                  mlp_only_layers=[], **kw), tp, pp, ep, etp
    text = tf.Qwen3_5MoeTextConfig(**kw)
    if rng.random() < 0.5:      # drawn last: the text model's draws are those of the text-only case
        return _vlm(rng, text), tp, pp, ep, etp
    return text, tp, pp, ep, etp


def _vlm(rng: random.Random, text):
    """Qwen3.5-MoE's vision-language checkpoint around ``text``: a vision tower of ragged width and depth."""
    heads = rng.choice([1, 2, 3])
    vision = dict(depth=rng.choice([1, 2]), hidden_size=heads * rng.choice([32, 48]), num_heads=heads,
                  intermediate_size=16 * rng.randint(3, 20), out_hidden_size=text.hidden_size, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16, in_channels=3)
    return tf.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision,
                               tie_word_embeddings=text.tie_word_embeddings)


def test_fuzz_space_covers_every_registered_architecture():
    from megatron_fp8pb.archs import supported
    assert sorted(DENSE_ARCHS + MOE_ARCHS + ARCHS_2026 + VLM_2026) == sorted(supported())
    rng = random.Random(SEED)
    new = [random_2026_case(rng) for _ in range(200)]
    assert {c[0].model_type for c in new} == set(ARCHS_2026 + VLM_2026)
    assert {(tp, pp, ep, etp) for _, tp, pp, ep, etp in new} >= {(2, 1, 2, 1), (1, 2, 1, 1), (2, 2, 1, 1)}
    moe = [random_moe_case(rng) for _ in range(200)]
    assert {c[0].model_type for c in moe} == set(MOE_ARCHS)
    assert {(ep, etp) for _, _, _, ep, etp in moe} == {(1, 1), (2, 1), (1, 2)}
    assert {random_case(rng)[0].model_type for _ in range(100)} == set(DENSE_ARCHS)


def moe_job(case: int, make=random_moe_case, stream: int = 500) -> tuple[Job, str]:
    """The export of MoE fuzz case ``case`` (drawn by ``make`` from seed stream ``stream``) and its description."""
    cfg, tp, pp, ep, etp = make(random.Random(SEED * 1000 + stream + case))
    args = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.etp={etp}",
            "output.max_shard_size=300KB", "output.verify=false"]
    desc = f"case {case}: {cfg.model_type} {cfg.to_diff_dict()} tp={tp} pp={pp} ep={ep} etp={etp}"
    return Job(pp * max(tp, ep * etp), args, cfg, seed=case), desc     # ep > tp: the dense part has dp replicas


def dense_job(case: int) -> tuple[Job, str, bool]:
    """The export of dense fuzz case ``case``, its description, and whether it quantizes lm_head."""
    rng = random.Random(SEED * 1000 + case)
    cfg, tp, pp = random_case(rng)
    args = [f"parallel.tp={tp}", f"parallel.pp={pp}", "output.max_shard_size=300KB", "output.verify=false"]
    lm_head = rng.random() < 0.3
    if lm_head:
        args.append("quant.lm_head=true")
    desc = f"case {case}: {cfg.model_type} {cfg.to_diff_dict()} tp={tp} pp={pp} {args[-1]}"
    return Job(tp * pp, args, cfg, seed=case), desc, lm_head


MOE = {f"test_fuzz_moe_layouts[{case}]": moe_job(case) for case in range(CASES)}
NEW = {f"test_fuzz_2026_layouts[{case}]": moe_job(case, random_2026_case, 800) for case in range(CASES)}
DENSE = {f"test_fuzz_layouts[{case}]": dense_job(case) for case in range(CASES)}


JOBS = {k: v[0] for k, v in {**MOE, **DENSE, **NEW}.items()}


@pytest.mark.parametrize("case", range(CASES))
def test_fuzz_2026_layouts(exports, request, case):
    r = exports[request.node.name]
    _, desc = NEW[request.node.name]
    assert r.returncode == 0, desc + "\n" + r.stderr[-3000:]
    assert mismatches(r.out, r.state) == [], desc


@pytest.mark.parametrize("case", range(CASES))
def test_fuzz_moe_layouts(exports, request, case):
    r = exports[request.node.name]
    _, desc = MOE[request.node.name]
    assert r.returncode == 0, desc + "\n" + r.stderr[-3000:]
    assert mismatches(r.out, r.state) == [], desc


@pytest.mark.parametrize("case", range(CASES))
def test_fuzz_layouts(exports, request, case):
    r = exports[request.node.name]
    job, desc, lm_head = DENSE[request.node.name]
    assert r.returncode == 0, desc + "\n" + r.stderr[-3000:]
    if lm_head and job.cfg.tie_word_embeddings:
        r.state["lm_head.weight"] = r.state["model.embed_tokens.weight"]
    assert mismatches(r.out, r.state) == [], desc
