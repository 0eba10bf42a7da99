"""The name tables and the plan: TE and local names, fail-closed coverage, shape checks."""
import pytest

from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import Layout, PlanContext, check_coverage, expected_tensors, plan_param
from megatron_fp8pb.sources.tiny import tiny_hf_config

D = dims_from_hf(tiny_hf_config("qwen3"))   # hidden 384, 6 heads x 64, 2 kv heads, ffn 1152, vocab 1003
RULES = rules_for(D)


def _plan(name, shape, tp=2, rank=0, **kw):
    return plan_param(name, shape,
                      PlanContext.make(D, Layout(tp_size=tp, tp_rank=rank), QuantConfig(**kw), {0: 0, 1: 1}, 0))


def test_te_fused_norm_names_map_like_local_ones():
    a = _plan("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", (384,))
    b = _plan("decoder.layers.1.input_layernorm.weight", (384,))
    assert [p.hf_name for p in a.pieces] == [p.hf_name for p in b.pieces] == ["model.layers.1.input_layernorm.weight"]
    c = _plan("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", (384,))
    assert c.pieces[0].hf_name == "model.layers.0.post_attention_layernorm.weight"
    assert _plan("decoder.layers.0.input_layernorm.weight", (384,), rank=1).pieces == []   # replicated: rank 0 writes


def test_qkv_pieces_at_rank_offsets():
    plan = _plan("decoder.layers.0.self_attention.linear_qkv.weight", (1 * (3 + 2) * 64, 384), rank=1)
    got = {p.hf_name.split(".")[-2]: (p.offset, p.length, p.quantize) for p in plan.pieces}
    assert got == {"q_proj": (192, 192, True), "k_proj": (64, 64, True), "v_proj": (64, 64, True)}


def test_vocab_padding_is_stripped():
    # vocab 1003 padded to 1024 at tp=2: rank 1 holds rows 512..1023 of which 491 are real
    plan = _plan("output_layer.weight", (512, 384), rank=1)
    (p,) = plan.pieces
    assert (p.offset, p.length, p.quantize) == (512, 491, False)


def test_unmapped_parameter_is_an_error():
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.mystery.weight.*matches no rule"):
        _plan("decoder.layers.0.mlp.mystery.weight", (10, 10))


def test_shape_disagreeing_with_config_is_an_error():
    with pytest.raises(ValueError, match=r"local shape \(600, 384\) != \(1152, 384\)"):
        _plan("decoder.layers.0.mlp.linear_fc1.weight", (600, 384))


def test_coverage_fails_closed():
    pieces = [p for name, shape in [("decoder.layers.0.mlp.linear_fc2.weight", (384, 576))]
              for r in (0, 1) for p in _plan(name, shape, rank=r).pieces]
    with pytest.raises(ValueError, match="no rank holds HF tensor"):
        check_coverage(pieces, expected_tensors(RULES, D))
    with pytest.raises(ValueError, match="do not tile"):
        check_coverage(pieces[:1] * 2, {"model.layers.0.mlp.down_proj.weight": (384, 1152)})


def test_exclusion_keeps_fused_groups_whole():
    plan = _plan("decoder.layers.0.self_attention.linear_qkv.weight", (320, 384), exclude=("*.v_proj",))
    assert not any(p.quantize for p in plan.pieces)


def test_expert_names_sequential_and_grouped_become_global():
    from megatron_fp8pb.archs import dims_from_hf as dims
    d = dims(tiny_hf_config("qwen3_moe"))       # 4 experts, moe_intermediate 384
    layout = Layout(ep_size=2, ep_rank=1, etp_size=2, etp_rank=1)
    for name in ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight",
                 "decoder.layers.1.mlp.experts.linear_fc1.weight1"):
        plan = plan_param(name, (384, 384), PlanContext.make(d, layout, QuantConfig(), {1: 1}, 2))
        got = [(p.hf_name, p.offset, p.length, p.axis) for p in plan.pieces]
        assert got == [("model.layers.1.mlp.experts.3.gate_proj.weight", 192, 192, "etp"),
                       ("model.layers.1.mlp.experts.3.up_proj.weight", 192, 192, "etp")]
    router = plan_param("decoder.layers.0.mlp.router.weight", (4, 384),
                        PlanContext.make(d, layout, QuantConfig(), {0: 0}, 2))
    assert [(p.hf_name, p.quantize, p.linear) for p in router.pieces] == [("model.layers.0.mlp.gate.weight", False,
                                                                           True)]


def test_a_streamed_source_visits_every_unit_once_with_lm_head_after_the_first_layer():
    from megatron_fp8pb.plan.write_order import EMBEDDING_UNIT, final_unit, streamed_unit_order, unit_sequence, write_unit
    order = streamed_unit_order(D)
    last = final_unit(D)
    assert sorted(order) == list(range(last + 1))
    assert order[:3] == [EMBEDDING_UNIT, 1, last] and order[3:] == sorted(order[3:])
    assert unit_sequence(1) == [0, 1] and unit_sequence(2) == [0, 1, 2]      # no layer; one layer
    # the table's global rules land in those two units: the embedding's before the layers, lm_head's after them
    units = {write_unit(RULES, k, None, D) for k, r in enumerate(RULES) if r.scope == "global"}
    assert units == {EMBEDDING_UNIT, last}
