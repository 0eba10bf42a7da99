"""Reading file bytes straight into GPU memory: positioned reads into a small ring of pinned host buffers, each
copied to the device as soon as it is full.

Host memory stays the ring (``count * chunk`` bytes, whatever the tensor's size), no host tensor of the source is
ever allocated (no page faults, no zeroing), and a chunk's copy to the device runs from pinned memory at the bus's
speed while other threads read the next chunks. Reads and copies run on the caller's executor; each worker copies
on a stream of its own that first waits for the work already queued where the destination was allocated."""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import wait

import torch

CHUNK = 16 << 20        # bytes per read and per copy
_local = threading.local()


class PinnedRing:
    """``count`` pinned host buffers of ``chunk`` bytes, taken and given back by the reading threads."""

    def __init__(self, count: int, chunk: int = CHUNK):
        self.chunk = chunk
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(chunk, dtype=torch.uint8, pin_memory=True))

    def take(self) -> torch.Tensor:
        return self._free.get()

    def give_back(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def read_fully(fd: int, view: memoryview, pos: int, truncated) -> None:
    """Fill ``view`` from byte ``pos`` of ``fd`` with positioned reads; ``truncated(pos)``: the message of the
    ValueError raised where the file ends first."""
    while len(view):
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise ValueError(truncated(pos))
        view, pos = view[n:], pos + n


def _stream(device: torch.device) -> torch.cuda.Stream:
    s = getattr(_local, "stream", None)
    if s is None or s.device != device:
        s = _local.stream = torch.cuda.Stream(device=device)
    return s


def read_to_device(pool, ring: PinnedRing, fd: int, pos: int, out: torch.Tensor, pread,
                   row_shape: tuple[int, ...] | None = None, col_offset: int = 0) -> None:
    """Fill CUDA tensor ``out`` from the file at byte ``pos``.

    ``row_shape`` None: ``out``'s bytes are one contiguous range of the file. Else the file holds whole rows of shape
    ``row_shape`` (``out.dtype``) and ``out`` takes ``out.shape[1]`` of them along dim 1 of each, from ``col_offset``.
    ``pread(fd, memoryview, pos)`` fills the view or raises naming the tensor; ``pool`` runs the chunks."""
    if out.numel() == 0:
        return
    if row_shape is not None and row_bytes_of(out, row_shape) > ring.chunk:
        raise ValueError(f"a row of {row_bytes_of(out, row_shape)} bytes exceeds the {ring.chunk}-byte read buffer")
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(out.device))    # the destination's memory is free from here on
    if row_shape is None:
        flat = out.view(-1).view(torch.uint8)
        spans = [(k, min(ring.chunk, flat.numel() - k)) for k in range(0, flat.numel(), ring.chunk)]

        def one(span):
            k, n = span
            _copy_in(ring, fd, pos + k, n, pread, ready, out.device, lambda buf: flat[k:k + n].copy_(
                buf, non_blocking=True))
    else:
        row_bytes = row_bytes_of(out, row_shape)
        rows_per = max(1, ring.chunk // row_bytes)
        spans = [(r, min(rows_per, out.shape[0] - r)) for r in range(0, out.shape[0], rows_per)]

        def one(span):
            r, n = span

            def place(buf):
                rows = buf.view(out.dtype).view((n,) + tuple(row_shape))
                dev = rows.to(out.device, non_blocking=True)
                out[r:r + n].copy_(dev.narrow(1, col_offset, out.shape[1]))
            _copy_in(ring, fd, pos + r * row_bytes, n * row_bytes, pread, ready, out.device, place)
    futures = [pool.submit(one, s) for s in spans]
    wait(futures)       # every chunk done before an error is raised: none still writes into ``out``
    for fut in futures:
        fut.result()


def row_bytes_of(out: torch.Tensor, row_shape: tuple[int, ...]) -> int:
    n = out.element_size()
    for s in row_shape:
        n *= s
    return n


def _copy_in(ring: PinnedRing, fd: int, at: int, n: int, pread, ready: torch.cuda.Event, device: torch.device,
             place) -> None:
    s = _stream(device)
    buf = ring.take()
    try:
        pread(fd, memoryview(buf[:n].numpy()), at)
        s.wait_event(ready)
        with torch.cuda.device(device), torch.cuda.stream(s):
            place(buf[:n])
    finally:
        s.synchronize()         # the copy out of the buffer is done (also after an error) before it is reused
        ring.give_back(buf)


__all__ = ["PinnedRing", "read_to_device", "read_fully", "row_bytes_of", "CHUNK"]
