"""The order the export goes through its units, and the loop that reads, quantizes, sends and assembles each.

Every rank visits the units in one global order and skips those it holds nothing of; a unit's collectives (the amax
all-reduce, the sends to its writer) happen in that order on every rank. A source held in memory goes by unit
number. A streamed source goes in its ``unit_order`` (an HF checkpoint: the order its units' bytes arrive when its
files are read as they lie, ``read_plan.unit_order``; otherwise ``streamed_unit_order``), read on threads ahead of
the quantizer: by the files' layout where every piece is a read of its own (``layout_reader``), else one unit ahead
(``Prefetch``). Before any collective of a streamed unit every rank learns whether any rank failed to read it.
"""
from __future__ import annotations

import time
from itertools import groupby

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.archs import Dims
from megatron_fp8pb.parallel.collectives import agree
from megatron_fp8pb.exporter.assemble import Assembler, slab_bytes
from megatron_fp8pb.exporter.progress import Phases, Progress
from megatron_fp8pb.exporter.quantize import quantize_unit
from megatron_fp8pb.output.node_writers import Routes
from megatron_fp8pb.output.staging import SlabPool
from megatron_fp8pb.plan.params import Piece
from megatron_fp8pb.plan.write_order import streamed_unit_order
from megatron_fp8pb.sources.layout_reader import LayoutReader, reads_by_layout
from megatron_fp8pb.sources.streamed import Prefetch, materialize

PARAMS_IN_FLIGHT = 4   # parameters of a streamed unit read at once (a deeper disk queue than one tensor's chunks)


def units(mine, d: Dims, streamed: bool, device, phases: Phases | None = None, order: list[int] | None = None):
    """(unit, items) in the global unit order: by unit number, or for a streamed source ``order`` (default
    ``streamed_unit_order``)."""
    units_mine = {u: list(g) for u, g in groupby(mine, key=lambda pt: pt[0].order.unit)}
    if not streamed:
        yield from sorted(units_mine.items())
        return
    me = coll.rank()
    order = list(order or streamed_unit_order(d))
    assert set(units_mine) <= set(order), f"units {sorted(set(units_mine) - set(order))} missing from the order"
    loaders = None
    if reads_by_layout(units_mine):
        pre = LayoutReader(order, units_mine, device, phases=phases)
    else:
        from concurrent.futures import ThreadPoolExecutor
        loaders = ThreadPoolExecutor(PARAMS_IN_FLIGHT, thread_name_prefix="fp8pb-load")

        def load(u):
            t0 = time.perf_counter()
            items = materialize(units_mine.get(u, []), me, device, loaders)
            if phases is not None:
                phases.add("read", time.perf_counter() - t0, sum(t.numel() * t.element_size() for _, t in items))
            return items
        pre = Prefetch(order, load)
    try:
        for u, items, error in pre:
            if coll.any_true(error is not None, device):
                agree(error and f"rank {me}, stage read: {error}")
            yield u, items
            pre.release()
    finally:
        pre.close()
        if loaders is not None:
            loaders.shutdown(wait=False)


def transfer(mine, by_name, groups, traffic, writer, out_dtype, d: Dims, streamed: bool = False,
             phases: Phases | None = None, routes: Routes | None = None,
             order: list[int] | None = None) -> Progress | None:
    """Quantize this rank's pieces unit by unit and send each to its writer; where this rank writes (``writer``),
    assemble the tensors of every unit (``by_name``: the HF tensors this rank writes, with all their pieces)."""
    me, routes = coll.rank(), routes or Routes(coll.rank())
    if not routes.writer:
        for u, items in units(mine, d, streamed, groups.device, order=order):
            if items:
                payloads = quantize_unit(items, groups, traffic, out_dtype)
                routes.wait(routes.send(items, payloads, traffic, groups.device))
        return
    asm = None
    if writer is not None and hasattr(writer, "assembler"):     # a sink that places tensors itself (stream/)
        asm = writer.assembler(traffic, groups.device, out_dtype, me)
    elif writer is not None:
        cuda = groups.device.type == "cuda" or any(torch.is_tensor(t) and t.is_cuda for _, t in mine)
        asm = Assembler(writer, traffic, groups.device, out_dtype, SlabPool(slab_bytes(by_name, out_dtype), 3, cuda),
                        me)
    by_unit: dict[int, list[list[Piece]]] = {}
    for name, tiles in sorted(by_name.items(), key=lambda kv: kv[1][0].order):
        by_unit.setdefault(tiles[0].order.unit, []).append(tiles)
    phases = phases or Phases()
    if writer is not None:
        writer.writer.phases = phases
    progress = Progress(phases, routes.write_total(writer), len(by_unit), routes.scope,
                        quiet=getattr(writer, "quiet", False))
    mine_by_unit = dict(units(mine, d, False, groups.device)) if not streamed else None
    stream = units(mine, d, True, groups.device, phases, order) if streamed else \
        ((u, mine_by_unit.get(u, [])) for u in sorted(set(by_unit) | set(mine_by_unit)))
    done = 0
    for u, items in stream:
        if u not in by_unit and not items:
            continue
        t0 = time.perf_counter()
        payloads = quantize_unit(items, groups, traffic, out_dtype) if items else []
        local = {(p.hf_name, p.offset): payload for (p, _), payload in zip(items, payloads)}
        sent = routes.send(items, payloads, traffic, groups.device)   # pieces other writers write
        phases.add("quantize", time.perf_counter() - t0)
        for tiles in by_unit.get(u, ()):
            if asm is not None:
                asm.tensor(tiles, local)
        routes.wait(sent)
        done += u in by_unit
        progress.update(done)
    return progress
