"""What the export writes, by name: each HF tensor's output tensors, their dtypes and shapes (the writer's specs).

A quantized ``<m>.weight`` [N, K] is written as fp8 ``<m>.weight`` [N, K] and float32 ``<m>.weight_scale_inv``
[ceil(N/128), ceil(K/128)]; any other tensor in its own dtype (``piece_dtype``)."""
from __future__ import annotations

import torch

from megatron_fp8pb.output.writer import TensorSpec
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.plan.tp_slices import piece_dtype
from megatron_fp8pb.quant.format import FORMAT

scale_name = FORMAT.scale_name      # "<m>.weight" -> "<m>.weight_scale_inv"


def grid_shape(p: Piece) -> tuple[int, int]:
    """The scale grid of the full tensor ``p`` is a piece of: [ceil(N/128), ceil(K/128)]."""
    return FORMAT.scale_shape(p.full_shape)


def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def out_dtype_of(p: Piece, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype piece ``p``'s tensor is written in: fp8 when quantized, else its own or ``out_dtype``."""
    return FORMAT.fp8_dtype if p.quantize else piece_dtype(p, out_dtype)


def write_specs(by_name: dict[str, list[Piece]], out_dtype: torch.dtype) -> list[TensorSpec]:
    """Every output tensor in write order (each HF tensor by its pieces' order, its scales after it)."""
    specs = []
    for name, tiles in sorted(by_name.items(), key=lambda kv: kv[1][0].order):
        p = tiles[0]
        specs.append(TensorSpec(name, out_dtype_of(p, out_dtype), p.full_shape))
        if p.quantize:
            specs.append(TensorSpec(scale_name(name), FORMAT.scale_dtype, grid_shape(p)))
    return specs
