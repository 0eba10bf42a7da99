"""Block amax of a piece of a full tensor that sits at a global offset along one dim.

Pure tensor math, no torch.distributed. A piece is ``full[offset:offset+len]`` along ``dim`` (all of the other dim).
Offsets and lengths need not be multiples of the block size: a block that straddles two pieces gets a partial amax
from each, and the caller combines them with MAX (``collectives.allreduce_amax``) into one global amax.
"""
from __future__ import annotations

import torch

from megatron_fp8pb.quant.format import FORMAT, SCALE_FMTS

FP8_MAX = FORMAT.fp8_max
_MANT = 0x7FFFFF


def check_scale_fmt(fmt: str, what: str = "scale_fmt") -> str:
    """``fmt`` if it is a known scale format, else ValueError naming ``what`` and the choices."""
    if fmt not in SCALE_FMTS:
        raise ValueError(f"{what}={fmt!r} is not a known scale format: choose one of {', '.join(SCALE_FMTS)} "
                         f"(amax: scale = amax/448; ue8m0: that rounded up to a power of two)")
    return fmt


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_span(offset: int, length: int, block: int) -> tuple[int, int]:
    """Block indices ``[first, last)`` along one dim touched by rows ``[offset, offset+length)``."""
    if length == 0:
        return offset // block, offset // block
    return offset // block, num_blocks(offset + length, block)


def _to_dim0(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == 0 else x.transpose(0, 1)


def partial_block_amax(piece: torch.Tensor, dim: int, offset: int, block: int = FORMAT.block) -> torch.Tensor:
    """Block amax of a piece at ``offset`` along ``dim``.

    piece [n, K] (dim 0) or [N, k] (dim 1) -> float32 amax of the blocks it touches:
    [last-first, ceil(K/block)] for dim 0, [ceil(N/block), last-first] for dim 1, with (first, last) = block_span(...).
    """
    x = _to_dim0(piece, dim)
    n, k = x.shape
    first, last = block_span(offset, n, block)
    lead = offset - first * block
    rows = (last - first) * block
    cols = num_blocks(k, block) * block
    padded = torch.zeros(rows, cols, dtype=torch.float32, device=x.device)
    padded[lead:lead + n, :k] = x.float().abs()
    amax = padded.view(last - first, block, cols // block, block).amax(dim=(1, 3))
    return _to_dim0(amax, dim)


def scale_inv_from_amax(amax: torch.Tensor, scale_fmt: str = "amax") -> torch.Tensor:
    """Dequant multiplier per block: ``amax / 448`` in float32; an all-zero block gets 1.0.

    scale_fmt "ue8m0": ``amax / 448`` (float32, as above) rounded up to a power of two, ``2^ceil(log2(amax/448))``;
    a nonzero amax below 448 * 2^-150, whose float32 quotient underflows to 0, gets 2^-149 (the least float32 power
    of two, and the ceiling of the exact quotient).
    """
    check_scale_fmt(scale_fmt)
    if amax.device.type != "cpu":
        # computed where the reference computes it: CUDA divides by a Python scalar as a multiplication by its
        # float32 reciprocal, one ulp off the correctly rounded quotient for about half of the block amaxes of bf16
        # weights (the grid is small: one value per 128x128 block)
        return scale_inv_from_amax(amax.cpu(), scale_fmt).to(amax.device)
    amax = amax.float()
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = pow2_ceil(scale)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def scales_from_amax_grids(grids: list[torch.Tensor], scale_fmts: list[str]) -> list[torch.Tensor]:
    """``scale_inv_from_amax`` of each grid, computed on the host in one round trip for all of them (one copy and one
    stream sync per unit, not per tensor), returned where the grids are."""
    if not grids:
        return []
    sizes = [g.numel() for g in grids]
    host = torch.cat([g.reshape(-1).float() for g in grids]).cpu().split(sizes)
    scales = [scale_inv_from_amax(h.view(g.shape), fmt) for h, g, fmt in zip(host, grids, scale_fmts)]
    back = torch.cat([s.reshape(-1) for s in scales]).to(grids[0].device).split(sizes)
    return [b.view(g.shape) for b, g in zip(back, grids)]


def _pow2_ceil_normal_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bits of a positive normal float32 -> bits of the least power of two >= it (exponent + 1, mantissa cleared,
    unless the mantissa is already zero)."""
    return torch.where(bits & _MANT == 0, bits, ((bits >> 23) + 1) << 23)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """float32 x > 0 (finite; subnormals included) -> the least power of two >= x, exactly, by exponent-bit
    arithmetic (no log2): a power of two stays itself, anything above it goes to the next; 0 gives 2^-149, the
    least float32 power of two.

    A subnormal x is its mantissa m times 2^-149; the least power of two >= m (an integer < 2^23, exact as a float32)
    has the same bits as the subnormal result, 2^23 giving 2^-126, the smallest normal.
    """
    bits = x.float().contiguous().view(torch.int32)
    normal = _pow2_ceil_normal_bits(bits)
    m = (bits & _MANT).float().view(torch.int32)                       # m as a (normal) float32, m > 0
    sub = _pow2_ceil_normal_bits(m).view(torch.float32).to(torch.int32)
    sub = torch.where(bits == 0, torch.ones_like(sub), sub)
    return torch.where(bits >> 23 == 0, sub, normal).view(torch.float32)


def expand_scale(scale_rows: torch.Tensor, n: int, k: int, lead: int, block: int) -> torch.Tensor:
    """Per-element scale [n, k] for rows starting ``lead`` rows into the first block of ``scale_rows``."""
    rows = scale_rows.repeat_interleave(block, dim=0)[lead:lead + n]
    return rows.repeat_interleave(block, dim=1)[:, :k]


def quantize_piece(piece: torch.Tensor, scale_inv: torch.Tensor, dim: int, offset: int,
                   block: int = FORMAT.block) -> torch.Tensor:
    """Quantize a piece with the full tensor's scale grid.

    piece [n, K] (dim 0) / [N, k] (dim 1), scale_inv [ceil(N/block), ceil(K/block)] -> qdata float8_e4m3fn of the
    piece's shape.
    The result is byte-identical to the matching slice of quantizing the full tensor.
    """
    x = _to_dim0(piece, dim)
    s = _to_dim0(scale_inv, dim)
    n, k = x.shape
    first, last = block_span(offset, n, block)
    scale = expand_scale(s[first:last], n, k, offset - first * block, block)
    q = torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FORMAT.fp8_dtype)
    return _to_dim0(q, dim).contiguous()


def scale_rows_of_piece(scale_inv: torch.Tensor, dim: int, offset: int, length: int,
                        block: int = FORMAT.block) -> tuple[int, torch.Tensor]:
    """The block rows (dim 0) or block columns (dim 1) of ``scale_inv`` a piece touches: (first, slice)."""
    first, last = block_span(offset, length, block)
    sl = scale_inv[first:last] if dim == 0 else scale_inv[:, first:last]
    return first, sl.contiguous()
