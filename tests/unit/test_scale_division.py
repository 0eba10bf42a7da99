"""Why block scales are divided on the CPU: a float32 reciprocal multiply (what CUDA does for ``tensor / scalar``)
is not the correctly rounded ``amax / 448`` of the reference; scale_inv_from_amax is, on every device it is given."""
from __future__ import annotations

import torch

from megatron_fp8pb import blockmath


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
