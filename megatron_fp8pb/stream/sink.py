"""Rank 0's end of the in-memory stream: each HF tensor is assembled from its pieces where the caller wants it
(``device``) and handed to the caller's thread through a queue bounded in bytes.

``device`` cuda: tensors stay in GPU memory; a tensor held whole by rank 0 is the quantizer's output itself, one
gathered under TP/EP is assembled from fp8 pieces and scale rows received into GPU memory. ``device`` cpu with a
model on the GPU: each tensor is copied into pinned host memory on a copy stream of its own, so the copies run
back to back while the next unit is quantized; the caller's thread waits for a copy only when it takes the tensor.
A model on the CPU: tensors are assembled in host memory, as the gloo tests run it.
"""
from __future__ import annotations

import queue
import threading

import torch

from megatron_fp8pb.exporter.assemble import place_scale, recv_piece
from megatron_fp8pb.exporter.naming import grid_shape, out_dtype_of, scale_name
IN_FLIGHT_BYTES = 2 << 30   # tensors made but not yet taken by the caller (at least one, whatever its size)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class InFlight:
    """A byte budget shared by the export's thread (``take``) and the caller's (``give``): the export waits while
    the tensors the caller has not taken yet exceed ``limit`` bytes, unless none is waiting."""

    def __init__(self, limit: int):
        self.limit, self.used, self.open = limit, 0, True
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self.open and self.used > 0 and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def close(self) -> None:
        """The caller stopped: the export no longer waits for it."""
        with self._cond:
            self.open = False
            self._cond.notify_all()


class StreamSink:
    """What run_export hands rank 0's tensors to (the writer interface: ``check``, ``submit``, ``finish``,
    ``abort``), with an ``assembler`` of its own. Items on ``q``: ``(name, tensor, ready, nbytes, keep)``, where
    ``ready`` is a CUDA event after which ``tensor`` holds its bytes (None on the host) and ``keep`` a device tensor
    that must live until then."""

    def __init__(self, specs, q: queue.Queue, device: torch.device, in_flight: InFlight):
        self.specs = {s.name: s for s in specs}
        self.q, self.device, self.in_flight = q, device, in_flight
        self.writer, self.phases, self.files, self.bytes_written = self, None, [], 0
        self.discard, self.quiet = False, True     # no progress lines: a push runs once per training step
        self._copies = None     # the copy stream of device-to-host copies, made on first use

    def assembler(self, traffic, comm_device: torch.device, out_dtype, me: int) -> "StreamAssembler":
        return StreamAssembler(self, traffic, comm_device, out_dtype, me)

    def check(self) -> None:
        pass

    def submit(self, name: str, tensor: torch.Tensor, event=None, done=None, row0=None) -> None:
        """The checkpoint writer's entry (unused by StreamAssembler, kept for the interface)."""
        if event is not None:
            event.synchronize()
        self.emit(name, tensor)
        if done is not None:
            done()

    def emit(self, name: str, tensor: torch.Tensor) -> None:
        """Hand ``tensor`` (on any device) to the caller, in the memory of ``self.device``."""
        nbytes = _nbytes(tensor)
        self.bytes_written += nbytes
        if self.discard:
            return
        self.in_flight.take(nbytes)
        if tensor.device.type == self.device.type:
            ready = None
            if tensor.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
            self.q.put((name, tensor, ready, nbytes, None))
        elif tensor.is_cuda:      # to pinned host memory, on the copy stream
            made = torch.cuda.Event()
            made.record()
            if self._copies is None:
                self._copies = torch.cuda.Stream(device=tensor.device)
            with torch.cuda.stream(self._copies):
                self._copies.wait_event(made)
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._copies)
            self.q.put((name, host, ready, nbytes, tensor))
        else:                     # a host tensor for a GPU consumer
            t = tensor.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self.q.put((name, t, ready, nbytes, tensor))

    def finish(self, extra_files: dict) -> None:
        pass

    def abort(self) -> None:
        pass


class StreamAssembler:
    """Builds each HF tensor from its pieces (this rank's payloads, or received fp8 pieces and scale rows) and emits
    it with its ``weight_scale_inv``. A tensor held whole in one piece is its payload; several pieces are copied
    into one tensor on the device of the first (the GPU when the stream goes to the GPU), and the scale rows of a
    block that straddles two pieces must agree."""

    def __init__(self, sink: StreamSink, traffic, comm_device: torch.device, out_dtype, me: int):
        self.sink, self.traffic, self.comm_device, self.out_dtype, self.me = sink, traffic, comm_device, out_dtype, me

    def tensor(self, tiles: list, local: dict[tuple, tuple]) -> None:
        p0 = tiles[0]
        name = p0.hf_name
        dtype = out_dtype_of(p0, self.out_dtype)
        got = [local.get((p.hf_name, p.offset)) if p.src == self.me else
               recv_piece(p, dtype, self.traffic, self.comm_device) for p in tiles]
        if len(tiles) == 1 and p0.offset == 0 and p0.length == p0.full_shape[p0.dim]:
            full = got[0][0]
            scale = got[0][1] if p0.quantize else None
        else:
            where = self.sink.device if self.sink.device.type == "cuda" else got[0][0].device
            full = torch.empty(p0.full_shape, dtype=dtype, device=where)
            scale = torch.full(grid_shape(p0), float("nan"), device=where) if p0.quantize else None
            for p, payload in zip(tiles, got):
                full.narrow(p.dim, p.offset, p.length).copy_(payload[0], non_blocking=True)
                if p.quantize:
                    place_scale(scale, p, payload[1])
        self.sink.emit(name, full)
        if p0.quantize:
            self.sink.emit(scale_name(name), scale)
