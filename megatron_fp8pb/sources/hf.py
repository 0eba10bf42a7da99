"""Reading an HF checkpoint lazily (only the slices a rank needs), and the HF config of a source."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from megatron_fp8pb.sources.device_reads import PinnedRing, read_fully, read_to_device
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.safetensors_dtypes import itemsize, torch_dtype
from megatron_fp8pb.sources.safetensors_layout import header, tensor_files


class HFReader:
    """Tensors of an HF safetensors checkpoint directory, read slice by slice with positioned reads (no mmap: the
    bytes read land in the returned tensor only, so host memory stays what the caller holds, and the reads release
    the GIL, so a reader thread overlaps the quantizer)."""

    def __init__(self, path: str | os.PathLike, readahead=None, device: torch.device | None = None):
        self.path = Path(path)
        self.readahead = readahead      # a readahead.Readahead of this source, told which tensor is read next
        self.device = device            # CUDA: tensors are read into device memory through a pinned ring
        self._ring = None
        self.files = tensor_files(self.path)
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._fds: dict[Path, int] = {}
        self._pool = None
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.trace: list[tuple[Path, int]] | None = None    # a list: (file, first byte) of every read, appended

    def names(self) -> list[str]:
        return list(self.files)

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        if name not in self.files:
            raise KeyError(f"source {self.path} has no tensor {name!r}")
        f = self.files[name]
        with self._lock:
            if f not in self._headers:
                self._headers[f] = header(f)
            entries, base = self._headers[f]
        if name not in entries:
            raise ValueError(f"source file {f} has no tensor {name!r} although the index names it there; the index "
                             f"and the file disagree")
        return f, entries[name], base

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        _, e, _ = self._entry(name)
        return tuple(e["shape"]), e["dtype"]

    def first_byte(self, name: str, dim: int = 0, offset: int = 0) -> tuple[Path, int]:
        """The file holding ``name`` and the byte ``read(name, dim, offset)`` reads first (columns: whole rows from
        the tensor's first byte)."""
        f, e, base = self._entry(name)
        shape, size = tuple(e["shape"]), itemsize(e["dtype"]) or 1
        start = base + e["data_offsets"][0]
        if len(shape) <= 1 or dim == 0:
            start += offset * (_numel(shape[1:]) if len(shape) > 1 else 1) * size
        return f, start

    def read(self, name: str, dim: int = 0, offset: int = 0, length: int | None = None) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) ``[offset, offset+length)`` of ``name`` as a new tensor on this reader's
        device (the host where none)."""
        f, e, base = self._entry(name)
        if self.trace is not None:
            at = self.first_byte(name, dim, offset)
            with self._lock:
                self.trace.append(at)
        if self.readahead is not None:
            self.readahead.consumed(name)
        shape, dtype = tuple(e["shape"]), torch_dtype(e["dtype"])
        if dtype is None:
            raise ValueError(f"source tensor {name!r} in {f} has dtype {e['dtype']}, which the export does not read")
        length = (shape[dim] if shape else 1) - offset if length is None else length
        start = base + e["data_offsets"][0]
        row = _numel(shape[1:]) * dtype.itemsize
        with self._lock:
            fd = self._fds.get(f)
            if fd is None:
                fd = self._fds[f] = os.open(f, os.O_RDONLY)
        if self.device is not None and self.device.type == "cuda" and (
                len(shape) <= 1 or dim == 0 or row <= self._pinned_ring().chunk):
            return self._read_to_device(fd, f, name, shape, dtype, dim, offset, length, start, row)
        if len(shape) <= 1 or dim == 0:
            out_shape = (length,) + shape[1:] if shape else ()
            out = torch.empty(out_shape, dtype=dtype)
            self._pread(fd, out, start + offset * (row if len(shape) > 1 else dtype.itemsize), name, f)
            return out
        # columns: read whole rows in bounded chunks and keep the columns
        out = torch.empty((shape[0], length) + shape[2:], dtype=dtype)
        step = max(1, (64 << 20) // max(row, 1))
        buf = torch.empty((min(step, shape[0]),) + shape[1:], dtype=dtype)
        for r in range(0, shape[0], step):
            n = min(step, shape[0] - r)
            self._pread(fd, buf[:n], start + r * row, name, f)
            out[r:r + n].copy_(buf[:n].narrow(1, offset, length))
        return out

    def _pinned_ring(self) -> PinnedRing:
        with self._lock:
            if self._ring is None:
                self._ring = PinnedRing(READ_THREADS + 2)
            return self._ring

    def _read_to_device(self, fd, f, name, shape, dtype, dim, offset, length, start, row) -> torch.Tensor:
        """``read`` into this reader's CUDA device (columns: whole rows copied, the columns kept on the device)."""
        ring, pool = self._pinned_ring(), self._executor()

        def pread(fd, view, at):
            _pread_all(fd, view, at, name, f)
        if len(shape) <= 1 or dim == 0:
            out = torch.empty((length,) + shape[1:] if shape else (), dtype=dtype, device=self.device)
            read_to_device(pool, ring, fd, start + offset * (row if len(shape) > 1 else dtype.itemsize), out,
                           pread)
        else:
            out = torch.empty((shape[0], length) + shape[2:], dtype=dtype, device=self.device)
            read_to_device(pool, ring, fd, start, out, pread, row_shape=shape[1:], col_offset=offset)
        with self._lock:     # the bytes read from the file (whole rows for columns), as the host path counts
            self.bytes_read += out.shape[0] * row if len(shape) > 1 else out.numel() * out.element_size()
        return out

    def _executor(self):
        with self._lock:    # tensors may be read from several threads
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="fp8pb-read")
            return self._pool

    def _pread(self, fd: int, out: torch.Tensor, pos: int, name: str, f: Path) -> None:
        """Fill ``out`` from byte ``pos``: large reads go out as several concurrent chunks (a deeper disk queue)."""
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        chunks = [(view[k:k + READ_CHUNK], pos + k) for k in range(0, len(view), READ_CHUNK)]
        if len(chunks) > 1:
            pool = self._executor()
            for fut in [pool.submit(_pread_all, fd, v, at, name, f) for v, at in chunks]:
                fut.result()
        elif chunks:
            _pread_all(fd, *chunks[0], name, f)
        with self._lock:
            self.bytes_read += len(view)

    def close(self) -> None:
        if self.readahead is not None:
            from megatron_fp8pb.sources.readahead import stop
            stop(self.path)
            self.readahead = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._ring = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


READ_CHUNK = 16 << 20      # bytes per positioned read of a large tensor
READ_THREADS = 4           # concurrent reads of one large tensor


def _pread_all(fd: int, view: memoryview, pos: int, name: str, f: Path) -> None:
    read_fully(fd, view, pos, lambda at: f"source tensor {name!r} in {f} cannot be read (file ends at byte {at}); "
                                         f"the file is truncated or corrupt")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class DictReader:
    """The same interface over an in-memory HF state dict (the embedded tiny source)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        t = self.state[name]
        return tuple(t.shape), str(t.dtype)

    def read(self, name: str, dim: int = 0, offset: int = 0, length: int | None = None) -> torch.Tensor:
        if name not in self.state:
            raise KeyError(f"source has no tensor {name!r}")
        t = self.state[name]
        length = t.shape[dim] - offset if length is None else length
        return t.narrow(dim, offset, length)


def check_source(reader, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor the architecture needs is present, float, and of the shape the config implies."""
    have = set(reader.names())
    missing = sorted(set(expected) - have)
    if missing:
        raise ValueError(f"source {where} lacks {len(missing)} tensor(s) the config implies, e.g. {missing[:5]}")
    extra = sorted(have - set(expected))
    if extra:
        from megatron_fp8pb.log import warn0
        warn0(f"source {where} holds {len(extra)} tensor(s) the architecture's table does not map, which the export "
              f"does not write, e.g. {extra[:4]} (multi-token-prediction layers of an architecture that maps none, "
              f"or a tied lm_head)")
    for name, shape in expected.items():
        got, dtype = reader.meta(name)
        if tuple(got) != tuple(shape):
            raise ValueError(f"source tensor {name!r} has shape {tuple(got)}, but the config implies {tuple(shape)};"
                             f" the config.json and the weights disagree")
        if torch_dtype(dtype) not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"source tensor {name!r} has dtype {dtype}; expected a float dtype (BF16/F16/F32)")


def stored_dtypes(reader, names) -> dict[str, str]:
    """HF name -> the torch dtype name (``float32``) ``reader``'s checkpoint stores it in, for ``names`` it holds."""
    have = set(reader.names())
    out = {}
    for n in names:
        if n in have:
            dtype = torch_dtype(reader.meta(n)[1])
            if dtype is not None:
                out[n] = str(dtype).replace("torch.", "")
    return out


def read_slice(reader, p: Piece) -> torch.Tensor:
    return reader.read(p.hf_name, p.dim if len(p.full_shape) > 1 else 0, p.offset, p.length)


def hf_config(path: str | os.PathLike):
    """The source's config: ``config.json`` read directly where that reads the same as transformers' config class
    (``hf_config_json``), else that class (importing transformers)."""
    import json
    from megatron_fp8pb.sources.hf_config import reads_like_transformers
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json; an HF checkpoint directory (source.path with "
                                f"source.kind=hf) or source.hf_config (source.kind=megatron) must hold one")
    try:
        data = json.loads((p / "config.json").read_text())
        view = reads_like_transformers(data)
    except ValueError:      # not JSON: transformers names the problem
        data, view = None, None
    if view is not None:
        return view
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type and model_type not in CONFIG_MAPPING:     # e.g. kimi_k2: the checkpoint's own code (auto_map)
        from megatron_fp8pb.archs import arch
        from megatron_fp8pb.sources.hf_config import missing_for_dims
        try:
            arch(model_type)
        except ValueError as e:
            raise ValueError(f"{p}/config.json: {e}") from None
        raise ValueError(f"{p}/config.json: model_type {model_type!r} is not one transformers knows, so the export "
                         f"reads config.json itself, and {missing_for_dims(data)}")
    return AutoConfig.from_pretrained(str(p))


def config_dtype(cfg) -> torch.dtype:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.bfloat16
    if isinstance(d, str):
        d = torch_dtype(d) or torch.bfloat16
    return d
