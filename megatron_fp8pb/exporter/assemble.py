"""Rank 0's (or a node writer's) side of the export: each full HF tensor built in a staging slab from its pieces,
local or received from the rank that quantized them, and handed to the background writer.

A slab holds a whole tensor; a tensor of row (dim 0) pieces only that is larger than a slab is streamed to the writer
in row chunks instead. Scale rows of blocks that straddle two ranks' pieces must agree."""
from __future__ import annotations

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.exporter.naming import grid_shape, nbytes, out_dtype_of, scale_name
from megatron_fp8pb.output.staging import SlabPool
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.quant import blockmath
from megatron_fp8pb.quant.format import FORMAT


def cuda_event():
    """An event after the device-to-host copies queued so far (None without CUDA): the writer thread waits on it."""
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class Assembler:
    """A writer: builds each full HF tensor in a staging slab from its pieces (local or received) and hands it to the
    background writer; straddling scale rows from different ranks must agree."""

    def __init__(self, writer, traffic: coll.Traffic, device: torch.device, out_dtype, pool: SlabPool, me: int = 0):
        self.writer, self.traffic, self.device, self.out_dtype, self.pool = writer, traffic, device, out_dtype, pool
        self.me = me

    def tensor(self, tiles: list[Piece], local: dict[tuple, tuple]) -> None:
        p0 = tiles[0]
        name = p0.hf_name
        dtype = out_dtype_of(p0, self.out_dtype)
        scale = torch.full(grid_shape(p0), float("nan")) if p0.quantize else None
        whole = nbytes(p0.full_shape, dtype) <= self.pool.slab_bytes
        if whole:
            full, slab = self.pool.take(p0.full_shape, dtype, check=self.writer.check)
        try:
            for p in tiles:
                got = local.get((p.hf_name, p.offset)) if p.src == self.me else \
                    recv_piece(p, dtype, self.traffic, self.device)
                if whole:
                    full.narrow(p.dim, p.offset, p.length).copy_(got[0], non_blocking=got[0].is_cuda)
                else:   # larger than a slab (dim-0 pieces only): streamed in row chunks
                    self._stream_rows(name, got[0], p.offset, dtype)
                if p.quantize:
                    place_scale(scale, p, got[1])
        except BaseException:
            if whole:
                self.pool.give_back(slab)
            raise
        if whole:
            self.writer.submit(name, full, cuda_event(), lambda: self.pool.give_back(slab))
        if p0.quantize:
            self.writer.submit(scale_name(name), scale)

    def _stream_rows(self, name: str, piece: torch.Tensor, row0: int, dtype) -> None:
        row_bytes = max(nbytes(piece.shape[1:], dtype), 1)
        step = max(self.pool.slab_bytes // row_bytes, 1)
        for r in range(0, piece.shape[0], step):
            rows = piece[r:r + step]
            buf, slab = self.pool.take(tuple(rows.shape), dtype, check=self.writer.check)
            buf.copy_(rows, non_blocking=rows.is_cuda)
            self.writer.submit(name, buf, cuda_event(), lambda s=slab: self.pool.give_back(s), row0=row0 + r)


def recv_piece(p: Piece, dtype, traffic: coll.Traffic, device: torch.device) -> tuple:
    """Receive piece ``p`` from its rank: its bytes, and for a quantized piece its scale rows (or columns)."""
    shape = list(p.full_shape)
    shape[p.dim] = p.length
    q = coll.recv_tensor(tuple(shape), dtype, p.src, traffic, device)
    if not p.quantize:
        return (q,)
    first, last = blockmath.block_span(p.offset, p.length, FORMAT.block)
    gshape = list(grid_shape(p))
    gshape[p.dim] = last - first
    return q, coll.recv_tensor(tuple(gshape), FORMAT.scale_dtype, p.src, traffic, device)


def place_scale(scale: torch.Tensor, p: Piece, rows: torch.Tensor) -> None:
    """Scale rows (dim 0) or columns (dim 1) of piece ``p`` into the tensor's grid; a block two pieces share must
    have the same scale from both."""
    first, last = blockmath.block_span(p.offset, p.length, FORMAT.block)
    dst = scale[first:last] if p.dim == 0 else scale[:, first:last]
    rows = rows.to(dst.device)
    seen = ~torch.isnan(dst)
    if bool(seen.any()) and not torch.equal(dst[seen], rows[seen]):
        raise RuntimeError(f"{p.hf_name}: ranks disagree on the scale of a block that straddles a shard boundary "
                           f"(piece at offset {p.offset} from rank {p.src})")
    dst.copy_(rows)


SLAB_MIN = 64 << 20


def slab_bytes(by_name: dict[str, list[Piece]], out_dtype) -> int:
    """Slabs hold whole tensors, except tensors made only of row (dim-0) pieces, which can be streamed in chunks:
    so the largest tensor with a column-sharded piece, and at least 64 MiB."""
    need = SLAB_MIN
    for tiles in by_name.values():
        if any(p.dim != 0 for p in tiles):
            dtype = out_dtype_of(tiles[0], out_dtype)
            need = max(need, nbytes(tiles[0].full_shape, dtype))
    return need
