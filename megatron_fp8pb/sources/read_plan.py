"""The order a source's bytes are read in: as they lie in its files, each file from its first byte to its last, a few
files at a time.

One plan serves the readahead (into the page cache, started before torch is imported: this module is torch-free),
the export's reader (``layout_reader``) and the order units are exported in (``unit_order``), so the three agree. The
plan is a clock of bytes: every file lane reads at the same rate, a file starts on the lane that frees first, and a
tensor's bytes arrive at ``[start, end)`` on that clock. A unit is ready when its last tensor has arrived; units are
exported in that order, the same on every rank (every rank plans from the same files).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

FILES_AT_ONCE = 2       # files read at the same time: enough to keep a disk busy across a file's end, few enough
                        # that a unit's bytes arrive soon after the reading starts


class Timed(NamedTuple):
    """A byte range of a file and when, on the plan's clock, its first and last bytes arrive."""
    name: str
    file: Path
    first_byte: int
    length: int
    start: int
    end: int


def schedule(ranges: list[tuple[str, Path, int, int]], files_at_once: int = FILES_AT_ONCE) -> list[Timed]:
    """``[(name, file, first byte, length)]`` -> the same ranges timed, in the order they are read.

    Files are taken in name order (``model-00001-of-...`` first), each on the lane that frees first; within a file
    the ranges go by ascending offset. Only the bytes of ``ranges`` count (a pipeline stage skips the other layers).
    The result is sorted by start time, then file name: each file's ranges ascend, and the lanes interleave."""
    by_file: dict[Path, list[tuple[str, Path, int, int]]] = {}
    for r in ranges:
        by_file.setdefault(Path(r[1]), []).append(r)
    lanes = [0] * max(1, min(files_at_once, len(by_file)))
    out: list[Timed] = []
    for f in sorted(by_file, key=str):
        k = min(range(len(lanes)), key=lambda i: (lanes[i], i))
        t = lanes[k]
        for name, _, first, n in sorted(by_file[f], key=lambda r: (r[2], r[0])):
            out.append(Timed(name, f, first, n, t, t + n))
            t += n
        lanes[k] = t
    out.sort(key=lambda r: (r.start, str(r.file), r.first_byte))
    return out


def unit_order(ranges: list[tuple[str, Path, int, int]], unit_of: dict[str, int], units: list[int],
               files_at_once: int = FILES_AT_ONCE) -> list[int]:
    """``units`` in the order their bytes have all arrived under ``schedule(ranges)``; ``unit_of``: tensor name ->
    its unit (names it lacks are not waited for). Ties, and units no range belongs to (last), keep the order of
    ``units``."""
    ready: dict[int, int] = {}
    for r in schedule(ranges, files_at_once):
        u = unit_of.get(r.name)
        if u is not None:
            ready[u] = max(ready.get(u, 0), r.end)
    pos = {u: i for i, u in enumerate(units)}
    never = float("inf")
    return sorted(units, key=lambda u: (ready.get(u, never), pos[u]))


def chunked(timed: list[Timed], chunk: int) -> list[tuple[str, Path, int, int, int]]:
    """The timed ranges cut into reads of at most ``chunk`` bytes, in the order they are read (by start time, then
    file): ``[(name, file, first byte, length, start)]``."""
    out = []
    for r in timed:
        out += [(r.name, r.file, r.first_byte + k, min(chunk, r.length - k), r.start + k)
                for k in range(0, r.length, chunk)]
    out.sort(key=lambda c: (c[4], str(c[1]), c[2]))
    return out
