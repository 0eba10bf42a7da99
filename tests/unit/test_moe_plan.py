"""Mixture-of-experts tables and plans without processes: HF names per architecture, global expert numbering for
both Megatron expert layouts, every expert exactly once across all ranks of a layout, refusals that name the fix."""
import itertools

import pytest
import transformers as tf

from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import Layout, PlanContext, check_coverage, expected_tensors, plan_param
from megatron_fp8pb.sources.tiny import tiny_hf_config
from megatron_fp8pb.plan.validate import check_layout

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")
FC1 = ("decoder.layers.{j}.mlp.experts.local_experts.{x}.linear_fc1.weight",
       "decoder.layers.{j}.mlp.experts.linear_fc1.weight{x}")
FC2 = ("decoder.layers.{j}.mlp.experts.local_experts.{x}.linear_fc2.weight",
       "decoder.layers.{j}.mlp.experts.linear_fc2.weight{x}")


def _dims(arch, **kw):
    cfg = tiny_hf_config(arch)   # hidden 384, 2 layers, 4 experts of 384, top-2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return dims_from_hf(cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_dims(arch):
    d = _dims(arch)
    assert (d.num_experts, d.moe_ffn_hidden, d.moe_top_k, d.ffn_hidden) == (4, 384, 2, 0)
    assert (d.shared_expert_ffn, d.shared_expert_gate, d.qkv_bias) == \
        ((384, True, True) if arch == "qwen2_moe" else (0, False, False))


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("setting,value,dense", [("mlp_only_layers", [1], [1]), ("decoder_sparse_step", 2, [0])])
def test_dense_layers_mixed_in_are_refused(arch, setting, value, dense):
    with pytest.raises(ValueError, match=rf"{arch}: mlp_only_layers=.*decoder_sparse_step=.* layer\(s\) "
                                         rf"\{dense}\ dense MLP layers.*mlp_only_layers=\[\], decoder_sparse_step=1"):
        _dims(arch, **{setting: value})


HF_NAMES = {  # arch -> names of layer 1 expert 3 and the router
    "qwen3_moe": ["model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                  "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.gate.weight"],
    "qwen2_moe": ["model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                  "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.gate.weight",
                  "model.layers.1.mlp.shared_expert.gate_proj.weight",
                  "model.layers.1.mlp.shared_expert.up_proj.weight",
                  "model.layers.1.mlp.shared_expert.down_proj.weight",
                  "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.1.self_attn.q_proj.bias"],
    "mixtral": ["model.layers.1.block_sparse_moe.experts.3.w1.weight",
                "model.layers.1.block_sparse_moe.experts.3.w3.weight",
                "model.layers.1.block_sparse_moe.experts.3.w2.weight", "model.layers.1.block_sparse_moe.gate.weight"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_names(arch):
    d = _dims(arch)
    names = expected_tensors(rules_for(d), d)
    assert set(HF_NAMES[arch]) <= set(names)
    assert "model.layers.1.post_attention_layernorm.weight" in names
    assert not any(".mlp.gate_proj" in n or ".mlp.down_proj" in n for n in names)   # no dense MLP
    experts = {n.split(".experts.")[1].split(".")[0] for n in names if ".experts." in n}
    assert experts == {"0", "1", "2", "3"}


def _local_expert_params(d, ep, etp, pp, ep_rank, etp_rank, pp_rank, grouped):
    """The expert and router parameters one rank holds: (name, local shape), layer map, num_local_experts."""
    per_stage, local = d.num_layers // pp, d.num_experts // ep
    layers = {j: pp_rank * per_stage + j for j in range(per_stage)}
    params = []
    for j, x in itertools.product(range(per_stage), range(local)):
        params.append((FC1[grouped].format(j=j, x=x), (2 * d.moe_ffn_hidden // etp, d.hidden)))
        params.append((FC2[grouped].format(j=j, x=x), (d.hidden, d.moe_ffn_hidden // etp)))
    params += [(f"decoder.layers.{j}.mlp.router.weight", (d.num_experts, d.hidden)) for j in range(per_stage)]
    return params, layers, local


LAYOUTS = [  # (tp, ep, etp, pp, world)
    (1, 2, 1, 1, 2), (2, 2, 1, 1, 2), (2, 2, 1, 1, 4), (1, 2, 2, 1, 4), (1, 2, 1, 2, 4), (2, 4, 2, 2, 16),
    (1, 1, 4, 1, 8), (4, 2, 2, 1, 8), (2, 8, 1, 1, 8),
]


def _ranks(tp, ep, etp, pp, world):
    """Every rank's Layout as megatron-core folds the dense (tp, dp) and expert (etp, ep, edp) grids onto the same
    ranks of a pipeline stage (order tp-ep-dp, pipeline outermost)."""
    per_stage = world // pp
    for pp_rank, r in itertools.product(range(pp), range(per_stage)):
        yield Layout(tp_size=tp, tp_rank=r % tp, pp_size=pp, pp_rank=pp_rank, ep_size=ep, ep_rank=r // etp % ep,
                     etp_size=etp, etp_rank=r % etp, exporting=r // tp == 0, expert_exporting=r // (etp * ep) == 0)


@pytest.mark.parametrize("grouped", [0, 1], ids=["sequential", "grouped"])
@pytest.mark.parametrize("tp,ep,etp,pp,world", LAYOUTS)
def test_every_expert_exactly_once(tp, ep, etp, pp, world, grouped):
    """All ranks of a layout planned like the export plans them: the pieces tile every expert tensor exactly once
    (etp offsets, global expert numbers, only expert-data-parallel rank 0 exporting) and each router once."""
    d = _dims("qwen3_moe", moe_intermediate_size=320, num_experts=8)   # 160 rows per rank at etp 2
    rules = rules_for(d)
    pieces = []
    for layout in _ranks(tp, ep, etp, pp, world):
        params, layers, local = _local_expert_params(d, ep, etp, pp, layout.ep_rank, layout.etp_rank, layout.pp_rank,
                                                     grouped)
        for name, shape in params:
            pieces += plan_param(name, shape, PlanContext.make(d, layout, QuantConfig(), layers, local)).pieces
    expected = {n: s for n, s in expected_tensors(rules, d).items()
                if ".experts." in n or n.endswith("mlp.gate.weight")}
    by_name = check_coverage(pieces, expected)
    assert len(by_name) == 2 * 8 * 3 + 2
    for name, pieces in by_name.items():
        assert len(pieces) == (1 if name.endswith("mlp.gate.weight") else etp), name
        assert all(p.quantize == (".experts." in name) for p in pieces)
        # split experts agree on block amax across etp; whole ones (etp 1) are quantized alone
        assert all(p.axis == ("etp" if ".experts." in name and etp > 1 else None) for p in pieces)


def test_global_expert_numbers_and_etp_offsets():
    d = _dims("mixtral")
    layout = Layout(ep_size=2, ep_rank=1, etp_size=2, etp_rank=1)
    for fc1, fc2 in zip(FC1, FC2):
        up = plan_param(fc1.format(j=0, x=1), (384, 384), PlanContext.make(d, layout, QuantConfig(), {0: 1}, 2))
        down = plan_param(fc2.format(j=0, x=1), (384, 192), PlanContext.make(d, layout, QuantConfig(), {0: 1}, 2))
        got = [(p.hf_name, p.dim, p.offset, p.length) for p in up.pieces + down.pieces]
        assert got == [("model.layers.1.block_sparse_moe.experts.3.w1.weight", 0, 192, 192),
                       ("model.layers.1.block_sparse_moe.experts.3.w3.weight", 0, 192, 192),
                       ("model.layers.1.block_sparse_moe.experts.3.w2.weight", 1, 192, 192)]


def test_missing_expert_is_named():
    """Only ep rank 0's experts reach rank 0 (ep=2): the coverage check names the experts no rank holds."""
    d = _dims("qwen3_moe")
    params, layers, local = _local_expert_params(d, 2, 1, 1, 0, 0, 0, 0)
    pieces = [p for n, s in params
              for p in plan_param(n, s, PlanContext.make(d, Layout(ep_size=2), QuantConfig(), layers, local)).pieces]
    expected = {n: s for n, s in expected_tensors(rules_for(d), d).items() if ".mlp." in n}
    with pytest.raises(ValueError, match=r"no rank holds HF tensor\(s\) \['model\.layers\.0\.mlp\.experts\.2\."):
        check_coverage(pieces, expected)


def test_routers_and_shared_expert_gate_stay_unquantized_and_listed():
    d = _dims("qwen2_moe")
    layout = Layout(tp_size=2, tp_rank=1, ep_size=2, etp_size=1)
    plans = {n: plan_param(n, s, PlanContext.make(d, layout, QuantConfig(), {0: 0}, 2)) for n, s in [
        ("decoder.layers.0.mlp.router.weight", (4, 384)), ("decoder.layers.0.mlp.shared_experts.gate_weight", (1, 384)),
        ("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", (384, 384)),
        ("decoder.layers.0.mlp.shared_experts.linear_fc2.weight", (384, 192))]}
    for n in ("decoder.layers.0.mlp.router.weight", "decoder.layers.0.mlp.shared_experts.gate_weight"):
        (s,) = plans[n].slices
        assert (s.quantize, s.linear, s.axis) == (False, True, None)
        assert plans[n].pieces == []         # replicated: tp rank 0 writes it
    fc1 = plans["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"].pieces
    assert [(p.hf_name, p.offset, p.length, p.axis) for p in fc1] == [
        ("model.layers.0.mlp.shared_expert.gate_proj.weight", 192, 192, "tp"),
        ("model.layers.0.mlp.shared_expert.up_proj.weight", 192, 192, "tp")]
    (down,) = plans["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"].pieces
    assert (down.dim, down.offset, down.length, down.axis) == (1, 192, 192, "tp")


def test_expert_refusals_name_the_parameter():
    d = _dims("qwen3_moe")
    layout = Layout(ep_size=2, etp_size=2)
    with pytest.raises(ValueError, match=r"local_experts\.2\.linear_fc1\.weight: local expert 2 >= "
                                         r"num_local_experts\(2\)"):
        plan_param(FC1[0].format(j=0, x=2), (384, 384), PlanContext.make(d, layout, QuantConfig(), {0: 0}, 2))
    with pytest.raises(ValueError, match=r"local shape \(768, 384\) != \(384, 384\).*ep=2 etp=2"):
        plan_param(FC1[1].format(j=0, x=0), (768, 384), PlanContext.make(d, layout, QuantConfig(), {0: 0}, 2))
    with pytest.raises(ValueError, match=r"mlp\.experts\.weight1 \(shape \(384, 1536\)\): the legacy GroupedMLP.*"
                                         r"source\.kind=megatron"):
        plan_param("decoder.layers.0.mlp.experts.weight1", (384, 1536),
                   PlanContext.make(d, layout, QuantConfig(), {0: 0}, 2))


@pytest.mark.parametrize("override,world,tp,pp,ep,etp,msg", [
    ({}, 2, 1, 1, 3, 1, r"num_experts\(4\) % ep\(3\) = 1 != 0"),
    ({"moe_intermediate_size": 390}, 4, 1, 1, 1, 4, r"moe_intermediate_size\(390\) % etp\(4\) = 2 != 0"),
    ({}, 2, 1, 1, 2, 2, r"world size\(2\) % \(pp\(1\) \* ep\(2\) \* etp\(2\)\) = 2 != 0"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, 5, 5, 1, 1, 1,
     r"shared_expert_intermediate_size\(384\) % tp\(5\) = 4 != 0"),
])
def test_layout_checks(override, world, tp, pp, ep, etp, msg):
    with pytest.raises(ValueError, match=msg):
        check_layout(_dims("qwen2_moe", **override), world, tp, pp, ep, etp)


def test_expert_parallel_needs_experts():
    with pytest.raises(ValueError, match=r"parallel\.ep=2 needs a mixture-of-experts model; qwen3 has no experts"):
        check_layout(dims_from_hf(tiny_hf_config("qwen3")), 2, 1, 1, 2, 1)


def test_mixtral_from_a_plain_config():
    d = dims_from_hf(tf.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336,
                                      hidden_size=4096, num_hidden_layers=1, num_attention_heads=32,
                                      num_key_value_heads=8))
    assert (d.num_experts, d.moe_ffn_hidden, d.moe_top_k, d.head_dim) == (8, 14336, 2, 128)
