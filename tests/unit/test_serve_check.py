"""serve_check: the vLLM / SGLang partition rules on hand-computed cases."""
from __future__ import annotations

import pytest

from megatron_fp8pb.verify.serve_check import (fused_partial_problems, fusion_group, layers_to_keep_unquantized,
                                        serve_problems, transformers_problems)

L0 = "model.layers.0."


def _mlp(inter: int, hidden: int = 4096) -> dict[str, tuple[int, int]]:
    return {L0 + "mlp.gate_proj": (inter, hidden), L0 + "mlp.up_proj": (inter, hidden),
            L0 + "mlp.down_proj": (hidden, inter)}


def test_intermediate_1536_at_tp8_is_refused():
    probs = serve_problems(_mlp(1536), 8)
    by_module = {p.module: p for p in probs}
    assert set(by_module) == set(_mlp(1536))
    assert by_module[L0 + "mlp.gate_proj"].message == \
        "output_partition_size 1536/8 = 192 is not divisible by block_n 128"
    assert by_module[L0 + "mlp.down_proj"].message == \
        "input_size_per_partition 1536/8 = 192 is not divisible by block_k 128"
    assert all(p.tp == 8 for p in probs)
    assert "at tp=8" in str(by_module[L0 + "mlp.up_proj"])


def test_intermediate_2048_at_tp8_is_accepted():
    assert serve_problems(_mlp(2048), 8) == []


def test_intermediate_1536_is_fine_up_to_tp4():
    for tp in (1, 2, 4):
        assert serve_problems(_mlp(1536), tp) == [], tp


def test_o_proj_row_parallel():
    mods = {L0 + "self_attn.o_proj": (4096, 1536)}
    [p] = serve_problems(mods, 8)
    assert p.rule == "input_partition" and "1536/8 = 192" in p.message and "block_k 128" in p.message
    assert serve_problems(mods, 1) == []
    assert serve_problems({L0 + "self_attn.o_proj": (4096, 1000)}, 1) == []


def test_k_proj_two_kv_heads_at_tp4():
    mods = {L0 + "self_attn.k_proj": (256, 4096)}
    [p] = serve_problems(mods, 4)
    assert p.message == "output_partition_size 256/4 = 64 is not divisible by block_n 128"
    assert serve_problems(mods, 2) == []


def test_k_proj_kv_head_replication_when_heads_given():
    mods = {L0 + "self_attn.k_proj": (256, 4096), L0 + "self_attn.v_proj": (256, 4096)}
    assert serve_problems(mods, 4, num_kv_heads=2) == []                       # one whole 128-head per rank
    assert serve_problems(mods, 8, num_kv_heads=2) == []
    small = {L0 + "self_attn.k_proj": (128, 4096)}                             # 2 heads of 64
    [p] = serve_problems(small, 4, num_kv_heads=2)
    assert "64" in p.message and "replicated" in p.message
    [p] = serve_problems(mods, 3, num_kv_heads=2)[:1]
    assert p.rule == "tp_split"


def test_output_not_divisible_by_tp():
    [p] = serve_problems({L0 + "mlp.gate_proj": (1000, 4096)}, 3)
    assert p.rule == "tp_split" and "1000" in p.message and "tp 3" in p.message


def test_other_modules_have_no_rule():
    mods = {"lm_head": (1003, 384), L0 + "self_attn.q_proj": (4096, 4096)}
    assert serve_problems(mods, 8) == []
    [p] = serve_problems({**mods, L0 + "mlp.gate": (8, 4096)}, 8)      # a router is built unquantized
    assert (p.module, p.rule) == (L0 + "mlp.gate", "never_fp8")
    with pytest.raises(ValueError):
        serve_problems(mods, 0)


def test_expert_projections_follow_the_same_rules():
    mods = {L0 + "mlp.experts.3.gate_proj": (768, 2048), L0 + "mlp.experts.3.down_proj": (2048, 768),
            L0 + "block_sparse_moe.experts.0.w1": (768, 2048), L0 + "block_sparse_moe.experts.0.w2": (2048, 768)}
    assert {p.module for p in serve_problems(mods, 8)} == set(mods)            # 768/8 = 96
    assert serve_problems(mods, 2) == []                                       # 384


def test_transformers_problems():
    mods = {"lm_head": (1003, 384), L0 + "mlp.down_proj": (384, 1152), L0 + "self_attn.o_proj": (384, 100)}
    probs = {p.module: p for p in transformers_problems(mods)}
    assert set(probs) == {"lm_head", L0 + "self_attn.o_proj"}
    assert "1003 % 128 = 107" in probs["lm_head"].message


def test_fusion_groups():
    assert fusion_group(L0 + "self_attn.k_proj") == L0 + "self_attn.qkv_proj"
    assert fusion_group(L0 + "mlp.up_proj") == L0 + "mlp.gate_up_proj"
    assert fusion_group(L0 + "mlp.shared_expert.gate_proj") == L0 + "mlp.shared_expert.gate_up_proj"
    assert fusion_group(L0 + "mlp.experts.7.down_proj") == L0 + "mlp.experts"
    assert fusion_group(L0 + "mlp.down_proj") is None
    assert fusion_group("lm_head") is None


def test_layers_to_keep_unquantized_adds_fused_siblings():
    mods = {L0 + "self_attn.q_proj": (4096, 4096), L0 + "self_attn.k_proj": (256, 4096),
            L0 + "self_attn.v_proj": (256, 4096), L0 + "self_attn.o_proj": (4096, 4096), **_mlp(2048)}
    keep = layers_to_keep_unquantized(mods, 4)
    assert keep == sorted(L0 + f"self_attn.{x}_proj" for x in "qkv")
    assert layers_to_keep_unquantized(mods, 2) == []
    assert layers_to_keep_unquantized(mods, 4, num_kv_heads=2) == []
    mlp = _mlp(1536)
    assert layers_to_keep_unquantized(mlp, [2, 8]) == sorted(mlp)


def test_layers_to_keep_unquantized_keeps_all_experts_of_a_layer():
    mods = {f"{L0}mlp.experts.{e}.{p}": ((2048, 768) if p == "down_proj" else (768, 2048))
            for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    mods["model.layers.1.mlp.experts.0.gate_proj"] = (1024, 2048)
    keep = layers_to_keep_unquantized(mods, 8)
    assert keep == sorted(m for m in mods if m.startswith(L0))


def test_fused_partial_problems():
    quant = [L0 + "self_attn.q_proj", L0 + "self_attn.k_proj", L0 + "mlp.gate_proj", L0 + "mlp.down_proj"]
    unq = [L0 + "self_attn.v_proj", "lm_head", L0 + "mlp.experts.0.up_proj"]
    probs = fused_partial_problems(quant, unq)
    assert {p.module for p in probs} == {L0 + "self_attn.q_proj", L0 + "self_attn.k_proj"}
    assert "v_proj" in probs[0].message
