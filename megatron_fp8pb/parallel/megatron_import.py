"""Importing megatron-core into the command line's export process, which never runs the model.

megatron-core decorates its fused functions with ``torch.compile`` at import time, which imports torch's compiler
stack (seconds from a cold disk); the export's process only builds or describes the model, so ``torch.compile`` is a
plain decorator while megatron-core is imported, and torch's own afterwards.
"""
from __future__ import annotations

import importlib
import sys

# what the export of a Megatron source imports from megatron-core and torch (the rest comes in through these)
MEGATRON_MODULES = ("megatron.core", "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.dist_checkpointing",
                    "megatron.core.dist_checkpointing.strategies.torch",
                    "megatron.core.transformer.multi_latent_attention", "torch.distributed.checkpoint")


def import_without_compiling() -> None:
    """Import megatron.core with ``torch.compile`` a plain decorator meanwhile; a no-op where it is imported already
    (the in-process API leaves the caller's megatron.core as it is)."""
    if "megatron.core" in sys.modules:
        return
    import torch

    from megatron_fp8pb.log import quiet_known_warnings
    quiet_known_warnings()      # before megatron.core is imported
    real = torch.compile

    def plain(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)
    torch.compile = plain
    try:
        for name in MEGATRON_MODULES:
            importlib.import_module(name)
    finally:
        torch.compile = real
