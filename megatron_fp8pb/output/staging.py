"""Rank 0's bounded host memory: a few reusable slabs, each as large as the largest tensor, pinned when CUDA is used.

A full HF tensor is assembled in a slab (device pieces copied in asynchronously), handed to the writer thread, and
the slab comes back once its bytes are on disk. Peak host memory is ``count * largest tensor``, whatever the model's
size.
"""
from __future__ import annotations

import queue

import torch


class SlabPool:
    def __init__(self, slab_bytes: int, count: int = 3, pinned: bool = False):
        self.slab_bytes = max(int(slab_bytes), 1)
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=pinned))

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, check=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A host tensor of ``shape``/``dtype`` backed by a free slab (blocks until one is free) and the slab.
        ``check`` is called while waiting (to surface a writer failure instead of waiting forever)."""
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.slab_bytes:
            raise ValueError(f"tensor of {nbytes} bytes exceeds the staging slab of {self.slab_bytes} bytes")
        while True:
            try:
                slab = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                if check is not None:
                    check()
        return slab[:nbytes].view(dtype).view(shape), slab

    def give_back(self, slab: torch.Tensor) -> None:
        self._free.put(slab)
