"""The megatron-core model built from an HF checkpoint computes the HF model's logits, on the CPU in float32: proves
the name and row mapping of multi-latent attention (q_proj and q_a/q_b variants), the dense/MoE layer split, shared
experts, the sigmoid router with its expert bias, and GLM-4-MoE's partial rotary, q/k/v biases and q/k norms. The
MLA core attention is the exporter's stand-in (``mcore.MLACoreAttention``)."""
import re

import pytest

from helpers import torchrun, write_hf_source
from megatron_fp8pb.sources.tiny import tiny_hf_config


def _deepseek_q_lora():
    cfg = tiny_hf_config("deepseek_v3")
    cfg.q_lora_rank = 96
    return cfg


CASES = {"deepseek_v3": lambda: tiny_hf_config("deepseek_v3"), "deepseek_v3_q_lora": _deepseek_q_lora,
         "glm4_moe": lambda: tiny_hf_config("glm4_moe")}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_equal_hf_on_cpu(tmp_path, case):
    src = tmp_path / "src"
    write_hf_source(src, CASES[case]())
    r = torchrun(1, [str(src)], script="tests/dist/forward_worker.py")
    m = re.search(r"FORWARD rel_err=(\S+) top1=(\S+)", r.stdout)
    assert r.returncode == 0 and m, r.stdout[-2000:] + r.stderr[-3000:]
    rel, top1 = float(m.group(1)), float(m.group(2))
    print(f"{case}: megatron vs HF logits (CPU, float32) rel err {rel:.2e}, top-1 {top1:.3f}")
    assert rel < 1e-4 and top1 == 1.0
