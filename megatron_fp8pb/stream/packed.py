"""The stream of a model held whole by one process on one GPU: planned once, then per unit one quantizer launch into
one packed buffer, one finiteness flag and (for host tensors) one copy to pinned memory.

``PackedPlan.build`` runs the export's planning (pieces, coverage, file order) once; each quantized weight is a view
of its parameter (the q/k/v rows of a fused linear_qkv, the gate/up halves of linear_fc1, read in place:
``quant/grouped.py``), and each unit's launch table is built then. A pass (``PackedPlan.run``) checks that every
parameter is still where it was (``key``: the plan holds their addresses) and launches units ahead of the caller
up to an in-flight byte bound. Before a unit's first tensor is yielded, the host reads one flag that says whether
all its scales (a NaN or Inf weight gives a non-finite block scale) and all its unquantized tensors are finite; a
bad one raises ValueError naming the HF tensor, the index and the Megatron parameter, as the planner's check does.

A yielded tensor is a view of its unit's packed buffer (GPU memory, or pinned host memory), or for an unquantized
tensor in its own dtype the parameter itself (``device="cuda"``); buffers are new per unit and pass, from the
caching allocators, so a tensor stays valid while the caller holds it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from megatron_fp8pb.archs import Dims, rules_for
from megatron_fp8pb.archs.base import GATED, PARTS, QKV
from megatron_fp8pb.exporter.naming import grid_shape, nbytes, out_dtype_of, scale_name
from megatron_fp8pb.exporter.options import ExportOptions, RankView
from megatron_fp8pb.exporter.pipeline import make_plans
from megatron_fp8pb.plan.params import Layout, PlanContext, check_coverage, expected_tensors
from megatron_fp8pb.plan.tp_slices import check_piece_finite
from megatron_fp8pb.quant.format import FORMAT
from megatron_fp8pb.quant.grouped import Table, as_rows
from megatron_fp8pb.sources.streamed import LazyParam

ALIGN = 256     # every tensor of a packed buffer starts at a multiple of this many bytes


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def param_key(view: RankView) -> tuple:
    """What a plan depends on besides the options: each parameter's name, address, shape, strides, dtype, device."""
    return tuple((n, p.data_ptr(), tuple(p.shape), p.stride(), p.dtype, p.device) for n, p in view.params)


def _views(plan, local: torch.Tensor, d: Dims) -> list[torch.Tensor] | None:
    """One in-place view per entry of ``plan.pieces`` (``tp_slices.pieces_of`` without its copies), or None where
    the parameter's layout needs a copy (fused parts, a non-contiguous parameter)."""
    if plan.fusion == PARTS or not local.is_contiguous():
        return None
    if plan.fusion == QKV:
        hpg, hd = d.heads_per_group, d.head_dim
        g = local.reshape(-1, hpg + 2, hd, *local.shape[1:])
        parts = [g[:, :hpg].flatten(1, 2), g[:, hpg], g[:, hpg + 1]]
    elif plan.fusion == GATED:
        parts = list(local.chunk(2, dim=0))
    else:
        parts = [local] * len(plan.rule.hf)
    by_slice = {}
    for s in plan.slices:
        t = parts[s.order.member]
        if t.dim() == local.dim() and s.length != t.shape[s.dim]:
            t = t.narrow(s.dim, 0, s.length)
        by_slice[(s.hf_name, s.offset)] = t
    return [by_slice[(p.hf_name, p.offset)] for p in plan.pieces]


@dataclass
class Unit:
    """One unit's outputs in file order: ``entries`` ``(hf_name, where, shape, dtype, offset)`` with ``where``
    "packed" (``offset`` in the packed buffer) or "raw" (``offset`` an index into ``raws``)."""
    entries: list = field(default_factory=list)
    raws: list = field(default_factory=list)        # (piece, view, dtype, mcore_name) of unquantized tensors
    quantized: list = field(default_factory=list)   # (piece, [G, R, K] view, mcore_name)
    tables: list = field(default_factory=list)
    packed_bytes: int = 0
    scales: tuple[int, int] = (0, 0)                # byte range of the scales in the packed buffer
    out_bytes: int = 0


class PackedPlan:
    """The plan of a one-process stream, valid while ``key`` matches the parameters (``param_key``)."""

    def __init__(self, units: list[Unit], key: tuple, device: torch.device):
        self.units, self.key, self.device = units, key, device

    @classmethod
    def build(cls, view: RankView, d: Dims, layout: Layout, options: ExportOptions) -> "PackedPlan | None":
        """The plan, or None where this path does not apply (a parameter that needs a copy to be split, a tensor
        in several pieces, an error the general path reports with its own words)."""
        quant, out_dtype = options.quant, options.out_dtype or torch.bfloat16
        if not view.params or any(isinstance(p, LazyParam) for _, p in view.params):
            return None
        untie = d.tie_embeddings and quant.lm_head and quant.enabled
        try:
            ctx = PlanContext.make(d, layout, quant, view.layer_of_local, view.num_local_experts, untie,
                                   view.source_dtypes)
            plans = make_plans(view, ctx, check_finite=False)
            source = {}
            for plan, local in plans:
                views = _views(plan, local, d)
                if views is None:
                    return None
                for p, v in zip(plan.pieces, views):
                    source[(p.hf_name, p.offset)] = (v, plan.mcore_name)
            by_name = check_coverage([p for plan, _ in plans for p in plan.pieces],
                                     expected_tensors(rules_for(d), d, untie))
        except (ValueError, TypeError):
            return None
        units: dict[int, Unit] = {}
        for name, tiles in sorted(by_name.items(), key=lambda kv: kv[1][0].order):
            p = tiles[0]
            if len(tiles) != 1 or p.offset != 0 or p.length != p.full_shape[p.dim] or (p.quantize and (
                    p.axis is not None or len(p.full_shape) != 2)):
                return None
            u = units.setdefault(p.order.unit, Unit())
            v, mcore_name = source[(name, p.offset)]
            if p.quantize:
                u.quantized.append((p, v, mcore_name))
                u.entries.append((name, "packed", p.full_shape, FORMAT.fp8_dtype, None))
                u.entries.append((scale_name(name), "packed", grid_shape(p), torch.float32, None))
            else:
                u.entries.append((name, "raw", p.full_shape, out_dtype_of(p, out_dtype), len(u.raws)))
                u.raws.append((p, v, out_dtype_of(p, out_dtype), mcore_name))
        for u in units.values():
            if not _lay_out(u, quant.scale_fmt):
                return None
        return cls([units[k] for k in sorted(units)], param_key(view), view.params[0][1].device)

    def run(self, target: torch.device, in_flight_bytes: int):
        """One pass: ``(hf_name, tensor)`` on ``target`` in file order."""
        copies = torch.cuda.Stream(self.device) if target.type == "cpu" and self.device.type == "cuda" else None
        pending: deque = deque()
        todo = iter(self.units)
        held, more = 0, True
        while True:
            while more and (not pending or held < in_flight_bytes):
                u = next(todo, None)
                if u is None:
                    more = False
                    break
                pending.append(_launch(u, target, copies))
                held += u.out_bytes
            if not pending:
                return
            u, tensors, flag, ready = pending.popleft()
            held -= u.out_bytes
            ready.synchronize()
            if not bool(flag):
                _raise_nonfinite(u)
            yield from tensors


def _lay_out(u: Unit, scale_fmt: str) -> bool:
    """Offsets of the unit's qdata then its scales in the packed buffer, its launch tables; False where a weight's
    dtype has no kernel."""
    at, q_offs, s_offs = 0, [], []
    for p, _, _ in u.quantized:
        q_offs.append(at)
        at = _align(at + nbytes(p.full_shape, FORMAT.fp8_dtype))
    first = at
    for p, _, _ in u.quantized:     # scales back to back, so that the finiteness check reads no padding
        s_offs.append(at)
        at += nbytes(grid_shape(p), torch.float32)
    u.packed_bytes, u.scales = _align(at), (first, at)
    offs = iter(o for pair in zip(q_offs, s_offs) for o in pair)
    u.entries = [(n, w, s, dt, next(offs) if w == "packed" else o) for n, w, s, dt, o in u.entries]
    by_dtype: dict = {}
    for (p, v, _), qo, so in zip(u.quantized, q_offs, s_offs):
        rows = as_rows(v)     # a table of its own for rows of 16-element multiples
        even = all(x % 16 == 0 for x in (rows.shape[2], rows.stride(0), rows.stride(1), rows.storage_offset()))
        by_dtype.setdefault((v.dtype, even), []).append((v, qo, so // 4))
    try:
        u.tables = [Table([v for v, _, _ in g], [q for _, q, _ in g], [s for _, _, s in g], scale_fmt)
                    for g in by_dtype.values()]
    except TypeError:
        return False
    u.out_bytes = u.packed_bytes + sum(nbytes(p.full_shape, dt) for p, _, dt, _ in u.raws)
    return True


def _raw(p, v: torch.Tensor, dtype) -> torch.Tensor:
    return v.reshape(p.full_shape).to(dtype).contiguous()


def _launch(u: Unit, target: torch.device, copies):
    """Queue one unit's work on the current stream (and its copy to pinned memory on ``copies``); returns (unit,
    its pairs, a host flag of finiteness, an event after which both are ready)."""
    device = u.quantized[0][1].device if u.quantized else u.raws[0][1].device
    packed = torch.empty(u.packed_bytes, dtype=torch.uint8, device=device)
    for table in u.tables:
        table.launch(packed)
    raws = [_raw(p, v, dt) for p, v, dt, _ in u.raws]
    checks = [torch.stack(torch.aminmax(r)).float() for r in raws if r.is_floating_point() and r.numel()]
    if u.scales[1] > u.scales[0]:
        s = packed[u.scales[0]:u.scales[1]].view(torch.float32)
        checks.append(torch.stack(torch.aminmax(s)))
    ok = torch.isfinite(torch.cat(checks)).all() if checks else torch.ones((), dtype=torch.bool, device=device)
    if device.type == "cpu":     # the model on the CPU (the kernel under Triton's interpreter, as the tests run it)
        return u, _Pairs(_pairs(u, packed, raws, None), ()), ok, _Done()
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    flag.copy_(ok, non_blocking=True)
    if target.type == "cpu":
        host = torch.empty(u.out_bytes, dtype=torch.uint8, pin_memory=True)
        made = torch.cuda.Event()
        made.record()
        with torch.cuda.stream(copies):
            copies.wait_event(made)
            host[:u.packed_bytes].copy_(packed, non_blocking=True)
            at = u.packed_bytes
            for r in raws:
                n = r.numel() * r.element_size()
                host[at:at + n].copy_(r.reshape(-1).view(torch.uint8), non_blocking=True)
                at += n
            ready = torch.cuda.Event()
            ready.record(copies)
        buf, raw_at = host, u.packed_bytes
    else:
        ready = torch.cuda.Event()
        ready.record()
        buf, raw_at = packed, None
    # the GPU tensors a host copy reads live until the copy is done (the unit is dropped after ``ready``)
    return u, _Pairs(_pairs(u, buf, raws, raw_at), (packed, raws)), flag, ready


def _pairs(u: Unit, buf: torch.Tensor, raws: list, raw_at: int | None) -> list:
    """The unit's pairs as views of ``buf``; unquantized tensors the ``raws`` themselves (``raw_at`` None) or
    copies in ``buf`` from ``raw_at`` on."""
    pairs = []
    for name, where, shape, dtype, off in u.entries:
        if where == "packed":
            t = buf[off:off + nbytes(shape, dtype)].view(dtype).view(shape)
        elif raw_at is None:
            t = raws[off]
        else:
            r = raws[off]
            t = buf[raw_at:raw_at + r.numel() * r.element_size()].view(r.dtype).view(r.shape)
            raw_at += r.numel() * r.element_size()
        pairs.append((name, t))
    return pairs


class _Done:
    def synchronize(self) -> None:
        pass


class _Pairs(list):
    """A unit's pairs, holding the GPU buffers their host copies are made from until the unit is dropped."""

    def __init__(self, pairs, keep):
        super().__init__(pairs)
        self.keep = keep


def _raise_nonfinite(u: Unit) -> None:
    for p, v, _, mcore_name in u.raws:
        if v.is_floating_point():
            check_piece_finite(p, v.reshape(p.full_shape), mcore_name)
    for p, v, mcore_name in u.quantized:
        check_piece_finite(p, v.reshape(p.full_shape), mcore_name)
    names = ", ".join(e[0] for e in u.entries[:3])
    raise ValueError(f"a tensor of the unit holding {names} held NaN/Inf when it was quantized and not when checked "
                     f"again: the weights changed during the pass; push them again")
