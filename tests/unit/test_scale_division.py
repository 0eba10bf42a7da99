"""Why block scales are divided on the CPU: a float32 reciprocal multiply (what CUDA does for ``tensor / scalar``)
is not the correctly rounded ``amax / 448`` of the reference; scale_inv_from_amax is, on every device it is given."""
from __future__ import annotations

import torch

from megatron_fp8pb.quant import blockmath


def test_reciprocal_multiply_is_not_the_reference_quotient():
    g = torch.Generator().manual_seed(5)
    amax = (torch.randn(1 << 16, generator=g) * 0.05).abs().to(torch.bfloat16).float()
    reciprocal = amax * (torch.tensor(1.0) / torch.tensor(448.0))
    ref = blockmath.scale_inv_from_amax(amax)
    exact = (amax.double() / 448.0).float()
    assert torch.equal(ref, torch.where(amax == 0, torch.ones_like(exact), exact))
    assert (reciprocal != ref).float().mean() > 0.3      # the CUDA shortcut would be off for a third or more


def test_scale_values_and_the_all_zero_block():
    amax = torch.tensor([[1.0, 0.0], [448.0, 3.5]])
    assert torch.equal(blockmath.scale_inv_from_amax(amax), torch.tensor([[1 / 448, 1.0], [1.0, 3.5 / 448]]))


def test_grids_of_a_unit_share_one_round_trip_and_match_one_by_one():
    g = torch.Generator().manual_seed(2)
    grids = [torch.rand(3, 5, generator=g) * 10, torch.zeros(2, 2), torch.rand(1, 7, generator=g)]
    fmts = ["amax", "ue8m0", "ue8m0"]
    got = blockmath.scales_from_amax_grids(grids, fmts)
    for a, f, s in zip(grids, fmts, got):
        assert torch.equal(s, blockmath.scale_inv_from_amax(a, f))
    assert blockmath.scales_from_amax_grids([], []) == []
