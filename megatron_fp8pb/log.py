"""Rank-0 logging through one helper."""
from __future__ import annotations

import logging
import sys

from megatron_fp8pb.parallel import collectives

_logger = logging.getLogger("megatron_fp8pb")


def log0(msg: str, level: int = logging.INFO) -> None:
    """Log on global rank 0 only; ``logging.DEBUG`` lines show with ``FP8PB_DEBUG=1``."""
    if collectives.rank() == 0:
        if not _logger.handlers:
            from megatron_fp8pb.errors import debug
            h = logging.StreamHandler(sys.stdout)
            h.setFormatter(logging.Formatter("[fp8pb] %(message)s"))
            _logger.addHandler(h)
            _logger.setLevel(logging.DEBUG if debug() else logging.INFO)
            _logger.propagate = False
        _logger.log(level, msg)
        sys.stdout.flush()


def warn0(msg: str) -> None:
    """A warning on global rank 0 only, to stderr, set off so that it is not missed among the progress lines."""
    if collectives.rank() == 0:
        bar = "!" * 100
        print(f"{bar}\n[fp8pb] WARNING: {msg}\n{bar}", file=sys.stderr, flush=True)


# megatron-core warnings that say nothing about an export: optional fused kernels (TransformerEngine, Apex) are
# missing, so its local implementations are used; a CUDA-graph option we never set is deprecated.
KNOWN_HARMLESS = (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                  r"full scope is deprecated")


def quiet_known_warnings() -> None:
    """Silence KNOWN_HARMLESS (call before megatron.core is imported); every other warning still shows."""
    import warnings
    for pattern in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
