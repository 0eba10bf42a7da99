"""The reference block-FP8 quantizer and its dequantizer (FORMAT.md, "The reference quantizer").

``quantize_blockfp8`` is the function every exported tensor is compared against. CUDA tensors go through the Triton
kernel in ``blockfp8_triton`` when it is importable; it is tested byte-equal to the plain torch path here.
"""
from __future__ import annotations

import torch

from megatron_fp8pb.quant.blockmath import (FP8_MAX, SCALE_FMTS, check_scale_fmt, num_blocks, partial_block_amax,
                                            quantize_piece, scale_inv_from_amax)

from megatron_fp8pb.quant.format import FORMAT

BLOCK = FORMAT.block     # the default block size of every function here


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` and the first NaN/Inf index of ``w``."""
    if not w.is_floating_point():
        return
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"tensor {name!r} (shape {tuple(w.shape)}, {w.dtype}) holds a non-finite value {w[idx].item()} at index "
            f"{idx}; fix the source weights (an FP8 scale of NaN/Inf would serve garbage)")


def _check_2d(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"tensor {name!r}: block-FP8 quantizes 2-D float weights, got shape {tuple(w.shape)} "
                        f"dtype {w.dtype}; exclude it from quantization (quant.exclude)")


def quantize_blockfp8_reference(w: torch.Tensor, block_size: int = BLOCK, name: str = "tensor",
                                scale_fmt: str = "amax") -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference. w [N, K] -> qdata float8_e4m3fn [N, K], scale_inv float32 [ceil(N/b), ceil(K/b)].

    scale_fmt "amax": scale = amax/448; "ue8m0": that rounded up to a power of two (``blockmath.scale_inv_from_amax``).
    """
    check_scale_fmt(scale_fmt)
    _check_2d(w, name)
    check_finite(w, name)
    scale_inv = scale_inv_from_amax(partial_block_amax(w, 0, 0, block_size), scale_fmt)
    return quantize_piece(w, scale_inv, 0, 0, block_size), scale_inv


def quantize_blockfp8(w: torch.Tensor, block_size: int = BLOCK, name: str = "tensor",
                      scale_fmt: str = "amax") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> qdata float8_e4m3fn [N, K], scale_inv float32 [ceil(N/128), ceil(K/128)].

    amax in float32 per 128x128 block, scale = amax/448 (1.0 for an all-zero block), q = clamp(w/scale, +-448) cast
    with round-to-nearest-even. NaN/Inf -> ValueError naming ``name`` and the first bad index. scale_fmt "ue8m0":
    every scale rounded up to a power of two, 2^ceil(log2(amax/448)).
    """
    check_scale_fmt(scale_fmt)
    _check_2d(w, name)
    check_finite(w, name)
    return quantize_checked(w, block_size, scale_fmt)


def quantize_checked(w: torch.Tensor, block_size: int = BLOCK,
                     scale_fmt: str = "amax") -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_blockfp8 for a 2-D weight already known to be finite: the Triton kernel on CUDA, else the
    reference math."""
    if w.is_cuda:
        from megatron_fp8pb.quant import triton_kernel as blockfp8_triton
        if blockfp8_triton.usable(w):
            return blockfp8_triton.quantize(w, block_size, scale_fmt)
    scale_inv = scale_inv_from_amax(partial_block_amax(w, 0, 0, block_size), scale_fmt)
    return quantize_piece(w, scale_inv, 0, 0, block_size), scale_inv


def dequantize_blockfp8(qdata: torch.Tensor, scale_inv: torch.Tensor, block_size: int = BLOCK,
                        dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """qdata [N, K], scale_inv [ceil(N/b), ceil(K/b)] -> w [N, K] in ``dtype``: ``float(q) * scale_inv[i//b, j//b]``."""
    n, k = qdata.shape
    want = (num_blocks(n, block_size), num_blocks(k, block_size))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match qdata {tuple(qdata.shape)}: "
                         f"expected {want} for block {block_size}")
    scale = scale_inv.float().repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    return (qdata.float() * scale).to(dtype)


def e4m3_error_bound(scale_inv: torch.Tensor, shape: tuple[int, int], block_size: int = BLOCK) -> torch.Tensor:
    """Per-element bound on |dequant - w|: half an e4m3 ulp at the top binade (16) times the block scale.

    The float32 division ``w / scale`` can itself round onto an e4m3 rounding tie, so an observed error may exceed
    this by about one float32 ulp (relative 1e-6): compare with a relative slack of 1e-5."""
    n, k = shape
    scale = scale_inv.float().repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    return scale * 16.0


__all__ = ["quantize_blockfp8", "quantize_blockfp8_reference", "dequantize_blockfp8", "check_finite",
           "e4m3_error_bound", "FP8_MAX", "BLOCK", "SCALE_FMTS"]
