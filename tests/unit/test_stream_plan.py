"""A streamed source's ranks and parameters without processes: every layout's ranks, each holding the parameters
the rules give it, cover every HF tensor exactly once; groups hold ranks of one stage."""
from dataclasses import replace

import pytest

from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.config import QuantConfig
from megatron_fp8pb.plan.params import PlanContext, check_coverage, expected_tensors, plan_param
from megatron_fp8pb.plan.ranks import group_ranks, rank_layout
from megatron_fp8pb.sources.streamed import local_param_shapes, stage_layers
from megatron_fp8pb.sources.tiny import tiny_hf_config

LAYOUTS = [  # arch, tie, world, tp, pp, ep, etp
    ("qwen3", False, 2, 2, 1, 1, None), ("qwen3", True, 4, 1, 2, 1, None), ("llama", False, 8, 2, 2, 1, None),
    ("qwen2", True, 4, 2, 2, 1, None), ("qwen3_moe", False, 4, 2, 1, 2, 1), ("qwen3_moe", False, 8, 1, 2, 4, 1),
    ("qwen2_moe", False, 4, 2, 1, 2, 2), ("mixtral", False, 8, 2, 1, 4, 2),
]


@pytest.mark.parametrize("arch,tie,world,tp,pp,ep,etp", LAYOUTS)
def test_every_tensor_exactly_once(arch, tie, world, tp, pp, ep, etp):
    cfg = tiny_hf_config(arch, tie)
    cfg.num_hidden_layers = 4
    d = dims_from_hf(cfg)
    rules = rules_for(d)
    pieces = []
    for r in range(world):
        lay = rank_layout(r, world, tp, pp, ep, etp)
        layers = stage_layers(d, lay)
        for name, shape in local_param_shapes(d, lay):
            plan = plan_param(name, shape,
                              PlanContext.make(d, lay, QuantConfig(), layers, d.num_experts // ep if ep else 0))
            pieces += [replace(p, src=r) for p in plan.pieces]
    by_name = check_coverage(pieces, expected_tensors(rules, d))
    assert set(by_name) == set(expected_tensors(rules, d))


@pytest.mark.parametrize("world,tp,pp,ep,etp", [(8, 2, 2, 1, None), (8, 2, 1, 4, 1), (16, 2, 2, 2, 2)])
def test_groups_hold_one_stage(world, tp, pp, ep, etp):
    lays = [rank_layout(r, world, tp, pp, ep, etp) for r in range(world)]
    assert lays[0].pp_rank == 0 and lays[0].exporting and lays[0].expert_exporting
    groups = group_ranks(world, tp, pp, ep, etp)
    for axis, size in (("tp", tp), ("etp", etp or tp)):
        for g in groups[axis]:
            assert len(g) == size and len({lays[r].pp_rank for r in g}) == 1
            assert sorted(getattr(lays[r], f"{axis}_rank") for r in g) == list(range(size))
    exported = [(x.tp_rank, x.pp_rank) for x in lays if x.exporting]
    assert sorted(exported) == sorted({(t, p) for t in range(tp) for p in range(pp)})
