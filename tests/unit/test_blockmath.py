"""Pieces at arbitrary offsets, quantized locally with a combined amax, equal the full-tensor reference."""
import pytest
import torch

from megatron_fp8pb.quant import blockmath
from megatron_fp8pb.quant.reference import quantize_blockfp8_reference


def _cuts(lengths):
    at, out = 0, []
    for n in lengths:
        out.append((at, n))
        at += n
    return out


@pytest.mark.parametrize("lengths", [[320], [176, 200], [320, 176, 200], [200, 200, 176, 320], [1, 127, 129, 63]])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("scale_fmt", ["amax", "ue8m0"])
def test_pieces_concatenate_to_reference(lengths, dim, scale_fmt):
    total = sum(lengths)
    other = 300
    shape = (total, other) if dim == 0 else (other, total)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(total + dim)).to(torch.bfloat16)
    ref_q, ref_s = quantize_blockfp8_reference(w, scale_fmt=scale_fmt)
    grid = torch.zeros_like(ref_s)
    for off, n in _cuts(lengths):
        part = blockmath.partial_block_amax(w.narrow(dim, off, n), dim, off)
        first, last = blockmath.block_span(off, n, 128)
        g = grid[first:last] if dim == 0 else grid[:, first:last]
        g.copy_(torch.maximum(g, part))
    scale = blockmath.scale_inv_from_amax(grid, scale_fmt)
    assert torch.equal(scale, ref_s)
    qs = [blockmath.quantize_piece(w.narrow(dim, off, n), scale, dim, off) for off, n in _cuts(lengths)]
    assert torch.equal(torch.cat(qs, dim).view(torch.uint8), ref_q.view(torch.uint8))


def test_block_span():
    assert blockmath.block_span(0, 128, 128) == (0, 1)
    assert blockmath.block_span(120, 16, 128) == (0, 2)
    assert blockmath.block_span(320, 0, 128) == (2, 2)
