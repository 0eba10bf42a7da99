"""One unit's pieces quantized with block amax agreed across their tensor-parallel group, on the kernel that fits.

A CUDA tensor goes through the Triton kernels where they apply (``triton_kernel.usable``), anything else through
``blockmath``, the reference's block math; both give the same bytes (tests/gpu compares them)."""
from __future__ import annotations

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.exporter.naming import grid_shape
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.plan.tp_slices import piece_dtype
from megatron_fp8pb.quant import blockmath
from megatron_fp8pb.quant.reference import BLOCK, quantize_checked


def _partial_amax(t: torch.Tensor, p: Piece) -> torch.Tensor:
    if t.is_cuda:
        from megatron_fp8pb.quant import triton_kernel as blockfp8_triton
        if blockfp8_triton.usable(t):
            x = t if p.dim == 0 else t.t()
            a = blockfp8_triton.block_amax(x, p.offset % BLOCK, BLOCK)
            return a if p.dim == 0 else a.t()
    return blockmath.partial_block_amax(t, p.dim, p.offset, BLOCK)


def _quantize(t: torch.Tensor, scale_inv: torch.Tensor, p: Piece) -> torch.Tensor:
    if t.is_cuda:
        from megatron_fp8pb.quant import triton_kernel as blockfp8_triton
        if blockfp8_triton.usable(t):
            first, rows = blockmath.scale_rows_of_piece(scale_inv, p.dim, p.offset, p.length, BLOCK)
            x, s = (t, rows) if p.dim == 0 else (t.t(), rows.t())
            q = blockfp8_triton.quantize_rows(x, s.contiguous(), p.offset % BLOCK, BLOCK)
            return q if p.dim == 0 else q.t().contiguous()
    return blockmath.quantize_piece(t, scale_inv, p.dim, p.offset, BLOCK)


def quantize_unit(items: list[tuple[Piece, torch.Tensor]], groups, traffic: coll.Traffic, out_dtype: torch.dtype):
    """Pieces of one unit -> payloads: (qdata, scale rows) for quantized pieces, the tensor in out_dtype otherwise.

    Block amax is made global with one MAX all-reduce per axis group ("tp", "etp") over full-size amax grids.
    """
    payload: dict[int, tuple] = {}
    # whole on this rank (replicated, or a 1-way split): the fused single-pass quantizer, no collective
    for k, (p, t) in enumerate(items):
        if p.quantize and p.axis is None:
            payload[k] = quantize_checked(t, BLOCK, p.scale_fmt)
    for axis in ("tp", "etp"):
        todo = [(k, p, t) for k, (p, t) in enumerate(items) if p.quantize and p.axis == axis]
        # one grid per HF tensor: a rank may hold several row ranges of one tensor (a fused tensor whose parts lie
        # apart in the HF tensor), and blocks straddling two of them take the MAX of both
        grids: dict[str, torch.Tensor] = {}
        for _, p, t in todo:
            grid = grids.get(p.hf_name)
            if grid is None:
                grid = grids[p.hf_name] = torch.zeros(grid_shape(p), dtype=torch.float32, device=t.device)
            first, last = blockmath.block_span(p.offset, p.length, BLOCK)
            dst = grid[first:last] if p.dim == 0 else grid[:, first:last]
            dst.copy_(torch.maximum(dst, _partial_amax(t, p)))
        names = list(grids)
        fmts = {p.hf_name: p.scale_fmt for _, p, _ in todo}
        reduced = coll.allreduce_amax(list(grids.values()), getattr(groups, axis), traffic, groups.device)
        scales = dict(zip(names, blockmath.scales_from_amax_grids(reduced, [fmts[n] for n in names])))
        for k, p, t in todo:
            scale_inv = scales[p.hf_name]
            _, rows = blockmath.scale_rows_of_piece(scale_inv, p.dim, p.offset, p.length, BLOCK)
            payload[k] = (_quantize(t, scale_inv, p), rows)
    for k, (p, t) in enumerate(items):
        if not p.quantize:
            payload[k] = (t.to(piece_dtype(p, out_dtype)).contiguous(),)
    return [payload[k] for k in range(len(items))]

