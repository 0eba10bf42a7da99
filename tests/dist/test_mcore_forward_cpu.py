"""The megatron-core model built from an HF checkpoint computes the HF model's logits, on the CPU in float32: proves
the name and row mapping of multi-latent attention (q_proj and q_a/q_b variants), the dense/MoE layer split, shared
experts, the sigmoid router with its expert bias, GLM-4-MoE's partial rotary, q/k/v biases and q/k norms, and
MiniMax-M2's full-width q/k norms (``FullWidthRMSNorm``; at tp=2 their statistic is all-reduced over the two ranks'
heads, and the vocabulary shards of the logits gathered). The MLA core attention is the exporter's stand-in
(``mcore.MLACoreAttention``).

The 2026 families, with the stand-ins of ``tests/forward_standins.py`` (each computes what a missing kernel does):
- DeepSeek-V3.2 and GLM-5 with ``index_topk`` >= the 16 tokens: every key is chosen, so the sparse attention is
  dense and the logits prove MLA, MoE and the dense/sparse layer split of the DSA models, not the indexer's
  weights (no score changes the choice). With ``index_topk`` 4 < 16 the logits depend on which keys the indexer
  picks: that case proves the indexer's wq_b, wk, k_norm and weights_proj mapping, with megatron-core 0.19's
  indexer rope layout stood in on 0.16 (GLM-5 with every layer's indexer its own: the exporter builds GLM-5's
  shared layers with dense attention, which equals transformers' only where top-k covers the sequence).
- Qwen3-Next and Qwen3.5-MoE: the fused in_proj rows [q; k; v; z; b; a] per key-head group, conv1d channels, A_log,
  dt_bias, the gated output norm, gated full attention ([query; gate] per head in q_proj), partial rotary, the
  shared expert and its gate, with megatron-core's own torch gated-delta rule and zero-centered norms.
"""
import re

import pytest

from helpers import torchrun, write_hf_source
from megatron_fp8pb.sources.tiny import tiny_hf_config


def _with(arch: str, **kw):
    def make():
        cfg = tiny_hf_config(arch)
        for key, value in kw.items():
            setattr(cfg, key, value)
        return cfg
    return make


def _minimax_m2():
    """Half-rotary heads (``rotary_dim`` 40 of 80, as the release turns 64 of 128)."""
    from megatron_fp8pb.archs import arch
    return arch("minimax_m2").tiny["minimax_m2"](False, rotary_dim=40)


def _gdn_reason() -> str | None:
    from megatron_fp8pb.parallel.gdn_local import fla_missing
    return fla_missing()


CASES = {"deepseek_v3": _with("deepseek_v3"), "deepseek_v3_q_lora": _with("deepseek_v3", q_lora_rank=96),
         "glm4_moe": _with("glm4_moe"),
         "deepseek_v32_dense_topk": _with("deepseek_v32", index_topk=16),
         "deepseek_v32_sparse_topk": _with("deepseek_v32", index_topk=4),
         "glm_moe_dsa_dense_topk": _with("glm_moe_dsa", index_topk=16),
         "glm_moe_dsa_sparse_topk": _with("glm_moe_dsa", index_topk=4, indexer_types=["full"] * 4),
         "qwen3_next": _with("qwen3_next"), "qwen3_5_moe_text": _with("qwen3_5_moe_text"),
         "minimax_m2": _minimax_m2, "minimax_m2_tp2": _minimax_m2}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_equal_hf_on_cpu(tmp_path, case):
    if case.startswith("qwen3") and _gdn_reason():
        pytest.skip(f"megatron-core builds GatedDeltaNet only with flash-linear-attention: {_gdn_reason()}")
    src = tmp_path / "src"
    write_hf_source(src, CASES[case]())
    tp = 2 if case.endswith("_tp2") else 1
    r = torchrun(tp, [str(src), str(tp)], script="tests/dist/forward_worker.py")
    m = re.search(r"FORWARD rel_err=(\S+) top1=(\S+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout[-2000:] + r.stderr[-3000:]
    rel, top1 = float(m.group(1)), float(m.group(2))
    print(f"{case}: megatron vs HF logits (CPU, float32) rel err {rel:.2e}, top-1 {top1:.3f}")
    assert rel < 1e-4 and top1 == 1.0
