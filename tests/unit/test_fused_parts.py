"""The fused Megatron tensors of the 2026 families against layouts built here from their parts, independently of
``FusedParts``: gated DeltaNet's ``in_proj`` and ``conv1d`` (rank rows [q; k; v; z; b; a] of its key heads) and the
gated attention's ``linear_qkv`` (per query group [query heads; gate heads; k; v]), split into the HF tensors as
Qwen3-Next (per key head ``in_proj_qkvz`` / ``in_proj_ba``) and Qwen3.5 (``in_proj_qkv`` [q; k; v], ``in_proj_z``,
``in_proj_b``, ``in_proj_a``) save them; and the plan's refusals."""
import pytest
import torch

from megatron_fp8pb.archs import dims_from_hf, rules_for
from megatron_fp8pb.archs.qwen3_next import _qwen3_5_moe, _qwen3_next
from megatron_fp8pb.plan.params import Layout, PlanContext, plan_param
from megatron_fp8pb.plan.tp_slices import from_slices, to_slices

H = 8


def _heads(n, dim, gen):
    return torch.randn(n, dim, H, generator=gen)


def _deltanet(d, gen):
    nk, nv, dk, dv = d.lin_k_heads, d.lin_v_heads, d.lin_k_dim, d.lin_v_dim
    r = nv // nk
    q, k, v, z = _heads(nk, dk, gen), _heads(nk, dk, gen), _heads(nv, dv, gen), _heads(nv, dv, gen)
    b, a = torch.randn(nv, H, generator=gen), torch.randn(nv, H, generator=gen)
    flat = lambda x: x.reshape(-1, H)  # noqa: E731
    hf = {"in_proj_qkvz": torch.cat([torch.cat([q[g], k[g], flat(v[g * r:(g + 1) * r]), flat(z[g * r:(g + 1) * r])])
                                     for g in range(nk)]),
          "in_proj_ba": torch.cat([torch.cat([b[g * r:(g + 1) * r], a[g * r:(g + 1) * r]]) for g in range(nk)]),
          "in_proj_qkv": torch.cat([flat(q), flat(k), flat(v)]), "in_proj_z": flat(z), "in_proj_b": b,
          "in_proj_a": a}

    def mcore(tp, rank):
        ks, vs = slice(rank * nk // tp, (rank + 1) * nk // tp), slice(rank * nv // tp, (rank + 1) * nv // tp)
        return torch.cat([flat(q[ks]), flat(k[ks]), flat(v[vs]), flat(z[vs]), b[vs], a[vs]])
    return hf, mcore


def _plan(d, name, shape, tp, rank):
    ctx = PlanContext.make(d, Layout(tp_size=tp, tp_rank=rank), layer_of_local={i: i for i in range(d.num_layers)})
    return plan_param(name, shape, ctx)


@pytest.mark.parametrize("make", [_qwen3_next, _qwen3_5_moe], ids=["qwen3_next", "qwen3_5"])
@pytest.mark.parametrize("tp", [1, 2])
def test_deltanet_in_proj(make, tp):
    cfg = make(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=3, linear_value_head_dim=5,
               hidden_size=H, num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    d = dims_from_hf(cfg)
    hf, mcore = _deltanet(d, torch.Generator().manual_seed(0))
    rebuilt = {}
    for rank in range(tp):
        local = mcore(tp, rank)
        plan = _plan(d, "decoder.layers.0.self_attention.in_proj.weight", tuple(local.shape), tp, rank)
        for s, t in zip(plan.slices, to_slices(plan, local, d)):
            leaf = s.hf_name.split(".")[-2]
            assert torch.equal(t, hf[leaf].narrow(0, s.offset, s.length)), (leaf, rank, s.offset)
            rebuilt.setdefault(leaf, torch.full_like(hf[leaf], float("nan"))).narrow(0, s.offset, s.length).copy_(t)
        assert torch.equal(from_slices(plan, to_slices(plan, local, d), d), local)
        if tp == 1:
            assert len(plan.slices) == len(plan.rule.hf)    # one range per HF tensor on one rank
    assert set(rebuilt) == {h.split(".")[-2] for h in plan.rule.hf}
    for leaf, t in rebuilt.items():
        assert torch.equal(t, hf[leaf])


def test_deltanet_conv1d_channels():
    cfg = _qwen3_5_moe(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=3,
                       linear_value_head_dim=5, linear_conv_kernel_dim=4)
    d = dims_from_hf(cfg)
    kd, vd = 2 * 3, 4 * 5
    full = torch.randn(2 * kd + vd, 1, 4)
    q, k, v = full.split([kd, kd, vd])
    for rank in range(2):
        local = torch.cat([q.chunk(2)[rank], k.chunk(2)[rank], v.chunk(2)[rank]])
        plan = _plan(d, "decoder.layers.0.self_attention.conv1d.weight", tuple(local.shape), 2, rank)
        assert [(s.offset, s.length) for s in plan.slices] == [(rank * 3, 3), (kd + rank * 3, 3),
                                                              (2 * kd + rank * 10, 10)]
        for s, t in zip(plan.slices, to_slices(plan, local, d)):
            assert torch.equal(t, full.narrow(0, s.offset, s.length))


def test_gated_attention_q_proj_rows_per_head():
    cfg = _qwen3_next(num_attention_heads=4, num_key_value_heads=2, head_dim=3, hidden_size=H)
    d = dims_from_hf(cfg)
    gen = torch.Generator().manual_seed(1)
    q, gate, k, v = _heads(4, 3, gen), _heads(4, 3, gen), _heads(2, 3, gen), _heads(2, 3, gen)
    hf_q = torch.cat([torch.cat([q[h], gate[h]]) for h in range(4)])       # HF: per head [query; gate]
    for rank in range(2):     # Megatron: per query group [query heads; gate heads; k; v]
        g = rank
        local = torch.cat([q[2 * g:2 * g + 2].reshape(-1, H), gate[2 * g:2 * g + 2].reshape(-1, H), k[g], v[g]])
        plan = _plan(d, "decoder.layers.3.self_attention.linear_qkv.weight", tuple(local.shape), 2, rank)
        got = dict(zip([s.hf_name.split(".")[-2] for s in plan.slices], to_slices(plan, local, d)))
        assert torch.equal(got["q_proj"], hf_q[rank * 12:(rank + 1) * 12])
        assert torch.equal(got["k_proj"], k[g]) and torch.equal(got["v_proj"], v[g])
        assert torch.equal(from_slices(plan, list(got.values()), d), local)


def test_key_heads_that_tp_does_not_divide_are_refused():
    cfg = _qwen3_next(linear_num_key_heads=3, linear_num_value_heads=3)
    d = dims_from_hf(cfg)
    rule = next(r for r in rules_for(d) if r.mcore == ("self_attention.in_proj.weight",))
    rows = sum(s[0] for s in rule.shapes(d))
    with pytest.raises(ValueError, match=r"linear_num_key_heads\(3\) % tp_size\(2\) != 0"):
        _plan(d, "decoder.layers.0.self_attention.in_proj.weight", (rows // 2, d.hidden), 2, 0)


def test_value_heads_must_be_whole_per_key_head():
    with pytest.raises(ValueError, match=r"linear_num_value_heads\(5\) % linear_num_key_heads\(2\) != 0"):
        dims_from_hf(_qwen3_next(linear_num_key_heads=2, linear_num_value_heads=5))


def test_glm5_shared_indexer_layers_hold_no_indexer():
    from megatron_fp8pb.archs.dsa import _glm5
    from megatron_fp8pb.plan.params import expected_tensors
    d = dims_from_hf(_glm5(num_hidden_layers=4, indexer_types=["full", "shared", "shared", "full"]))
    names = expected_tensors(rules_for(d), d)
    assert [i for i in range(4) if f"model.layers.{i}.self_attn.indexer.wq_b.weight" in names] == [0, 3]
    assert "model.layers.1.self_attn.kv_b_proj.weight" in names


def test_layout_check_names_the_linear_attention_heads():
    from megatron_fp8pb.plan.validate import check_layout
    d = dims_from_hf(_qwen3_next(linear_num_key_heads=1, linear_num_value_heads=4))
    with pytest.raises(ValueError, match=r"linear_num_key_heads\(1\) % tp\(2\) = 1 != 0 \(the linear-attention"):
        check_layout(d, world=2, tp=2, pp=1)
    assert check_layout(d, world=2, tp=1, pp=1) == 2
