"""Streaming sharded safetensors writer (rank 0).

The whole list of tensors (names, dtypes, shapes) is known before any data arrives, so shards and every tensor's byte
offset are planned up front: each arriving tensor is written straight to its place in a preallocated file and nothing
is held in memory. Shard planning follows huggingface_hub's rules (greedy in key order; a weight and its
``weight_scale_inv`` never split). Files go into a sibling ``<out>.partial`` directory renamed into place at the end.

With several writers (``output.writers=node``) every writer plans the same shards from the same list; the first one
creates the directory and the files (headers written, data preallocated), the others open those files and write their
own tensors at the planned offsets (``mine``), and the first one finishes once all have.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import queue
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_fp8pb.config import parse_size  # noqa: F401  (re-exported: the writer's size unit)
from megatron_fp8pb.faults import ExportError, inject
from megatron_fp8pb.quant.format import FORMAT
from megatron_fp8pb.safetensors_dtypes import code_of



@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy in the given order; a tensor and its ``*_scale_inv`` stay together; a group larger than the limit
    gets a shard of its own."""
    groups: list[list[TensorSpec]] = []
    for s in specs:
        if groups and FORMAT.weight_of_scale(s.name) == groups[-1][0].name:
            groups[-1].append(s)
        else:
            groups.append([s])
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for g in groups:
        gsize = sum(s.nbytes for s in g)
        if shards[-1] and size + gsize > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].extend(g)
        size += gsize
    return [s for s in shards if s]


def shard_file_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def shard_header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """safetensors header (8-byte length + JSON padded to 8) and each tensor's absolute file offset.

    Tensors are laid out by element size, largest first, so every tensor starts aligned to its dtype.
    """
    layout = sorted(specs, key=lambda s: -torch.empty((), dtype=s.dtype).element_size())
    header: dict = {"__metadata__": {"format": "pt"}}
    rel, at = {}, 0
    for s in layout:
        header[s.name] = {"dtype": code_of(s.dtype), "shape": list(s.shape), "data_offsets": [at, at + s.nbytes]}
        rel[s.name] = at
        at += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, {name: len(head) + off for name, off in rel.items()}


def _check_room(tmp: Path, out: Path, need: int) -> None:
    """Refuse, before anything is written, an output larger than its filesystem's free space (the shard files are
    made sparse, so a full disk would otherwise show only part way through). A filesystem that reports no size
    (some FUSE mounts) is not checked."""
    try:
        usage = shutil.disk_usage(tmp)
    except OSError:
        return
    free = usage.free
    if usage.total and need > free:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"output.dir {out}: the export writes {_mb(need)} but its filesystem has {_mb(free)} free; "
                         f"free {_mb(need - free)} there or choose an output.dir on another disk")


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def prepare_output(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless ``overwrite``; clear a stale ``.partial`` sibling."""
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output.dir {out} exists and is not empty; choose another output.dir or set "
                              f"output.overwrite=true")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output.dir parent {out.parent} is not a writable directory ({e.strerror}); choose a "
                              f"writable output.dir") from e
    stale = partial_dir(out)
    if stale.exists():
        shutil.rmtree(stale)
    return out


def _sync_file_range():
    try:
        import ctypes
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
        f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return f
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing these bytes to disk now (Linux ``sync_file_range``): the disk works while the
    export goes on, and a shard's fsync waits for its last bytes only, not for the whole shard. Elsewhere a no-op."""
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


class CheckpointWriter:
    """Writes the planned tensors as they arrive, then the index and extra files, then renames into place.

    ``mine``: the names this writer writes (None: all). ``create`` false: the ``.partial`` directory and its files
    were made by another writer of the same plan; open them and check their headers instead."""

    def __init__(self, out_dir: str | os.PathLike, specs: list[TensorSpec], max_shard_size: int | str = "5GB",
                 overwrite: bool = False, *, mine: set[str] | None = None, create: bool = True):
        self.create = create
        self.out = prepare_output(out_dir, overwrite) if create else Path(out_dir).resolve()
        self.tmp = partial_dir(self.out)
        if create:
            self.tmp.mkdir(parents=True)
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError("duplicate tensor names in the write plan")
        self.mine = set(self.specs) if mine is None else set(mine)
        if self.mine - set(self.specs):
            raise KeyError(f"tensor(s) {sorted(self.mine - set(self.specs))[:3]} are not in the write plan")
        shards = plan_shards(specs, parse_size(max_shard_size))
        if create:
            _check_room(self.tmp, self.out, sum(s.nbytes for s in specs))
        self.files: list[Path] = []
        self.where: dict[str, tuple[int, int]] = {}     # name -> (file index, byte offset)
        self.remaining: list[int] = []                  # per file: tensors of ``mine`` not yet written
        self._fds: dict[int, int] = {}
        for k, shard in enumerate(shards):
            path = self.tmp / shard_file_name(k + 1, len(shards))
            head, offsets = shard_header(shard)
            size = len(head) + sum(s.nbytes for s in shard)
            if create:
                with open(path, "wb") as f:
                    f.write(head)
                    f.truncate(size)
            else:
                _check_planned_file(path, head, size)
            self.files.append(path)
            self.remaining.append(sum(s.name in self.mine for s in shard))
            for s in shard:
                self.where[s.name] = (k, offsets[s.name])
        self.written: set[str] = set()
        self._partial: dict[str, int] = {}
        self.bytes_written = 0
        self.phases = None      # a progress.Phases that counts written bytes as they land

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (any device; copied to host) at its planned place."""
        self._check(name, tensor)
        self._pwrite(name, memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))

    def _check(self, name: str, tensor: torch.Tensor, row0: int | None = None) -> None:
        """A whole tensor (``row0`` None) or rows ``[row0, row0 + len)`` of it, matching the plan."""
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not in the write plan")
        if name in self.written:
            raise ValueError(f"tensor {name!r} written twice")
        want = spec.shape if row0 is None else (tensor.shape[0],) + spec.shape[1:]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(want) or (
                row0 is not None and row0 + tensor.shape[0] > spec.shape[0]):
            raise ValueError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)} at row {row0 or 0}, planned "
                             f"{spec.dtype} {spec.shape}")

    def _pwrite(self, name: str, data: memoryview, row0: int = 0) -> None:
        """Write a tensor's bytes, or the bytes of its rows from ``row0`` on; it counts as written once all of its
        bytes are."""
        spec = self.specs[name]
        k, off = self.where[name]
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        off += row0 * row_bytes
        fd = self._fds.get(k)
        if fd is None:
            fd = self._fds[k] = os.open(self.files[k], os.O_WRONLY)
        got = len(data)
        t0 = time.perf_counter()
        start = off
        while len(data):
            n = os.pwrite(fd, data, off)
            data, off = data[n:], off + n
        start_writeback(fd, start, off - start)
        if self.phases is not None:
            self.phases.add("write", time.perf_counter() - t0, got)
        done = self._partial.get(name, 0) + got
        if done < spec.nbytes:
            self._partial[name] = done
            return
        self._partial.pop(name, None)
        self.written.add(name)
        self.bytes_written += spec.nbytes
        self.remaining[k] -= 1
        if self.remaining[k] == 0:
            os.fsync(fd)
            os.close(self._fds.pop(k))

    @property
    def planned_bytes(self) -> int:
        """The bytes of the tensors this writer writes."""
        return sum(self.specs[n].nbytes for n in self.mine)

    def check_complete(self) -> None:
        """Every tensor of ``mine`` written (and so each of its files fsynced and closed)."""
        missing = sorted(self.mine - self.written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensor(s) never arrived, e.g. {missing[:3]}")

    def finish(self, extra_files: dict[str, bytes | str | os.PathLike]) -> Path:
        """Write the index and ``extra_files`` (name -> bytes, or a path to copy), then rename into place (after
        every other writer of the plan has completed its share)."""
        self.check_complete()
        n = len(self.files)
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                 "weight_map": {name: shard_file_name(k + 1, n) for name, (k, _) in self.where.items()}}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for fname, content in extra_files.items():
            if isinstance(content, bytes):
                (self.tmp / fname).write_bytes(content)
            else:
                shutil.copyfile(content, self.tmp / fname)
        self._fsync_dir(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".replaced")
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self._fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.out

    def abort(self) -> None:
        """Close files and remove the partial directory (the writer that created it); nothing that looks like a
        checkpoint is left."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.create:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_planned_file(path: Path, head: bytes, size: int) -> None:
    """A file made by another writer holds the header and the size this writer planned."""
    try:
        with open(path, "rb") as f:
            got = f.read(len(head))
            got_size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} is not visible here; output.writers=node needs output.dir on a filesystem "
                                f"that every node shares (or use output.writers=rank0)") from e
    if got != head or got_size != size:
        raise ValueError(f"{path}: header or size ({got_size} bytes) differs from this writer's plan ({size} bytes); "
                         f"every writer must plan the same tensors and output.max_shard_size")


class BackgroundWriter:
    """Runs a CheckpointWriter's disk writes on one thread, so assembling the next tensor overlaps writing this one.

    ``submit`` hands over a host tensor (and a callback run once its bytes are written, e.g. returning a staging
    slab); an optional CUDA event is waited on first, so device-to-host copies may still be in flight. A failure on
    the thread is raised on the next call.
    """

    def __init__(self, writer: CheckpointWriter, rank: int = 0, defer_errors: bool = False):
        self.writer, self.rank = writer, rank     # rank: the global rank that writes (named by fault injection)
        self.defer_errors = defer_errors    # a failure is raised by flush/finish only (writing stops at it)
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fp8pb-writer", daemon=True)
        self._thread.start()

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            name, tensor, event, done, row0 = item
            try:
                if self._error is None:
                    if event is not None:
                        event.synchronize()
                    inject("write", self.rank)
                    self.writer._pwrite(name, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), row0 or 0)
            except BaseException as e:  # surfaced to the caller on its next call
                self._error = e
            finally:
                if done is not None:
                    done()

    def check(self) -> None:
        if not self.defer_errors:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            e = self._error
            raise ExportError(f"rank {self.rank}, stage write: {type(e).__name__}: {e}") from e

    def submit(self, name: str, tensor: torch.Tensor, event=None, done=None, row0: int | None = None) -> None:
        """Queue a host tensor (or rows from ``row0`` of a planned tensor) for writing."""
        self.check()
        self.writer._check(name, tensor, row0)
        self._q.put((name, tensor, event, done, row0))

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def flush(self) -> None:
        """Wait for the queued writes; raise a failure, or a planned tensor that never arrived."""
        self._drain()
        self._raise()
        self.writer.check_complete()

    def finish(self, extra_files: dict) -> Path:
        self._drain()
        self._raise()
        return self.writer.finish(extra_files)

    def abort(self) -> None:
        self._drain()
        self.writer.abort()
