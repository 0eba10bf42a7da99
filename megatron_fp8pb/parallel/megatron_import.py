"""Importing megatron-core into the command line's export process, which never runs the model: without torch's
compiler stack, with the bytecode ``bytecode_early`` compiled meanwhile, and without the optional packages that
megatron-core's import pulls in for features the export does not use (seconds from a cold disk)."""
from __future__ import annotations

import contextlib
import importlib
import sys

from megatron_fp8pb import bytecode_early

# what the export of a Megatron source imports from megatron-core and torch (the rest of megatron-core's modules are
# imported by these), imported together where ``bytecode_early`` helpers compiled them
MEGATRON_MODULES = ("megatron.core", "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.dist_checkpointing",
                    "megatron.core.dist_checkpointing.strategies.torch",
                    "megatron.core.transformer.multi_latent_attention", "torch.distributed.checkpoint")

# optional imports on that path, each made under ``try: ... except ImportError`` by its importer, for what the export
# never does: megatron.core.timers' loggers (tensorboard 1.0 s and wandb, from a cold disk), and setuptools'
# Cython-based build_ext (0.5 s), reached through torch.utils.cpp_extension. Refused while megatron-core is imported,
# as if not installed. Importable again afterwards, but what was imported meanwhile keeps its "not installed" choice
# (megatron.core.timers' wandb and SummaryWriter None, setuptools' build_ext the distutils one): the CLI's process
# uses none of them.
REFUSED_OPTIONAL = ("torch.utils.tensorboard", "wandb", "Cython")


@contextlib.contextmanager
def refused(names: tuple[str, ...]):
    """``import`` of any of ``names`` (or of their submodules) raises ImportError inside the block, unless the
    module was already imported; afterwards they import as usual."""
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = None       # the import system's "not importable" marker
    try:
        yield
    finally:
        for n in added:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]


def import_without_compiling() -> None:
    """Import megatron.core with ``torch.compile`` a plain decorator while it is imported: its fused functions are
    decorated with torch.compile at import time, which imports torch's compiler stack (seconds from a cold disk). For
    a process that never runs the model (the CLI export builds it, or only describes it on the meta device); the
    in-process API leaves the caller's megatron.core as it is."""
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
        with bytecode_early.used(), refused(REFUSED_OPTIONAL):
            for name in MEGATRON_MODULES:
                importlib.import_module(name)
    finally:
        torch.compile = real
