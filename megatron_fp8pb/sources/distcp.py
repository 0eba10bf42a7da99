"""Reading the tensors of a torch.distributed.checkpoint (a Megatron torch_dist checkpoint) with positioned reads.

Each saved chunk is a torch.save zip archive (members stored, not compressed) at ``(offset, length)`` of a
``.distcp`` data file: its bytes are the member ``<archive>/data/<key>``, and ``data.pkl`` says the dtype, storage
offset, size and stride. A chunk that is one dense row-major storage from its start is located once (its pickle read
with an unpickler that builds nothing) and then read straight into the destination, on the GPU through the pinned
ring of ``device_reads``, instead of through torch.load from a Python stream and a copy. Anything else (a transform
such as compression, another layout, an unknown pickle) is not located: the caller reads it with torch's own reader.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import os
import pickle
import struct
import sys
import threading
import zipfile
from dataclasses import dataclass

import torch

from megatron_fp8pb.sources.device_reads import PinnedRing, read_fully, read_to_device


@dataclass(frozen=True)
class SavedTensor:
    file: str               # the data file
    pos: int                # its first byte in the file
    dtype: torch.dtype
    shape: tuple[int, ...]


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable read-only stream (positioned reads)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.at = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.at

    def seek(self, pos: int, whence: int = 0) -> int:
        self.at = max(0, pos if whence == 0 else self.at + pos if whence == 1 else self.length + pos)
        return self.at

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.at))
        got = os.preadv(self.fd, [memoryview(b)[:n]], self.start + self.at) if n else 0
        self.at += got
        return got


def _rebuild(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return storage, storage_offset, tuple(size), tuple(stride), None, metadata


def _rebuild_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return storage, storage_offset, tuple(size), tuple(stride), dtype, metadata


_STORAGE_DTYPES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}    # the typed storage classes torch.save names, by the dtype they hold


class _Layout(pickle.Unpickler):
    """Unpickles a tensor's ``data.pkl`` into (storage id, storage offset, size, stride), building nothing."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):     # dtypes without a typed storage class
            return _rebuild_v3
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return torch.UntypedStorage
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return pid


def locate(fd: int, file: str, offset: int, length: int) -> SavedTensor | None:
    """Where the tensor saved at ``(offset, length)`` of ``file`` (open as ``fd``) keeps its bytes, or None when it is
    not one dense row-major storage from its start, stored uncompressed."""
    try:
        z = zipfile.ZipFile(io.BufferedReader(_Window(fd, offset, length)))
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        storage, storage_offset, size, stride, dtype, metadata = _Layout(io.BytesIO(z.read(pkl))).load()
        kind, storage_type, key, _, numel = storage
        if storage_type is torch.UntypedStorage:        # numel counts bytes
            if dtype is None:
                return None
            numel //= dtype.itemsize
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            return None
        archive = pkl[: -len("data.pkl")]
        member = z.getinfo(archive + f"data/{key}")
        swapped = archive + "byteorder" in z.namelist() and z.read(archive + "byteorder").decode() != sys.byteorder
        if metadata or swapped:
            return None     # a negative or conjugate view, or bytes torch.load would swap
    except Exception:       # noqa: BLE001 - anything unexpected is read by torch's reader instead
        return None
    want, n = [], 1
    for s in reversed(size):
        want.append(n)
        n *= s
    itemsize = dtype.itemsize
    if (kind != "storage" or storage_offset != 0 or tuple(reversed(want)) != stride and n > 1
            or member.compress_type != zipfile.ZIP_STORED or member.file_size != numel * itemsize or n > numel):
        return None
    head = os.pread(fd, 30, offset + member.header_offset)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return SavedTensor(file, offset + member.header_offset + 30 + name_len + extra_len, dtype, tuple(size))


class DirectReads:
    """The saved chunks of one checkpoint, located once each and read with positioned reads: into host tensors, or
    (``device`` CUDA) into device memory through a ring of pinned buffers."""

    THREADS = 4

    def __init__(self, path: str, device: torch.device | None = None):
        self.path, self.device = path, device
        self._located: dict[tuple[str, int], SavedTensor | None] = {}
        self._lock = threading.Lock()
        self._pool = self._ring = None

    @contextlib.contextmanager
    def _open(self, relative: str):
        """A data file, open for one chunk's reads (a checkpoint saved by many ranks has thousands of files: none is
        kept open)."""
        try:
            fd = os.open(os.path.join(self.path, relative), os.O_RDONLY)
        except OSError as e:
            fix = ("raise the open-file limit (ulimit -n)" if e.errno in (errno.EMFILE, errno.ENFILE) else
                   "the checkpoint is incomplete or unreadable: copy it again")
            raise ValueError(f"Megatron checkpoint {self.path}: cannot open its data file {relative} "
                             f"({type(e).__name__}: {e.strerror}); {fix}") from e
        try:
            yield fd
        finally:
            os.close(fd)

    def chunk(self, relative: str, offset: int, length: int) -> SavedTensor | None:
        key = (relative, offset)
        with self._lock:
            if key in self._located:
                return self._located[key]
        with self._open(relative) as fd:
            found = locate(fd, relative, offset, length)
        with self._lock:
            self._located[key] = found
        return found

    def read_rows(self, saved: SavedTensor, first: int, rows: int) -> torch.Tensor:
        """Rows ``[first, first + rows)`` of a located chunk (dim 0; a 0-d or 1-d chunk counts its elements), as a
        new tensor on this reader's device (host where none)."""
        shape = (rows,) + saved.shape[1:] if saved.shape else ()
        row = saved.dtype.itemsize
        for s in saved.shape[1:]:
            row *= s
        at = saved.pos + first * row
        with self._open(saved.file) as fd:
            if self.device is not None and self.device.type == "cuda":
                out = torch.empty(shape, dtype=saved.dtype, device=self.device)
                pool, ring = self._executor()
                read_to_device(pool, ring, fd, at, out, self._pread)
                return out
            out = torch.empty(shape, dtype=saved.dtype)
            if out.numel():
                self._pread(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), at)
            return out

    def _pread(self, fd: int, view: memoryview, at: int) -> None:
        read_fully(fd, view, at, lambda end: f"Megatron checkpoint {self.path}: a data file ends at byte {end} "
                                             f"inside a saved tensor; the checkpoint is truncated")

    def _executor(self):
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="fp8pb-distcp")
                self._ring = PinnedRing(self.THREADS + 2)
            return self._pool, self._ring

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = self._ring = None


def read_items(direct: DirectReads, storage_data: dict, items: list, resolve) -> bool:
    """Fill each read item's destination (``resolve(item)``, a view) from its located chunk. False, having read
    nothing, when any item's chunk cannot be located (the caller then uses torch's reader for all of them)."""
    plans = []
    for item in items:
        info = storage_data[item.storage_index]
        if getattr(info, "transform_descriptors", None):
            return False
        saved = direct.chunk(info.relative_path, info.offset, info.length)
        if saved is None or len(saved.shape) != len(item.lengths) or any(
                o + n > s for o, n, s in zip(item.storage_offsets, item.lengths, saved.shape)):
            return False    # torch's reader reads it, or names the mismatch of .metadata and the data
        plans.append((item, saved))
    for item, saved in plans:
        first, rows = (int(item.storage_offsets[0]), int(item.lengths[0])) if saved.shape else (0, 1)
        got = direct.read_rows(saved, first, rows)
        for dim in range(1, len(saved.shape)):
            got = got.narrow(dim, int(item.storage_offsets[dim]), int(item.lengths[dim]))
        resolve(item).copy_(got)
    return True
