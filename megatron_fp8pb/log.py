"""Rank-0 logging through one helper."""
from __future__ import annotations

import logging
import sys

from . import collectives

_logger = logging.getLogger("megatron_fp8pb")


def log0(msg: str) -> None:
    """Log on global rank 0 only."""
    if collectives.rank() == 0:
        if not _logger.handlers:
            h = logging.StreamHandler(sys.stdout)
            h.setFormatter(logging.Formatter("[fp8pb] %(message)s"))
            _logger.addHandler(h)
            _logger.setLevel(logging.INFO)
            _logger.propagate = False
        _logger.info(msg)
        sys.stdout.flush()
