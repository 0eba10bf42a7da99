"""One Triton launch that quantizes a group of whole weights into one packed buffer, byte-identical to the reference.

Each weight is given as a row-strided view ``[G, R, K]`` (a plain weight is ``[1, N, K]``; the q rows of a fused
linear_qkv are ``[groups, heads_per_group * head_dim, K]`` inside the fused tensor), read in place, so a fused
parameter needs no split copy. Row ``r`` of the weight is row ``r % R`` of group ``r // R``. Its qdata
``[G*R, K]`` and scale_inv ``[ceil(G*R/128), ceil(K/128)]`` are written at their offsets in one packed byte
buffer. A table on the GPU (one row of int64 per weight, built once per group: ``Table``) gives each weight's
offset from the first weight in elements, shape, strides and output offsets; program ``pid`` finds its weight by a
binary search of the first block index of each weight. A table whose offsets and row lengths are all multiples of
16 elements tells the compiler so (``ALIGNED``), which gives vector loads and stores; others run unhinted.

The block math is ``triton_kernel``'s fused mode (amax, scale = amax/448 or its power of two, div_rn, clamp,
round-to-nearest-even cast), with one addition: a NaN counts as an infinite magnitude in the block amax, so a block
holding NaN or Inf gets a non-finite scale; ``torch.isfinite`` over the packed scales is the finiteness check.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from megatron_fp8pb.quant.blockmath import FP8_MAX, check_scale_fmt
from megatron_fp8pb.quant.format import FORMAT

# the table's columns
_X, _Q, _S, _N, _K, _R, _SO, _SI, _BC, _START = range(10)
_W = 10
_TORCH_TO_TL = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_kernel(tab_ptr, x_base, q_ptr, s_ptr, T, LOG_T: tl.constexpr, W: tl.constexpr,
                       BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, POW2: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        lo = pid * 0
        for s in tl.static_range(LOG_T):
            cand = lo + (1 << (LOG_T - 1 - s))
            start = tl.load(tab_ptr + cand * W + 9, mask=cand < T, other=pid + 1)
            lo = tl.where(start <= pid, cand, lo)
        row = tab_ptr + lo * W
        x_off = tl.load(row + 0)
        q_off = tl.load(row + 1)
        s_off = tl.load(row + 2)
        n = tl.load(row + 3)
        k = tl.load(row + 4)
        rows_per_group = tl.load(row + 5)
        stride_outer = tl.load(row + 6)
        stride_inner = tl.load(row + 7)
        n_bcols = tl.load(row + 8)
        b = pid - tl.load(row + 9)
        bi = b // n_bcols
        bj = b % n_bcols
        rows = bi * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        cols = bj * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        src = x_off + (rows // rows_per_group) * stride_outer + (rows % rows_per_group) * stride_inner
        dst = q_off + rows * k
        if ALIGNED:     # offsets and row lengths in multiples of 16 elements: vector loads and stores
            src = tl.multiple_of(src, 16)
            dst = tl.multiple_of(dst, 16)
            k = tl.multiple_of(k, 16)
        mask = (rows < n)[:, None] & (cols < k)[None, :]
        x = tl.load(x_base + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mag = tl.where(x == x, tl.abs(x), float("inf"))      # NaN -> an infinite amax, so a non-finite scale
        amax = tl.max(tl.max(mag, axis=1), axis=0)
        scale = tl.math.div_rn(amax, FP8_MAX)
        if POW2:    # blockmath.pow2_ceil, as triton_kernel's fused mode
            bits = scale.to(tl.int32, bitcast=True)
            normal = tl.where((bits & 0x7FFFFF) == 0, bits, ((bits >> 23) + 1) << 23)
            m = (bits & 0x7FFFFF).to(tl.float32).to(tl.int32, bitcast=True)
            sub = tl.where((m & 0x7FFFFF) == 0, m, ((m >> 23) + 1) << 23)
            sub = sub.to(tl.float32, bitcast=True).to(tl.int32)
            sub = tl.where(bits == 0, 1, sub)
            scale = tl.where((bits >> 23) == 0, sub, normal).to(tl.float32, bitcast=True)
        scale = tl.where(amax == 0.0, 1.0, scale)
        tl.store(s_ptr + s_off + bi * n_bcols + bj, scale)
        q = tl.math.div_rn(x, tl.broadcast_to(scale, (BLOCK, BLOCK)))
        q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + dst[:, None] + cols[None, :], q.to(tl.float8e4nv), mask=mask)

    return grouped_kernel


def as_rows(view: torch.Tensor) -> torch.Tensor:
    """A weight view ``[N, K]`` or ``[G, R, K]`` -> ``[G, R, K]``; raises ValueError unless its last dim is dense."""
    v = view.unsqueeze(0) if view.dim() == 2 else view
    if v.dim() != 3 or (v.stride(2) != 1 and v.shape[2] > 1):
        raise ValueError(f"a grouped weight is a [N, K] or [G, R, K] view with unit column stride, got shape "
                         f"{tuple(view.shape)} strides {view.stride()}")
    return v


class Table:
    """The launch table of a group of weights of one dtype: views ``[G, R, K]`` (``as_rows``), and for each the
    byte offset of its qdata and the float32 element offset of its scale_inv in the packed buffer.

    The views must stay where they are (the table holds their addresses): rebuild the table when a parameter's
    storage moves."""

    def __init__(self, views: list[torch.Tensor], q_offsets: list[int], s_offsets: list[int],
                 scale_fmt: str = "amax", block: int = FORMAT.block):
        check_scale_fmt(scale_fmt)
        dtypes = {v.dtype for v in views}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _TORCH_TO_TL:
            raise TypeError(f"a grouped launch takes weights of one bf16/fp16/fp32 dtype, got "
                            f"{sorted(map(str, dtypes))}")
        self.dtype, self.block, self.pow2 = next(iter(dtypes)), block, scale_fmt == "ue8m0"
        self.views = [as_rows(v) for v in views]
        rows, start = [], 0
        self.base = self.views[0] if self.views else None
        size = self.views[0].element_size() if self.views else 1
        base_ptr = self.base.data_ptr() if self.views else 0
        for v, qo, so in zip(self.views, q_offsets, s_offsets):
            g, r, k = v.shape
            n = g * r
            bcols = -(-k // block)
            blocks = -(-n // block) * bcols
            if blocks == 0:
                continue
            rel = v.data_ptr() - base_ptr
            assert rel % size == 0, "weights of one dtype lie at multiples of its size"
            rows.append([rel // size, qo, so, n, k, max(r, 1), v.stride(0), v.stride(1), bcols, start])
            start += blocks
        self.blocks, self.count = start, len(rows)
        self.log_t = max(self.count - 1, 1).bit_length()
        self.aligned = all(x % 16 == 0 for row in rows for x in (row[0], row[1], row[4], row[6], row[7]))
        device = self.views[0].device if self.views else torch.device("cpu")
        self.table = torch.tensor(rows or [[0] * _W], dtype=torch.int64).to(device)

    def launch(self, packed: torch.Tensor) -> None:
        """Quantize every weight of the table into ``packed`` (uint8, its length a multiple of 4, on the views'
        device), on the current stream."""
        if self.blocks == 0:
            return
        with torch.cuda.device(packed.device) if packed.is_cuda else contextlib.nullcontext():
            _kernel()[(self.blocks,)](self.table, self.base, packed.view(FORMAT.fp8_dtype),
                                      packed.view(torch.float32), self.count, LOG_T=self.log_t, W=_W,
                                      BLOCK=self.block, FP8_MAX=FP8_MAX, POW2=self.pow2, ALIGNED=self.aligned,
                                      num_warps=8)
