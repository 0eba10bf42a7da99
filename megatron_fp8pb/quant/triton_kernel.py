"""Triton GPU path of the reference block-FP8 quantizer, byte-identical to ``blockmath`` / ``blockfp8``.

One kernel, one program per 128x128 block, in three modes:
  amax      x [n, K] -> max|x| per block (``blockmath.partial_block_amax``),
  quantize  x [n, K], scale per block -> e4m3fn (``blockmath.quantize_piece``),
  fused     x [N, K] -> amax, scale = amax/448 (1.0 for a zero block), e4m3fn, in one pass over x; with
            POW2 (scale_fmt "ue8m0") the scale is rounded up to a power of two by exponent-bit arithmetic, as
            ``blockmath.pow2_ceil``.
A piece may start ``lead`` rows into its first block (row ``i`` of the piece is row ``lead + i`` of the block grid).
Divisions are IEEE round-to-nearest (``div_rn``); the e4m3fn cast is round-to-nearest-even after the clamp to +-448,
as torch's ``.to(torch.float8_e4m3fn)``. Triton is imported on first use, so this module imports without it.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from megatron_fp8pb.quant.blockmath import FP8_MAX, check_scale_fmt, num_blocks
from megatron_fp8pb.quant.format import FORMAT

_AMAX, _QUANT, _FUSED = 0, 1, 2
_NUM_WARPS = 8


def available() -> bool:
    """True when triton imports and a CUDA device with native e4m3 conversion (compute capability >= 8.9) is present."""
    try:
        import triton  # noqa: F401
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    except Exception:
        return False


_warming: threading.Thread | None = None


def warm_up(device: torch.device) -> None:
    """Compile the kernel's three modes for bf16 weights on a background thread: a cold compile takes seconds, which
    then overlap the export's start. Until it is done ``ready()`` is False and the callers take the plain torch
    path, which gives the same bytes."""
    global _warming
    if _warming is not None or not available():
        return

    def compile_modes():
        try:
            with torch.cuda.device(device):
                x = torch.ones(2048, 2048, dtype=torch.bfloat16, device=device)
                _, s = quantize(x)
                block_amax(x, 0)
                quantize_rows(x, s, 0)
                torch.cuda.current_stream().synchronize()
        except Exception:   # noqa: BLE001 - a failed warm-up only means the first real call compiles (and reports)
            pass
    _warming = threading.Thread(target=compile_modes, name="fp8pb-triton-warm-up", daemon=True)
    _warming.start()


def ready() -> bool:
    """False while ``warm_up`` is still compiling."""
    return _warming is None or not _warming.is_alive()


def usable(t: torch.Tensor) -> bool:
    """Whether the kernel is the one to run on ``t`` now: a CUDA tensor, triton and an e4m3 GPU present, and no
    warm-up still compiling."""
    return t.is_cuda and ready() and available()


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def block_kernel(x_ptr, q_ptr, s_ptr, n, k, stride_x, lead, n_bcols,
                     MODE: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, POW2: tl.constexpr):
        pid = tl.program_id(0)
        bi = pid // n_bcols
        bj = pid % n_bcols
        rows = bi * BLOCK - lead + tl.arange(0, BLOCK)
        cols = bj * BLOCK + tl.arange(0, BLOCK)
        mask = ((rows >= 0) & (rows < n))[:, None] & (cols < k)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            scale = tl.load(s_ptr + pid)
        else:
            amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
            if MODE == 0:
                tl.store(s_ptr + pid, amax)
            else:
                scale = tl.math.div_rn(amax, FP8_MAX)
                if POW2:
                    # blockmath.pow2_ceil: least power of two >= scale by exponent bits; a subnormal scale through
                    # its integer mantissa m (exact as a float32): the least power of two >= m has its result's bits
                    bits = scale.to(tl.int32, bitcast=True)
                    normal = tl.where((bits & 0x7FFFFF) == 0, bits, ((bits >> 23) + 1) << 23)
                    m = (bits & 0x7FFFFF).to(tl.float32).to(tl.int32, bitcast=True)
                    sub = tl.where((m & 0x7FFFFF) == 0, m, ((m >> 23) + 1) << 23)
                    sub = sub.to(tl.float32, bitcast=True).to(tl.int32)
                    sub = tl.where(bits == 0, 1, sub)     # 0 (an underflowed amax/448) -> 2^-149
                    scale = tl.where((bits >> 23) == 0, sub, normal).to(tl.float32, bitcast=True)
                scale = tl.where(amax == 0.0, 1.0, scale)
                tl.store(s_ptr + pid, scale)
        if MODE != 0:
            q = tl.math.div_rn(x, tl.broadcast_to(scale, (BLOCK, BLOCK)))
            q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + rows64 * k + cols[None, :], q.to(tl.float8e4nv), mask=mask)

    return block_kernel


def _prep(x: torch.Tensor, lead: int, block: int) -> torch.Tensor:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"expected a 2-D bf16/fp16/fp32 tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
    if not 0 <= lead < block:
        raise ValueError(f"lead must be in [0, {block}), got {lead}")
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _grid_shape(x: torch.Tensor, lead: int, block: int) -> tuple[int, int]:
    n, k = x.shape
    return (num_blocks(lead + n, block) if n else 0), num_blocks(k, block)


def _launch(mode: int, x: torch.Tensor, q: torch.Tensor | None, s: torch.Tensor, lead: int, block: int,
            pow2: bool = False) -> None:
    n, k = x.shape
    if s.numel() == 0:
        return
    stride = x.stride(0) if n > 1 else k
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _kernel()[(s.numel(),)](x, s if q is None else q, s, n, k, stride, lead, s.shape[1],
                                MODE=mode, BLOCK=block, FP8_MAX=FP8_MAX, POW2=pow2, num_warps=_NUM_WARPS)


def block_amax(x: torch.Tensor, lead: int, block: int = FORMAT.block) -> torch.Tensor:
    """x [n, K] sitting ``lead`` rows into its first block -> float32 [ceil((lead+n)/block), ceil(K/block)] of max|x|.

    Equals ``blockmath.partial_block_amax(x, 0, offset, block)`` for any ``offset % block == lead``.
    """
    x = _prep(x, lead, block)
    amax = torch.empty(_grid_shape(x, lead, block), dtype=torch.float32, device=x.device)
    _launch(_AMAX, x, None, amax, lead, block)
    return amax


def quantize_rows(x: torch.Tensor, scale_rows: torch.Tensor, lead: int, block: int = FORMAT.block) -> torch.Tensor:
    """x [n, K], scale_rows float32 [ceil((lead+n)/block), ceil(K/block)] -> float8_e4m3fn [n, K].

    q = clamp(x / scale, -448, 448) cast with round-to-nearest-even; equals ``blockmath.quantize_piece(x, full, 0,
    offset, block)`` byte for byte when ``full[offset // block:][:len(scale_rows)] == scale_rows``.
    """
    x = _prep(x, lead, block)
    want = _grid_shape(x, lead, block)
    if tuple(scale_rows.shape) != want:
        raise ValueError(f"scale_rows shape {tuple(scale_rows.shape)} does not match x {tuple(x.shape)} "
                         f"at lead {lead}: expected {want}")
    scale_rows = scale_rows.to(device=x.device, dtype=torch.float32).contiguous()
    q = torch.empty(x.shape, dtype=FORMAT.fp8_dtype, device=x.device)
    _launch(_QUANT, x, q, scale_rows, lead, block)
    return q


def quantize(w: torch.Tensor, block: int = FORMAT.block, scale_fmt: str = "amax") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qdata float8_e4m3fn [N, K], scale_inv float32 [ceil(N/block), ceil(K/block)]) in one pass.

    scale_inv = amax/448 per block (1.0 for an all-zero block), rounded up to a power of two for scale_fmt "ue8m0",
    as ``blockmath.scale_inv_from_amax(amax, scale_fmt)``.
    """
    check_scale_fmt(scale_fmt)
    w = _prep(w, 0, block)
    scale_inv = torch.empty(_grid_shape(w, 0, block), dtype=torch.float32, device=w.device)
    q = torch.empty(w.shape, dtype=FORMAT.fp8_dtype, device=w.device)
    _launch(_FUSED, w, q, scale_inv, 0, block, scale_fmt == "ue8m0")
    return q, scale_inv


__all__ = ["available", "usable", "ready", "warm_up", "block_amax", "quantize_rows", "quantize"]
