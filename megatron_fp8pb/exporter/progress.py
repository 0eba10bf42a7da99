"""Rank 0's progress line across reading, quantizing and writing, and the phase times of the summary.

Reading and writing run on their own threads; each adds the seconds it spent and the bytes it moved here. Written
bytes are counted when they land on disk (by the writer thread), not when queued. With one writer per node
(``output.writers=node``) the line counts rank 0's writer, named as "rank 0's node"; the summary adds the others.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from megatron_fp8pb.parallel import collectives
from megatron_fp8pb.log import log0


@dataclass
class Phases:
    """Seconds spent per phase (read and write on their threads, so they overlap the rest) and bytes moved."""
    read_s: float = 0.0
    quantize_s: float = 0.0
    write_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    read_bytes: int = 0
    written_bytes: int = 0

    def add(self, phase: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self, phase + "_s", getattr(self, phase + "_s") + seconds)
            if phase == "read":
                self.read_bytes += nbytes
            elif phase == "write":
                self.written_bytes += nbytes

    def summary(self) -> str:
        return (f"read {self.read_s:.1f} s ({self.read_bytes / 1e9:.2f} GB on rank 0, reader thread), quantize "
                f"{self.quantize_s:.1f} s, write {self.write_s:.1f} s ({self.written_bytes / 1e9:.2f} GB, writer "
                f"thread)")


class Progress:
    """One line on rank 0, at most every ``every`` seconds: units quantized, GB read and written with GB/s, ETA from
    the bytes still to write. On a terminal the line is redrawn in place."""

    def __init__(self, phases: Phases, total_write_bytes: int, num_units: int, scope: str = "", every: float = 2.0,
                 quiet: bool = False):
        self.quiet = quiet      # a sink that prints nothing (the in-memory stream, run once per weight push)
        self.phases, self.total, self.units, self.every = phases, max(total_write_bytes, 1), num_units, every
        self.scope = f" ({scope})" if scope else ""     # whose writes are counted, when not all
        self.t0 = time.perf_counter()
        self.last = -1e9
        self.tty = sys.stdout.isatty()

    def finish(self) -> None:
        """The last line, once every write has landed: 100%."""
        self.phases.written_bytes = max(self.phases.written_bytes, self.total) if self.total > 1 else 0
        self.update(self.units, force=True)

    def update(self, units_done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if (not force and now - self.last < self.every) or collectives.rank() != 0 or self.quiet:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        p = self.phases
        rate = p.written_bytes / dt
        eta = f"{(self.total - p.written_bytes) / rate:.0f} s" if rate > 0 else "-"   # none before a write lands
        line = (f"{100 * p.written_bytes / self.total:3.0f}% | quantized {units_done}/{self.units} units | read "
                f"{p.read_bytes / 1e9:.2f} GB ({p.read_bytes / 1e9 / dt:.2f} GB/s) | written "
                f"{p.written_bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB{self.scope} ({rate / 1e9:.2f} GB/s) | ETA "
                f"{eta}")
        if self.tty:
            sys.stdout.write("\r[fp8pb] " + line + ("\n" if force else ""))
            sys.stdout.flush()
        else:
            log0(line)
