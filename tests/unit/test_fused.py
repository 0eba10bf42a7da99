import torch

from megatron_fp8pb.plan.fused import merge_gated, merge_qkv, split_gated, split_qkv


def test_qkv_split_follows_query_groups():
    groups, hpg, hd, k = 2, 3, 4, 5
    q = torch.arange(groups * hpg * hd * k).reshape(-1, k).float()
    kk = -torch.arange(groups * hd * k).reshape(-1, k).float()
    v = 1000 + torch.arange(groups * hd * k).reshape(-1, k).float()
    fused = merge_qkv(q, kk, v, groups, hpg, hd)
    # group 0 block: q heads 0..2, then k head 0, then v head 0
    assert torch.equal(fused[:hpg * hd], q[:hpg * hd])
    assert torch.equal(fused[hpg * hd:(hpg + 1) * hd], kk[:hd])
    assert torch.equal(fused[(hpg + 1) * hd:(hpg + 2) * hd], v[:hd])
    q2, k2, v2 = split_qkv(fused, groups, hpg, hd)
    assert torch.equal(q2, q) and torch.equal(k2, kk) and torch.equal(v2, v)


def test_qkv_bias_and_gated_round_trip():
    b = torch.randn(2 * (4 + 2) * 8)
    assert torch.equal(merge_qkv(*split_qkv(b, 2, 4, 8), 2, 4, 8), b)
    fc1 = torch.randn(2 * 10, 6)
    gate, up = split_gated(fc1)
    assert torch.equal(gate, fc1[:10]) and torch.equal(merge_gated(gate, up), fc1)
