"""The output format, block-FP8 W8A8 as FORMAT.md defines it, in one object.

Every constant of the format lives here: the block size, the fp8 dtype and its largest finite value, the scale
tensor's name, dtype and shape, and the ``quantization_config`` written into ``config.json``. The exporter, the
writers, ``verify`` and the serve check read them from ``FORMAT``; a second output format (another block size, a
scale encoding) is a second instance or a subclass of ``BlockFP8Format``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_FMTS = ("amax", "ue8m0")   # block scale = amax/448, or that rounded up to a power of two


@dataclass(frozen=True)
class BlockFP8Format:
    """Square weight blocks of ``block`` elements, one float32 dequant multiplier (``weight_scale_inv``) per block."""

    block: int = 128
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    fp8_max: float = 448.0
    fmt: str = "e4m3"
    scale_suffix: str = "_scale_inv"       # "<m>.weight" -> "<m>.weight_scale_inv"
    scale_dtype: torch.dtype = torch.float32
    activation_scheme: str = "dynamic"

    def scale_name(self, weight_name: str) -> str:
        """The scale tensor's name beside a quantized weight: ``<m>.weight`` -> ``<m>.weight_scale_inv``."""
        return weight_name + self.scale_suffix

    def weight_of_scale(self, name: str) -> str | None:
        """The weight a scale tensor belongs to, or None when ``name`` is not a scale tensor's name."""
        return name[:-len(self.scale_suffix)] if name.endswith(self.scale_suffix) else None

    def blocks(self, n: int) -> int:
        """How many blocks cover ``n`` elements along one dim (the last one may be partial)."""
        return -(-n // self.block)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The scale tensor's shape for a weight of ``shape`` [N, K]: [ceil(N/block), ceil(K/block)]."""
        return self.blocks(shape[0]), self.blocks(shape[1])

    def quantization_config(self, not_converted: list[str], scale_fmt: str = "amax") -> dict:
        """``config.json``'s ``quantization_config``; ``scale_fmt`` appears only for ue8m0 (amax scales write none)."""
        qc = {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": self.activation_scheme,
              "weight_block_size": [self.block, self.block], "modules_to_not_convert": list(not_converted),
              "ignored_layers": list(not_converted)}
        if scale_fmt != "amax":
            qc["scale_fmt"] = scale_fmt
        return qc


FORMAT = BlockFP8Format()
