"""Tensor-parallel slices: a local Megatron tensor <-> the HF slices it holds (its ParamPlan's slices), both
directions. (Not to be confused with the safetensors shard files of ``writer``.)"""
from __future__ import annotations

import torch

from megatron_fp8pb.archs.base import GATED, PARTS, QKV, Dims
from megatron_fp8pb.plan.fused import merge_gated, merge_qkv, split_gated, split_qkv
from megatron_fp8pb.plan.fused_parts import member_segments, merge_parts, part_rows, split_parts
from megatron_fp8pb.plan.params import ParamPlan, Piece


def _groups_per_rank(plan: ParamPlan, d: Dims) -> int:
    q = plan.slices[0]
    return q.length // (d.heads_per_group * d.head_dim)


def _parts_groups(plan: ParamPlan, d: Dims) -> int:
    return plan.local_shape[0] // sum(part_rows(plan.rule.parts, d))


def _member_slices(plan: ParamPlan, member: int) -> list:
    return [s for s in plan.slices if s.order.member == member]


def _parts_to_slices(plan: ParamPlan, local: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """A fused-parts tensor -> one tensor per slice: each member's row ranges, touching ones joined as the plan
    joined them."""
    per_member = split_parts(plan.rule.parts, d, local, _parts_groups(plan, d))
    out = []
    for m, segs in enumerate(per_member):
        segs = list(segs)
        for s in _member_slices(plan, m):
            take, n = [], 0
            while n < s.length:
                take.append(segs.pop(0))
                n += take[-1].shape[0]
            out.append(take[0] if len(take) == 1 else torch.cat(take, dim=0))
    return out


def _parts_from_slices(plan: ParamPlan, tensors: list[torch.Tensor], d: Dims) -> torch.Tensor:
    fp, g = plan.rule.parts, _parts_groups(plan, d)
    tp_size = fp.groups(d) // g
    segments, k = [], 0
    for m in range(len(fp.members)):
        n = len(_member_slices(plan, m))
        joined = torch.cat(tensors[k:k + n], dim=0) if n > 1 else tensors[k]
        k += n
        lengths = [length for _, length in member_segments(fp, d, m, tp_size, 0)]
        segments.append(list(joined.split(lengths, dim=0)))
    return merge_parts(fp, d, segments, g)


def to_slices(plan: ParamPlan, local: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """local tensor -> one tensor per entry of ``plan.slices`` (vocab padding rows dropped)."""
    if plan.fusion == PARTS:
        return _parts_to_slices(plan, local, d)
    if plan.fusion == QKV:
        parts = split_qkv(local, _groups_per_rank(plan, d), d.heads_per_group, d.head_dim)
    elif plan.fusion == GATED:
        parts = split_gated(local)
    else:
        parts = [local] * len(plan.rule.hf)
    out = []
    for s in plan.slices:
        t = parts[s.order.member]
        if s.length != t.shape[s.dim]:
            t = t.narrow(s.dim, 0, s.length)
        out.append(t)
    return out


def pieces_of(plan: ParamPlan, local: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """local tensor -> one tensor per entry of ``plan.pieces`` (what this rank exports)."""
    if not plan.pieces:
        return []
    by_name = dict(zip(((s.hf_name, s.offset) for s in plan.slices), to_slices(plan, local, d)))
    return [by_name[(p.hf_name, p.offset)] for p in plan.pieces]


def from_slices(plan: ParamPlan, tensors: list[torch.Tensor], d: Dims) -> torch.Tensor:
    """One tensor per entry of ``plan.slices`` -> the local Megatron tensor (vocab padding rows zero)."""
    if not plan.slices:  # a shard made only of vocab padding
        return torch.zeros(plan.local_shape)
    if plan.fusion == PARTS:
        return _parts_from_slices(plan, tensors, d)
    if plan.fusion == QKV:
        return merge_qkv(*tensors, _groups_per_rank(plan, d), d.heads_per_group, d.head_dim)
    if plan.fusion == GATED:
        return merge_gated(*tensors)
    t = tensors[0]
    if tuple(t.shape) != plan.local_shape:
        pad = torch.zeros(plan.local_shape, dtype=t.dtype)
        pad.narrow(plan.slices[0].dim, 0, t.shape[plan.slices[0].dim]).copy_(t)
        t = pad
    return t


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor holds no NaN/Inf (non-float tensors: True), with one read of each and one device sync.

    Each tensor's min and max are taken together (``aminmax``, which propagates NaN; no boolean copy of the tensor
    is made) and all are checked at once."""
    picked = [k for k, t in enumerate(tensors) if t.is_floating_point() and t.numel()]
    flags = [True] * len(tensors)
    if picked:
        ends = torch.stack([torch.stack(torch.aminmax(tensors[k].detach())).float() for k in picked])
        for k, ok in zip(picked, torch.isfinite(ends).all(dim=1).tolist()):
            flags[k] = bool(ok)
    return flags


def check_piece_finite(piece: Piece, t: torch.Tensor, mcore_name: str) -> None:
    """Raise ValueError naming the HF tensor and the index in it of the first NaN/Inf of ``t`` (this rank's rows or
    columns ``piece`` of it), then the Megatron parameter that holds it."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    idx = [int(i) for i in bad.nonzero()[0].tolist()]
    value = t[tuple(idx)].item()
    idx[piece.dim if len(idx) > 1 else 0] += piece.offset
    raise ValueError(f"HF tensor {piece.hf_name!r} {list(piece.full_shape)} holds {value} at index {idx} (Megatron "
                     f"parameter {mcore_name}); fix the source weights (an FP8 scale of NaN/Inf would serve garbage)")


def piece_dtype(p: Piece, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype an unquantized piece is written in: its rule's own (float32 expert bias) or the checkpoint's."""
    return getattr(torch, p.dtype) if p.dtype else out_dtype
