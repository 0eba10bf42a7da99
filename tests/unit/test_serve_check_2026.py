"""serve_check on the 2026 families at their published shapes: the leaves servers build unquantized, the shared
expert's per-rank size at tp=8, the indexer's replicated projections, MiniMax-M2's full-width q/k norms, and what
transformers' CPU dequantize gets wrong among their quantized weights."""
from __future__ import annotations

from functools import lru_cache

import pytest

from megatron_fp8pb.archs import default_exclude, dims_from_hf, presets, rules_for
from megatron_fp8pb.archs.base import hf_module
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import expected_tensors, linear_weights
from megatron_fp8pb.verify.serve_check import (layers_to_keep_unquantized, norm_problems, serve_problems,
                                               transformers_problems)

L0 = "model.layers.0."


def _quantized(preset: str) -> dict[str, tuple[int, int]]:
    return dict(_quantized_of(preset))


@lru_cache(maxsize=None)
def _quantized_of(preset: str, layers: int = 4) -> tuple:
    """(module, (N, K)) of the linears the export quantizes by default, for ``layers`` layers of a preset."""
    _, make = presets()[preset]
    d = dims_from_hf(make(layers))
    return tuple((hf_module(n), s) for n, s in linear_weights(rules_for(d), d).items()
            if QuantConfig().quantizes(hf_module(n), default_exclude(d)))


@pytest.mark.parametrize("leaf", ["linear_attn.in_proj_ba", "linear_attn.in_proj_b", "linear_attn.in_proj_a",
                                  "mlp.shared_expert_gate", "self_attn.indexer.weights_proj",
                                  "block_sparse_moe.gate"])
def test_leaves_built_unquantized_are_never_fp8(leaf):
    mods = {L0 + leaf: (128, 2048), L0 + "self_attn.o_proj": (2048, 4096)}
    for tp in (1, 8):
        [p] = serve_problems(mods, tp)
        assert (p.module, p.rule, p.tp) == (L0 + leaf, "never_fp8", tp)
        assert "source dtype" in p.message
    assert layers_to_keep_unquantized(mods, 1) == [L0 + leaf]


def test_defaults_quantize_none_of_them():
    for preset in ("qwen3-next-80b-a3b", "qwen3.5-397b-a17b", "deepseek-v3.2", "glm-5", "minimax-m2"):
        mods = _quantized(preset)
        assert [p for p in serve_problems(mods, 1) if p.rule == "never_fp8"] == [], preset


def test_qwen3_next_shared_expert_and_experts_refused_at_tp8():
    """shared_expert_intermediate_size 512 and moe_intermediate_size 512: 64 rows / columns per rank at tp 8."""
    mods = _quantized("qwen3-next-80b-a3b")
    bad = {p.module: p for p in serve_problems(mods, 8, num_kv_heads=2)}
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        assert L0 + f"mlp.shared_expert.{leaf}" in bad
        assert L0 + f"mlp.experts.0.{leaf}" in bad
    assert bad[L0 + "mlp.shared_expert.gate_proj"].message == \
        "output_partition_size 512/8 = 64 is not divisible by block_n 128"
    assert bad[L0 + "mlp.shared_expert.down_proj"].message == \
        "input_size_per_partition 512/8 = 64 is not divisible by block_k 128"
    assert not any(".linear_attn." in m or ".self_attn." in m for m in bad), sorted(bad)[:4]
    assert serve_problems(mods, 4, num_kv_heads=2) == []


def test_qwen3_5_shared_expert_of_1024_serves_at_tp8():
    assert serve_problems(_quantized("qwen3.5-397b-a17b"), 8, num_kv_heads=2) == []


@pytest.mark.parametrize("preset", ["deepseek-v3.2", "glm-5"])
def test_indexer_projections_are_replicated(preset):
    """wq_b and wk are replicated in the servers (no partition rule at any tp); weights_proj is not quantized."""
    mods = _quantized(preset)
    assert L0 + "self_attn.indexer.wq_b" in mods and L0 + "self_attn.indexer.wk" in mods
    assert L0 + "self_attn.indexer.weights_proj" not in mods
    for tp in (8, 16, 32):
        assert not any(".indexer." in p.module for p in serve_problems(mods, tp)), tp


def test_minimax_full_width_norms():
    """48 query heads and 8 kv heads of 128: q_norm [6144], k_norm [1024]."""
    norms = {L0 + "self_attn.q_norm.weight": 6144, L0 + "self_attn.k_norm.weight": 1024}
    for tp in (1, 2, 4, 8):
        assert norm_problems(norms, tp, 48, 8, 128) == [], tp
    [p] = norm_problems(norms, 16, 48, 8, 128)
    assert (p.module, p.rule) == (L0 + "self_attn.k_norm", "norm_split")
    assert "1024/16 = 64" in p.message and "one head (128)" in p.message
    assert {p.module for p in norm_problems(norms, 32, 48, 8, 128)} == \
        {L0 + "self_attn.q_norm", L0 + "self_attn.k_norm"}
    assert norm_problems({L0 + "self_attn.k_norm.weight": 128}, 16, 48, 8, 128) == []     # per head: no rule


def test_minimax_norms_in_the_preset_are_full_width():
    _, make = presets()["minimax-m2"]
    d = dims_from_hf(make(2))
    names = expected_tensors(rules_for(d), d)
    assert names[L0 + "self_attn.q_norm.weight"] == (6144,) and names[L0 + "self_attn.k_norm.weight"] == (1024,)


@pytest.mark.parametrize("preset,wrong", [("qwen3-next-80b-a3b", set()), ("qwen3.5-397b-a17b", set()),
                                          ("minimax-m2", set()),
                                          ("deepseek-v3.2", {"self_attn.kv_a_proj_with_mqa"}),
                                          ("glm-5", {"self_attn.kv_a_proj_with_mqa"})])
def test_transformers_dequantize_at_published_shapes(preset, wrong):
    """Among the new leaves at their real shapes only MLA's 576-row kv_a_proj_with_mqa is one transformers' CPU
    dequantize refuses; the DeltaNet projections, the indexer's and MiniMax-M2's are multiples of 128."""
    probs = transformers_problems(_quantized(preset))
    assert {p.module.split(".", 3)[-1] for p in probs} == wrong
    if wrong:
        assert "refuses" in probs[0].message
