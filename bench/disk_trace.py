"""What the disks did while a command ran: MB read and written per interval, summed over the whole disks of
/proc/diskstats (partitions, loop and zram devices left out), so that the idle stretches of an export show against
its own marks (imports, process group, export).

  with DiskTrace() as trace:
      subprocess.run(...)
  print(trace.table(step=0.5))
"""
from __future__ import annotations

import os
import threading
import time

SECTOR = 512
SKIPPED = ("loop", "zram", "ram", "dm-", "md", "sr")


def whole_disks() -> set[str]:
    """Block devices that are whole disks (``/sys/block`` entries, partitions are not), virtual ones left out."""
    try:
        return {d for d in os.listdir("/sys/block") if not d.startswith(SKIPPED)}
    except OSError:
        return set()


def read_counters(disks: set[str]) -> tuple[int, int]:
    """(bytes read, bytes written) since boot, summed over ``disks``."""
    rd = wr = 0
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if len(p) > 9 and p[2] in disks:
                rd += int(p[5]) * SECTOR
                wr += int(p[9]) * SECTOR
    return rd, wr


class DiskTrace:
    """Samples the disk counters every ``interval`` seconds on a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.disks = whole_disks()
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-trace", daemon=True)

    def _sample(self) -> None:
        self.samples.append((time.perf_counter(), *read_counters(self.disks)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "DiskTrace":
        if self.disks:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.disks:
            self._stop.set()
            self._thread.join()
            self._sample()

    def rows(self, step: float = 0.5) -> list[tuple[float, float, float]]:
        """(seconds since the start, MB/s read, MB/s written) per ``step`` seconds."""
        if len(self.samples) < 2:
            return []
        t0 = self.samples[0][0]
        out, prev = [], self.samples[0]
        for s in self.samples[1:]:
            if s[0] - prev[0] >= step or s is self.samples[-1]:
                dt = s[0] - prev[0]
                out.append((s[0] - t0, (s[1] - prev[1]) / dt / 1e6, (s[2] - prev[2]) / dt / 1e6))
                prev = s
        return out

    def totals(self) -> tuple[float, float]:
        """(GB read, GB written) over the whole trace."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        a, b = self.samples[0], self.samples[-1]
        return (b[1] - a[1]) / 1e9, (b[2] - a[2]) / 1e9

    def table(self, step: float = 0.5) -> str:
        """One line per ``step``: the time and the read / write rates, with a bar of each (R read, W written; one
        character per 100 MB/s)."""
        if not self.disks:
            return "disk trace: no whole disk found in /sys/block"
        gb_r, gb_w = self.totals()
        lines = [f"disk trace ({', '.join(sorted(self.disks))}): {gb_r:.2f} GB read, {gb_w:.2f} GB written",
                 "    s   read MB/s  write MB/s"]
        for t, r, w in self.rows(step):
            lines.append(f"{t:5.1f} {r:10.0f} {w:11.0f}  {'R' * round(r / 100)}{'W' * round(w / 100)}")
        return "\n".join(lines)
