"""Pairs of the stream grouped into buckets of at most a given number of bytes, as RL frameworks batch a weight push
(one call of the rollout engine per bucket)."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucketed(pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``(hf_name, tensor)`` pairs -> lists of consecutive pairs whose tensors hold at most ``bucket_bytes`` together.

    A tensor larger than ``bucket_bytes`` comes alone in its bucket. The order of the pairs is kept, so a weight and
    its ``weight_scale_inv`` are in one bucket unless the bound falls between them."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes}: a bucket must hold at least one byte (e.g. 512 << 20)")
    bucket, size = [], 0
    for name, t in pairs:
        n = tensor_bytes(t)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket
