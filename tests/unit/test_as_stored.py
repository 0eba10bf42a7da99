"""Tensors written as their source stores them (``Rule.as_stored``), and Qwen3.5-MoE's vision-language table: the
language model's names under ``model.language_model.``, the vision tower carried unquantized and listed."""
from __future__ import annotations

import torch

from megatron_fp8pb.archs import arch, default_exclude, dims_from_hf, rules_for
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import Layout, PlanContext, as_stored_tensors, expected_tensors, plan_param
from megatron_fp8pb.sources.hf import DictReader, stored_dtypes
from megatron_fp8pb.sources.streamed import local_param_shapes
from megatron_fp8pb.sources.tiny import random_hf_state, tiny_hf_config


def _pieces(d, layout, source_dtypes=None):
    ctx = PlanContext.make(d, layout, QuantConfig(), {j: j for j in range(d.num_layers)},
                           d.num_experts // layout.ep_size, source_dtypes=source_dtypes)
    return {p.hf_name: p for name, shape in local_param_shapes(d, layout) for p in plan_param(name, shape, ctx).slices}


def test_stored_dtype_decides_where_known():
    d = dims_from_hf(tiny_hf_config("qwen3_next"))
    a_log, ba = "model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.in_proj_ba.weight"
    got = _pieces(d, Layout(tp_size=2))
    assert got[a_log].dtype == "float32" and got[ba].dtype is None      # unknown: the release's, else the checkpoint's
    got = _pieces(d, Layout(tp_size=2), {a_log: "bfloat16", ba: "float32",
                                         "model.layers.0.linear_attn.in_proj_qkvz.weight": "float32"})
    assert (got[a_log].dtype, got[ba].dtype) == ("bfloat16", "float32")
    assert got["model.layers.0.linear_attn.in_proj_qkvz.weight"].quantize
    # a rule that is not as_stored ignores what the source says
    got = _pieces(d, Layout(tp_size=2), {"model.layers.0.input_layernorm.weight": "float32"})
    assert got["model.layers.0.input_layernorm.weight"].dtype is None


def test_as_stored_tensors_of_each_family():
    want = {"qwen3_next": ("A_log", "dt_bias", "conv1d.weight", "linear_attn.norm.weight", "in_proj_ba.weight",
                           "mlp.gate.weight", "shared_expert_gate.weight"),
            "deepseek_v32": ("indexer.weights_proj.weight", "indexer.k_norm.weight", "indexer.k_norm.bias",
                             "e_score_correction_bias"),
            "minimax_m2": ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "block_sparse_moe.gate.weight",
                           "e_score_correction_bias")}
    for fam, leaves in want.items():
        d = dims_from_hf(tiny_hf_config(fam))
        names = as_stored_tensors(rules_for(d), d)
        for leaf in leaves:
            assert any(n.endswith(leaf) for n in names), (fam, leaf)
        assert not any(n.endswith("o_proj.weight") or "embed_tokens" in n for n in names), fam


def test_stored_dtypes_of_a_reader():
    state = random_hf_state(tiny_hf_config("minimax_m2"))
    bias = "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert state[bias].dtype == torch.float32
    got = stored_dtypes(DictReader(state), [bias, "model.norm.weight", "absent"])
    assert got == {bias: "float32", "model.norm.weight": "bfloat16"}


def test_vlm_table():
    cfg = tiny_hf_config("qwen3_5_moe")
    d = dims_from_hf(cfg)
    names = expected_tensors(rules_for(d), d)
    assert all(n.startswith(("model.language_model.", "model.visual.")) or n == "lm_head.weight" for n in names)
    text = dims_from_hf(tiny_hf_config("qwen3_5_moe_text"))
    assert len(names) == len(expected_tensors(rules_for(text), text)) + len(d.carried)
    assert names["model.visual.patch_embed.proj.weight"] == (96, 3, 2, 8, 8)
    linears = {n for n, _, lin in d.carried if lin}
    assert "model.visual.blocks.0.attn.qkv.weight" in linears and "model.visual.merger.linear_fc2.weight" in linears
    assert "model.visual.pos_embed.weight" not in linears
    q = QuantConfig()
    for n in linears:
        assert not q.quantizes(n[:-len(".weight")], default_exclude(d))
    assert not q.quantizes("model.language_model.embed_tokens", default_exclude(d))
    assert q.quantizes("model.language_model.layers.0.linear_attn.in_proj_qkv", default_exclude(d))
    pieces = _pieces(d, Layout(tp_size=2, pp_size=1))
    vis = [p for n, p in pieces.items() if n.startswith("model.visual.")]
    assert len(vis) == len(d.carried) and not any(p.quantize for p in vis)
    assert {p.linear for p in vis} == {True, False}


def test_vlm_config_must_feed_the_language_model():
    import pytest
    cfg = arch("qwen3_5_moe").tiny["qwen3_5_moe"](False)
    cfg.vision_config.out_hidden_size = 128
    with pytest.raises(ValueError, match="out_hidden_size"):
        dims_from_hf(cfg)
