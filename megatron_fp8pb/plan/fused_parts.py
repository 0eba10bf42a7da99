"""Split and merge of a fused Megatron tensor described by ``FusedParts``, both directions, pure.

A rank holds ``g`` whole head groups of every part. Megatron keeps them per group (``mcore_grouped``) or per part;
each HF tensor (a member) keeps its parts per group (one row range of the HF tensor on each rank) or per part over
all groups (one row range per part). Works on any tensor whose dim 0 holds the rows ([rows], [rows, K],
[rows, 1, kernel]).
"""
from __future__ import annotations

import torch

from megatron_fp8pb.archs.base import Dims, FusedParts


def part_rows(fp: FusedParts, d: Dims) -> list[int]:
    """Rows per head group of each part."""
    return [p.rows(d) for p in fp.parts]


def member_rows(fp: FusedParts, d: Dims, member: int) -> int:
    """Rows per head group of HF tensor ``member``."""
    rows = part_rows(fp, d)
    return sum(rows[i] for i in fp.members[member].parts)


def full_rows(fp: FusedParts, d: Dims) -> list[int]:
    """Rows of each HF tensor (member) in full: every head group's rows of its parts."""
    return [fp.groups(d) * member_rows(fp, d, m) for m in range(len(fp.members))]


def local_groups(fp: FusedParts, d: Dims, tp_size: int, what: str) -> int:
    """Head groups per rank; ValueError with the arithmetic when ``tp_size`` does not divide them."""
    groups = fp.groups(d)
    if groups % tp_size:
        raise ValueError(f"{what}: {fp.groups_name}({groups}) % tp_size({tp_size}) != 0; choose a tensor-parallel size "
                         f"that divides {fp.groups_name}")
    return groups // tp_size


def member_segments(fp: FusedParts, d: Dims, member: int, tp_size: int, tp_rank: int) -> list[tuple[int, int]]:
    """(offset, length) of the rows of HF tensor ``member`` that rank ``tp_rank`` holds, ascending."""
    groups = fp.groups(d)
    g = groups // tp_size
    rows = part_rows(fp, d)
    layout = fp.members[member]
    if layout.grouped:
        n = g * member_rows(fp, d, member)
        return [(tp_rank * n, n)]
    out, base = [], 0
    for i in layout.parts:
        out.append((base + tp_rank * g * rows[i], g * rows[i]))
        base += groups * rows[i]
    return out


def _parts_of_local(fp: FusedParts, d: Dims, local: torch.Tensor, g: int) -> list[torch.Tensor]:
    """Megatron local rows -> each part as [g, rows, *rest]."""
    rows, rest = part_rows(fp, d), tuple(local.shape[1:])
    want = g * sum(rows)
    if local.shape[0] != want:
        raise ValueError(f"fused tensor shard has {local.shape[0]} rows, expected {g} head groups x {sum(rows)} rows "
                         f"per group = {want}")
    if fp.mcore_grouped:
        return list(local.reshape(g, sum(rows), *rest).split(rows, dim=1))
    return [x.reshape(g, r, *rest) for x, r in zip(local.split([g * r for r in rows], dim=0), rows)]


def split_parts(fp: FusedParts, d: Dims, local: torch.Tensor, g: int) -> list[list[torch.Tensor]]:
    """Megatron local rows of ``g`` head groups -> per member, its row ranges (``member_segments`` order),
    contiguous copies."""
    parts = _parts_of_local(fp, d, local, g)
    rest = tuple(local.shape[1:])
    out = []
    for layout in fp.members:
        mine = [parts[i] for i in layout.parts]
        if not layout.grouped:
            out.append([x.reshape(-1, *rest).contiguous() for x in mine])
            continue
        c = layout.chunks(d) if layout.chunks else 1
        chunked = [x.reshape(g, c, x.shape[1] // c, *rest) for x in mine]
        out.append([torch.cat(chunked, dim=2).reshape(-1, *rest).contiguous()])
    return out


def merge_parts(fp: FusedParts, d: Dims, segments: list[list[torch.Tensor]], g: int) -> torch.Tensor:
    """Inverse of split_parts: per member, its row ranges -> the Megatron local rows."""
    rows = part_rows(fp, d)
    rest = tuple(segments[0][0].shape[1:])
    parts: dict[int, torch.Tensor] = {}
    for layout, segs in zip(fp.members, segments):
        if not layout.grouped:
            for i, x in zip(layout.parts, segs):
                parts[i] = x.reshape(g, rows[i], *rest)
            continue
        c = layout.chunks(d) if layout.chunks else 1
        widths = [rows[i] // c for i in layout.parts]
        x = segs[0].reshape(g, c, sum(widths), *rest)
        for i, y in zip(layout.parts, x.split(widths, dim=2)):
            parts[i] = y.reshape(g, rows[i], *rest)
    ordered = [parts[i] for i in range(len(fp.parts))]
    if fp.mcore_grouped:
        return torch.cat(ordered, dim=1).reshape(-1, *rest)
    return torch.cat([x.reshape(-1, *rest) for x in ordered], dim=0)
