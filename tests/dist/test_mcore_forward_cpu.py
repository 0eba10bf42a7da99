"""The megatron-core model built from an HF checkpoint computes the HF model's logits, on the CPU in float32: proves
the name and row mapping of multi-latent attention (q_proj and q_a/q_b variants), the dense/MoE layer split, shared
experts, the sigmoid router with its expert bias, GLM-4-MoE's partial rotary, q/k/v biases and q/k norms, and
MiniMax-M2's full-width q/k norms (``FullWidthRMSNorm``; at tp=2 their statistic is all-reduced over the two ranks'
heads, and the vocabulary shards of the logits gathered). The MLA core attention is the exporter's stand-in
(``mcore.MLACoreAttention``)."""
import re

import pytest

from helpers import torchrun, write_hf_source
from megatron_fp8pb.sources.tiny import tiny_hf_config


def _deepseek_q_lora():
    cfg = tiny_hf_config("deepseek_v3")
    cfg.q_lora_rank = 96
    return cfg


def _minimax_m2():
    """Half-rotary heads (``rotary_dim`` 40 of 80, as the release turns 64 of 128)."""
    from megatron_fp8pb.archs import arch
    return arch("minimax_m2").tiny["minimax_m2"](False, rotary_dim=40)


CASES = {"deepseek_v3": lambda: tiny_hf_config("deepseek_v3"), "deepseek_v3_q_lora": _deepseek_q_lora,
         "glm4_moe": lambda: tiny_hf_config("glm4_moe"), "minimax_m2": _minimax_m2, "minimax_m2_tp2": _minimax_m2}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_equal_hf_on_cpu(tmp_path, case):
    src = tmp_path / "src"
    write_hf_source(src, CASES[case]())
    tp = 2 if case.endswith("_tp2") else 1
    r = torchrun(tp, [str(src), str(tp)], script="tests/dist/forward_worker.py")
    m = re.search(r"FORWARD rel_err=(\S+) top1=(\S+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout[-2000:] + r.stderr[-3000:]
    rel, top1 = float(m.group(1)), float(m.group(2))
    print(f"{case}: megatron vs HF logits (CPU, float32) rel err {rel:.2e}, top-1 {top1:.3f}")
    assert rel < 1e-4 and top1 == 1.0
