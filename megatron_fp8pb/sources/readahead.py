"""Reading an HF source checkpoint into the page cache ahead of the export's reader.

The command line starts it before torch is imported (this module and what it imports are torch-free), so the disk
reads the source while the interpreter imports; the reader then finds its bytes in memory. A few threads read the
tensors this rank's pipeline stage exports as they lie in the files (``read_plan.schedule``: ascending offsets within
each file, a few files at a time), at most ``window`` bytes ahead of the reader, which follows the same plan. The
bytes land in the page cache only (each thread reads into one small reusable buffer), so the process's resident
memory does not grow with the source, and the kernel may drop them again under memory pressure: the readahead only
makes the reader's own reads faster, it is never the source of truth."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from megatron_fp8pb.plan.write_order import unit_sequence
from megatron_fp8pb.plan.ranks import ep_rank_of, pp_rank_of, stage_layer_range
from megatron_fp8pb.sources.kinds import kind
from megatron_fp8pb.sources.read_plan import Timed, chunked, schedule
from megatron_fp8pb.sources.safetensors_layout import byte_ranges

CHUNK = 4 << 20        # bytes per read
THREADS = 8            # reads in flight (the disk's queue depth)
_LAYER = re.compile(r"\blayers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_ACTIVE: dict[str, "Readahead"] = {}
_LOCK = threading.Lock()


class Readahead:
    """Reads ``ranges`` on ``threads`` threads, staying at most ``window`` bytes ahead of the tensor the reader last
    asked for (``consumed``).

    ``ranges``: ``[(tensor name, file, first byte, length)]``, read in that order, or ``read_plan.Timed`` ranges, read
    in the plan's order (the files' lanes interleaved chunk by chunk)."""

    def __init__(self, ranges: list, window: int, threads: int = THREADS, chunk: int = CHUNK):
        self._pos: dict[str, int] = {}
        self._chunks: list[tuple[Path, int, int, int]] = []
        if ranges and isinstance(ranges[0], Timed):
            reads = [c[:4] for c in chunked(ranges, chunk)]
        else:
            reads = [(name, f, start + k, min(chunk, n - k)) for name, f, start, n in ranges
                     for k in range(0, n, chunk)]
        pos = 0
        for name, f, at, n in reads:
            self._pos.setdefault(name, pos)
            self._chunks.append((f, at, n, pos))
            pos += n
        self.order = [name for name in self._pos]     # tensors in the order their first bytes are read
        self.total, self.window, self.chunk = pos, window, chunk
        self.bytes_read = 0
        self._next = self._consumed = 0
        self._stop = False
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name="fp8pb-readahead", daemon=True)
                         for _ in range(min(threads, len(self._chunks)))]
        for t in self._threads:
            t.start()

    def consumed(self, name: str) -> None:
        """The reader has reached tensor ``name``: the window moves up to its start."""
        p = self._pos.get(name)
        if p is not None and p > self._consumed:
            with self._cv:
                self._consumed = max(self._consumed, p)
                self._cv.notify_all()

    def _take(self) -> tuple[Path, int, int, int] | None:
        with self._cv:
            while (not self._stop and self._next < len(self._chunks)
                   and self._chunks[self._next][3] - self._consumed > self.window):
                self._cv.wait()
            if self._stop or self._next >= len(self._chunks):
                return None
            self._next += 1
            return self._chunks[self._next - 1]

    def _run(self) -> None:
        view = memoryview(bytearray(self.chunk))
        while (c := self._take()) is not None:
            f, at, n, _ = c
            try:
                fd = os.open(f, os.O_RDONLY)    # per read: a checkpoint may have thousands of files, none kept open
                try:
                    got = os.preadv(fd, [view[:n]], at)
                finally:
                    os.close(fd)
            except OSError:     # a hint only: the reader meets and names any real read error itself
                continue
            with self._cv:
                self.bytes_read += got

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


def stage_order(names: list[str], num_layers: int, pp: int, pp_rank: int, ep: int = 1, ep_rank: int = 0) -> list[str]:
    """The tensors a pipeline stage reads, in the order the export reads them (``plan.unit_sequence``): the
    embedding (first stage), the first layer, then (last stage) the final norm and lm_head, with the embedding again
    where lm_head is tied to it, then the other decoder layers and (last stage) the multi-token-prediction layers.
    With ``ep`` > 1 a layer's routed experts (``experts.<i>.``) are only those of expert-parallel rank ``ep_rank``
    (Megatron's contiguous split)."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    top = max((int(m.group(1)) for n in names if (m := _LAYER.search(n))), default=-1)
    final = max(num_layers, top + 1) + 1        # the final norm's unit: after every decoder and MTP layer
    pos = {u: i for i, u in enumerate(unit_sequence(final))}
    mine, tied = stage_layer_range(num_layers, pp, pp_rank), not any(n.startswith("lm_head") for n in names)
    experts: dict[int, int] = {}        # layer -> routed experts it has
    for n in names:
        m, e = _LAYER.search(n), _EXPERT.search(n)
        if m and e:
            experts[int(m.group(1))] = max(experts.get(int(m.group(1)), 0), int(e.group(1)) + 1)
    keyed = []
    for n in names:
        m = _LAYER.search(n)
        if m:
            layer = int(m.group(1))
            e = _EXPERT.search(n)
            if e and ep > 1 and experts[layer] % ep == 0 and int(e.group(1)) // (experts[layer] // ep) != ep_rank:
                continue
            if layer in mine or (last and layer >= num_layers):
                keyed.append((pos[1 + layer], n))
        elif "embed" in n:
            if first or (last and tied):
                keyed.append((pos[0 if first else final], n))     # the last stage: read for the tied lm_head
        elif last:
            keyed.append((pos[final], n))
    return [n for _, n in sorted(keyed)]


def start(path: str | os.PathLike, num_layers: int, pp: int = 1, pp_rank: int = 0, ep: int = 1,
          ep_rank: int = 0) -> Readahead:
    """The readahead of ``path`` for this stage and expert-parallel rank, in the order the bytes lie in the files
    (one per source and process: started once, then shared)."""
    key = os.path.realpath(path)
    with _LOCK:
        if key not in _ACTIVE:
            where = byte_ranges(path)
            names = stage_order(list(where), num_layers, pp, pp_rank, ep, ep_rank)
            ranges = schedule([(n,) + where[n] for n in names])
            _ACTIVE[key] = Readahead(ranges, _window(sum(r.length for r in ranges)))
        return _ACTIVE[key]


def start_files(path: str | os.PathLike, files: list[Path]) -> Readahead | None:
    """The readahead of a Megatron distributed checkpoint: its data files whole, from first byte to last, a few files
    at a time (``read_plan.schedule``; where each key's bytes lie is in ``.metadata``, a torch pickle, unread here),
    within the same window (nothing marks them consumed)."""
    key = os.path.realpath(path)
    with _LOCK:
        if key not in _ACTIVE and files:
            ranges = schedule([(str(f), f, 0, f.stat().st_size) for f in files])
            _ACTIVE[key] = Readahead(ranges, _window(sum(r.length for r in ranges)))
        return _ACTIVE.get(key)


def _window(total: int) -> int:
    """Bytes the readahead may run ahead of the reader: at most half the available memory per local rank."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(total, max(256 << 20, mem_available() // (2 * local)))


def stop(path: str | os.PathLike) -> None:
    with _LOCK:
        ra = _ACTIVE.pop(os.path.realpath(path), None)
    if ra is not None:
        ra.close()


def mem_available(cgroup: str = "/sys/fs/cgroup") -> int:
    """Bytes the kernel reports available (page cache it can drop included), within this process's cgroup memory
    limit where one is set (page cache counts against it); 4 GiB where unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (Path(cgroup) / "memory.max").read_text().strip()
        if limit != "max":
            used = int((Path(cgroup) / "memory.current").read_text())
            room = max(int(limit) - used, 0)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return 4 << 30 if avail is None else avail


def start_for_command_line(config_path: str | None, overrides: list[str]) -> Readahead | None:
    """Start reading a source checkpoint before the heavy imports, when the command line names one. Any problem
    with the config or the source is left to the export itself, which names it properly: here it only means no
    readahead."""
    try:
        from megatron_fp8pb.config import load_config
        cfg = load_config(config_path, overrides)
        how = kind(cfg.source.kind).readahead
        if how is None or not cfg.source.path or not cfg.source.readahead:
            return None
        if how == "files":
            ra = start_files(cfg.source.path, sorted(Path(cfg.source.path).glob("*.distcp")))
        else:
            hfc = json.loads((Path(cfg.source.path) / "config.json").read_text())
            hfc = hfc.get("text_config", hfc) if "num_hidden_layers" not in hfc else hfc
            p, world, rank = cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
            ra = start(cfg.source.path, int(hfc["num_hidden_layers"]), p.pp, pp_rank_of(rank, world, p.pp),
                       p.ep, ep_rank_of(rank, p.ep, p.etp or p.tp))
    except Exception:
        return None
    return ra
