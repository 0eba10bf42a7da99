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

    @property
    def finished(self) -> bool:
        """Every read done, or the readahead closed."""
        return self._stop or not any(t.is_alive() for t in self._threads)

    @property
    def closed(self) -> bool:
        """Stopped (``stop``): a later export of the source starts a new one."""
        return self._stop

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


def chunk_order(chunks: list, num_layers: int, pp: int = 1, pp_rank: int = 0, ep: int = 1, ep_rank: int = 0,
                num_experts: int = 0) -> list:
    """The saved chunks (``distcp_layout.SavedChunk``) a pipeline stage reads, in the order the export takes units
    (``plan.unit_sequence``, as ``stage_order``), each unit's chunks by file and ascending offset; the embedding on
    the first stage only (the export of a tied output layer is the first stage's). Only the model's
    weights count: ``_extra_state``, optimizer states and anything else a training checkpoint holds are not read.
    With ``ep`` > 1 a layer's routed experts are only those of expert-parallel rank ``ep_rank`` where the chunk's
    expert axis tells (the axis after the layer's; Megatron's contiguous split of ``num_experts``)."""
    from megatron_fp8pb.sources.distcp_layout import chunk_expert, chunk_layer
    layers = {at[0] for c in chunks if (at := chunk_layer(c.key, c.offset, num_layers))}
    final = max(num_layers, max(layers, default=-1) + 1) + 1    # after every decoder and MTP layer
    pos = {u: i for i, u in enumerate(unit_sequence(final))}
    first, last = pp_rank == 0, pp_rank == pp - 1
    mine = stage_layer_range(num_layers, pp, pp_rank)
    per = num_experts // ep if ep > 1 and num_experts and num_experts % ep == 0 else 0
    keyed = []
    for c in chunks:
        if "_extra_state" in c.key:
            continue
        at = chunk_layer(c.key, c.offset, num_layers)
        if at is not None:
            layer, axis = at
            if not (layer in mine or (last and layer >= num_layers)):
                continue
            expert = chunk_expert(c.key, c.offset, axis) if per else None
            if expert is not None and expert < num_experts and expert // per != ep_rank:
                continue
            unit = 1 + layer
        elif c.key.startswith("embedding."):
            if not first:       # a tied output layer is not read on the last stage: the first stage's is exported
                continue
            unit = 0
        elif c.key.startswith(("output_layer.", "decoder.final_layernorm.", "decoder.final_norm.")):
            if not last:
                continue
            unit = final
        else:
            continue
        keyed.append((pos[unit], str(c.file), c.first_byte, c))
    return [c for *_, c in sorted(keyed, key=lambda k: k[:3])]


def start_checkpoint(path: str | os.PathLike, num_layers: int | None = None, pp: int = 1, pp_rank: int = 0,
                     ep: int = 1, ep_rank: int = 0, num_experts: int = 0) -> Readahead | None:
    """The readahead of a Megatron distributed checkpoint for this stage and expert-parallel rank: its saved chunks
    in the export's order (``chunk_order``), each named by ``distcp_layout.chunk_name`` for ``consumed``; whole data
    files in name order where ``.metadata`` cannot be read without torch or ``num_layers`` is unknown. Started once
    per source and process (the command line's, then found by the export) until ``stop``."""
    from megatron_fp8pb.sources.distcp_layout import saved_chunks
    key = os.path.realpath(path)
    with _LOCK:
        if key not in _ACTIVE or _ACTIVE[key].closed:
            chunks = saved_chunks(path) if num_layers is not None else None
            if chunks is not None:
                ranges = [(c.name, c.file, c.first_byte, c.length)
                          for c in chunk_order(chunks, num_layers, pp, pp_rank, ep, ep_rank, num_experts)]
            else:
                ranges = schedule([(str(f), f, 0, f.stat().st_size) for f in sorted(Path(path).glob("*.distcp"))])
            if ranges:
                total = sum(r.length if isinstance(r, Timed) else r[3] for r in ranges)
                _ACTIVE[key] = Readahead(ranges, _window(total))
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


def _text_config(hfc: dict) -> dict:
    """A config.json's language model part (a VLM nests it under ``text_config``)."""
    return hfc.get("text_config", hfc) if "num_hidden_layers" not in hfc else hfc


def num_experts_of(hfc: dict) -> int:
    """Routed experts per MoE layer of a config.json (0: dense)."""
    for k in ("n_routed_experts", "num_experts", "num_local_experts"):
        if hfc.get(k):
            return int(hfc[k])
    return 0


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
        p, world, rank = cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        pp_rank, ep_rank = pp_rank_of(rank, world, p.pp), ep_rank_of(rank, p.ep, p.etp or p.tp)
        if how == "chunks":
            try:
                at = Path(cfg.source.hf_config)
                hfc = _text_config(json.loads((at if at.is_file() else at / "config.json").read_text()))
                layers, experts = int(hfc["num_hidden_layers"]), num_experts_of(hfc)
            except Exception:
                layers, experts = None, 0
            ra = start_checkpoint(cfg.source.path, layers, p.pp, pp_rank, p.ep, ep_rank, experts)
        else:
            hfc = _text_config(json.loads((Path(cfg.source.path) / "config.json").read_text()))
            ra = start(cfg.source.path, int(hfc["num_hidden_layers"]), p.pp, pp_rank, p.ep, ep_rank)
    except Exception:
        return None
    return ra
