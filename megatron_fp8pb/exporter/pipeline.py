"""The export pass: plan -> split -> shard-consistent quantization -> gather fp8 to rank 0 -> streaming writer.

Units (the embedding, each layer, the final norm + lm_head) are processed in one global order on every rank (a source
streamed from disk: lm_head's unit after the first layer's, ``streamed_unit_order``); a rank skips units it holds
nothing of. Inside a unit, quantized pieces first agree on block amax in their TP (or expert-TP)
group, then every piece travels to rank 0 as fp8 bytes plus the scale rows it touches; rank 0 checks that straddling
scale rows agree, assembles each HF tensor and hands it to the writer. With ``output.writers=node`` a piece goes to
the writer of its tensor's node instead (node_writers.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import groupby

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.quant import blockmath
from megatron_fp8pb.archs import Dims, rules_for
from megatron_fp8pb.archs.base import hf_module
from megatron_fp8pb.quant.reference import BLOCK, quantize_checked
from megatron_fp8pb.output.hf_files import config_json, quantization_config
from megatron_fp8pb.errors import agree
from megatron_fp8pb.faults import ExportError, stage
from megatron_fp8pb.log import log0
from megatron_fp8pb.output.node_writers import Routes
from megatron_fp8pb.exporter.options import ExportOptions, RankView
from megatron_fp8pb.exporter.progress import Phases, Progress
from megatron_fp8pb.plan.params import (Layout, ParamPlan, Piece, PlanContext, check_coverage, expected_tensors, streamed_unit_order, plan_param)
from megatron_fp8pb.plan.tp_slices import check_piece_finite, finite_flags, piece_dtype, pieces_of
from megatron_fp8pb.output.staging import SlabPool
from megatron_fp8pb.sources.streamed import Deferred, LazyParam, Prefetch, materialize
from megatron_fp8pb.output.writer import TensorSpec

SCALE = ".weight_scale_inv"


@dataclass
class ExportResult:
    out_dir: str | None
    num_tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    traffic: coll.Traffic = field(default_factory=coll.Traffic)
    quantized: list[str] = field(default_factory=list)
    not_converted: list[str] = field(default_factory=list)
    tie_word_embeddings: bool = False
    phases: Phases = field(default_factory=Phases)
    files: list[str] = field(default_factory=list)
    bytes_by_writer: dict[int, int] = field(default_factory=dict)


def make_plans(view: RankView, ctx: PlanContext) -> list[tuple[ParamPlan, torch.Tensor]]:
    """``view.params``: ``[(mcore_name, tensor)]``; when it carries ``styles`` (``mcore.local_params``), each rule's
    sharding is checked against the module that holds the parameter."""
    styles = getattr(view.params, "styles", None) or {}
    out = []
    loaded = [p for _, p in view.params if not isinstance(p, LazyParam)]   # a streamed source: checked when read
    finite = iter(finite_flags(loaded))
    for name, p in view.params:
        lazy = isinstance(p, LazyParam)
        plan = plan_param(name, tuple(p.shape), ctx, style=styles.get(name))
        if not lazy and not next(finite):
            for piece, t in zip(plan.pieces, pieces_of(plan, p.detach(), ctx.d)):
                check_piece_finite(piece, t, name)
        out.append((plan, p if lazy else p.detach()))
    return out


def local_pieces(plans, d: Dims, me: int) -> list[tuple[Piece, object]]:
    """This rank's exported pieces in write order, each with its tensor (a Deferred one for a streamed source)."""
    mine = []
    for plan, local in plans:
        if isinstance(local, LazyParam):
            tensors = [Deferred(local, plan, i) for i in range(len(plan.pieces))]
        else:
            tensors = pieces_of(plan, local, d)
        mine += [(Piece(**{**p.__dict__, "src": me}), t) for p, t in zip(plan.pieces, tensors)]
    mine.sort(key=lambda pt: pt[0].order)
    return mine


def _partial_amax(t: torch.Tensor, p: Piece) -> torch.Tensor:
    if t.is_cuda:
        from megatron_fp8pb.quant import triton_kernel as blockfp8_triton
        if blockfp8_triton.usable(t):
            x = t if p.dim == 0 else t.t()
            a = blockfp8_triton.block_amax(x, p.offset % BLOCK, BLOCK)
            return a if p.dim == 0 else a.t()
    return blockmath.partial_block_amax(t, p.dim, p.offset, BLOCK)


def _quantize(t: torch.Tensor, scale_inv: torch.Tensor, p: Piece) -> torch.Tensor:
    if t.is_cuda:
        from megatron_fp8pb.quant import triton_kernel as blockfp8_triton
        if blockfp8_triton.usable(t):
            first, rows = blockmath.scale_rows_of_piece(scale_inv, p.dim, p.offset, p.length, BLOCK)
            x, s = (t, rows) if p.dim == 0 else (t.t(), rows.t())
            q = blockfp8_triton.quantize_rows(x, s.contiguous(), p.offset % BLOCK, BLOCK)
            return q if p.dim == 0 else q.t().contiguous()
    return blockmath.quantize_piece(t, scale_inv, p.dim, p.offset, BLOCK)


def _grid_shape(p: Piece) -> tuple[int, int]:
    return blockmath.num_blocks(p.full_shape[0], BLOCK), blockmath.num_blocks(p.full_shape[1], BLOCK)


def quantize_unit(items: list[tuple[Piece, torch.Tensor]], groups, traffic: coll.Traffic, out_dtype: torch.dtype):
    """Pieces of one unit -> payloads: (qdata, scale rows) for quantized pieces, the tensor in out_dtype otherwise.

    Block amax is made global with one MAX all-reduce per axis group ("tp", "etp") over full-size amax grids.
    """
    payload: dict[int, tuple] = {}
    # whole on this rank (replicated, or a 1-way split): the fused single-pass quantizer, no collective
    for k, (p, t) in enumerate(items):
        if p.quantize and p.axis is None:
            payload[k] = quantize_checked(t, BLOCK, p.scale_fmt)
    for axis in ("tp", "etp"):
        todo = [(k, p, t) for k, (p, t) in enumerate(items) if p.quantize and p.axis == axis]
        # one grid per HF tensor: a rank may hold several row ranges of one tensor (a fused tensor whose parts lie
        # apart in the HF tensor), and blocks straddling two of them take the MAX of both
        grids: dict[str, torch.Tensor] = {}
        for _, p, t in todo:
            grid = grids.get(p.hf_name)
            if grid is None:
                grid = grids[p.hf_name] = torch.zeros(_grid_shape(p), dtype=torch.float32, device=t.device)
            first, last = blockmath.block_span(p.offset, p.length, BLOCK)
            dst = grid[first:last] if p.dim == 0 else grid[:, first:last]
            dst.copy_(torch.maximum(dst, _partial_amax(t, p)))
        names = list(grids)
        fmts = {p.hf_name: p.scale_fmt for _, p, _ in todo}
        reduced = coll.allreduce_amax(list(grids.values()), getattr(groups, axis), traffic, groups.device)
        scales = dict(zip(names, blockmath.scales_from_amax_grids(reduced, [fmts[n] for n in names])))
        for k, p, t in todo:
            scale_inv = scales[p.hf_name]
            _, rows = blockmath.scale_rows_of_piece(scale_inv, p.dim, p.offset, p.length, BLOCK)
            payload[k] = (_quantize(t, scale_inv, p), rows)
    for k, (p, t) in enumerate(items):
        if not p.quantize:
            payload[k] = (t.to(piece_dtype(p, out_dtype)).contiguous(),)
    return [payload[k] for k in range(len(items))]


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _cuda_event():
    """An event after the device-to-host copies queued so far (None without CUDA): the writer thread waits on it."""
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def write_specs(by_name: dict[str, list[Piece]], out_dtype: torch.dtype) -> list[TensorSpec]:
    specs = []
    for name, tiles in sorted(by_name.items(), key=lambda kv: kv[1][0].order):
        p = tiles[0]
        if p.quantize:
            specs.append(TensorSpec(name, torch.float8_e4m3fn, p.full_shape))
            specs.append(TensorSpec(name[:-len(".weight")] + SCALE, torch.float32, _grid_shape(p)))
        else:
            specs.append(TensorSpec(name, piece_dtype(p, out_dtype), p.full_shape))
    return specs


class _Assembler:
    """A writer: builds each full HF tensor in a staging slab from its pieces (local or received) and hands it to the
    background writer; straddling scale rows from different ranks must agree."""

    def __init__(self, writer, traffic: coll.Traffic, device: torch.device, out_dtype, pool: SlabPool, me: int = 0):
        self.writer, self.traffic, self.device, self.out_dtype, self.pool = writer, traffic, device, out_dtype, pool
        self.me = me

    def tensor(self, tiles: list[Piece], local: dict[tuple, tuple]) -> None:
        p0 = tiles[0]
        name = p0.hf_name
        dtype = torch.float8_e4m3fn if p0.quantize else piece_dtype(p0, self.out_dtype)
        scale = torch.full(_grid_shape(p0), float("nan")) if p0.quantize else None
        whole = _nbytes(p0.full_shape, dtype) <= self.pool.slab_bytes
        if whole:
            full, slab = self.pool.take(p0.full_shape, dtype, check=self.writer.check)
        try:
            for p in tiles:
                got = local.get((p.hf_name, p.offset)) if p.src == self.me else self._recv(p, dtype)
                if whole:
                    full.narrow(p.dim, p.offset, p.length).copy_(got[0], non_blocking=got[0].is_cuda)
                else:   # larger than a slab (dim-0 pieces only): streamed in row chunks
                    self._stream_rows(name, got[0], p.offset, dtype)
                if p.quantize:
                    self._place_scale(scale, p, got[1])
        except BaseException:
            if whole:
                self.pool.give_back(slab)
            raise
        if whole:
            self.writer.submit(name, full, _cuda_event(), lambda: self.pool.give_back(slab))
        if p0.quantize:
            self.writer.submit(name[:-len(".weight")] + SCALE, scale)

    def _stream_rows(self, name: str, piece: torch.Tensor, row0: int, dtype) -> None:
        row_bytes = max(_nbytes(piece.shape[1:], dtype), 1)
        step = max(self.pool.slab_bytes // row_bytes, 1)
        for r in range(0, piece.shape[0], step):
            rows = piece[r:r + step]
            buf, slab = self.pool.take(tuple(rows.shape), dtype, check=self.writer.check)
            buf.copy_(rows, non_blocking=rows.is_cuda)
            self.writer.submit(name, buf, _cuda_event(), lambda s=slab: self.pool.give_back(s), row0=row0 + r)

    def _recv(self, p: Piece, dtype) -> tuple:
        shape = list(p.full_shape)
        shape[p.dim] = p.length
        q = coll.recv_tensor(tuple(shape), dtype, p.src, self.traffic, self.device)
        if not p.quantize:
            return (q,)
        first, last = blockmath.block_span(p.offset, p.length, BLOCK)
        gshape = list(_grid_shape(p))
        gshape[p.dim] = last - first
        return q, coll.recv_tensor(tuple(gshape), torch.float32, p.src, self.traffic, self.device)

    @staticmethod
    def _place_scale(scale: torch.Tensor, p: Piece, rows: torch.Tensor) -> None:
        first, last = blockmath.block_span(p.offset, p.length, BLOCK)
        dst = scale[first:last] if p.dim == 0 else scale[:, first:last]
        rows = rows.cpu()
        seen = ~torch.isnan(dst)
        if bool(seen.any()) and not torch.equal(dst[seen], rows[seen]):
            raise RuntimeError(f"{p.hf_name}: ranks disagree on the scale of a block that straddles a shard boundary "
                               f"(piece at offset {p.offset} from rank {p.src})")
        dst.copy_(rows)


def run_export(view: RankView, d: Dims, layout: Layout, groups, hf_config, out_dir: str | None,
               options: ExportOptions, *, sink=None) -> ExportResult:
    """Export this rank's share of the model (``view``); call on every rank. Returns the result (complete on rank 0).
    ``sink``: on rank 0, ``sink(specs)`` returns what receives the tensors instead of a checkpoint writer (the
    interface of BackgroundWriter; a sink with an ``assembler`` places the tensors itself, see stream/sink.py)."""
    t0 = time.perf_counter()
    quant, out_dtype = options.quant, options.out_dtype or torch.bfloat16
    me = coll.rank()
    traffic = coll.Traffic()
    untie = d.tie_embeddings and quant.lm_head and quant.enabled
    if untie:
        log0("tied embeddings with quant.lm_head=true: writing lm_head quantized and embed_tokens in bf16, "
             "tie_word_embeddings=false")
    plans, error = [], None
    try:
        with stage("plan", me):
            plans = make_plans(view, PlanContext.make(d, layout, quant, view.layer_of_local, view.num_local_experts,
                                                      untie))
    except (ValueError, TypeError) as e:
        error = str(e)
    agree(error)
    mine = local_pieces(plans, d, me)
    streamed = any(isinstance(local, LazyParam) for _, local in plans)
    all_pieces = coll.gather_objects([p for p, _ in mine])
    routes = Routes.start(options.writers if out_dir is not None else "rank0")
    writer, by_name, error = None, {}, None
    result = ExportResult(out_dir=str(out_dir) if out_dir else None, traffic=traffic, tie_word_embeddings=d.tie_embeddings and not untie)
    if me == 0:
        try:
            by_name = check_coverage([p for tiles in all_pieces for p in tiles], expected_tensors(rules_for(d), d, untie))
            specs = write_specs(by_name, out_dtype)
            if sink is not None:
                writer = sink(specs)
            elif out_dir is not None:
                writer = routes.open(by_name, specs, out_dir, options)
        except (ValueError, OSError) as e:
            error = str(e)
    agree(error)
    own, writer = routes.share(by_name, writer, out_dir, options)     # the tensors this rank assembles
    finish_error = None
    try:
        with stage("transfer", me):
            _transfer(mine, own, groups, traffic, writer, out_dtype, d, streamed, result.phases, routes)
        routes.flush(writer)
        if me == 0:
            linear_modules = sorted({hf_module(n) for n, tiles in by_name.items() if tiles[0].linear})
            result.quantized = sorted(hf_module(n) for n, tiles in by_name.items() if tiles[0].quantize)
            result.not_converted = [m for m in linear_modules if m not in set(result.quantized)]
            if result.tie_word_embeddings and "lm_head" not in result.not_converted:
                result.not_converted.append("lm_head")
            result.num_tensors = sum(2 if tiles[0].quantize else 1 for tiles in by_name.values())
            if writer is not None:
                qc = quantization_config(result.not_converted, bool(result.quantized), quant.scale_fmt)
                files = {"config.json": config_json(hf_config, d.vocab, result.tie_word_embeddings, out_dtype, qc,
                                                    d.mtp_layers)}
                files.update(options.extra_files)
                try:
                    with stage("write", me):
                        writer.finish(files)
                    result.bytes_by_writer = routes.bytes_by_writer(writer)
                    result.bytes_written = sum(result.bytes_by_writer.values())
                    result.files = [f.name for f in writer.writer.files]
                except (ExportError, OSError, ValueError) as e:
                    writer.abort()
                    writer, finish_error = None, str(e)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    agree(finish_error)     # every rank learns whether the checkpoint was written
    result.seconds = time.perf_counter() - t0
    return result


SLAB_MIN = 64 << 20


def _slab_bytes(by_name: dict[str, list[Piece]], out_dtype) -> int:
    """Slabs hold whole tensors, except tensors made only of row (dim-0) pieces, which can be streamed in chunks:
    so the largest tensor with a column-sharded piece, and at least 64 MiB."""
    need = SLAB_MIN
    for tiles in by_name.values():
        if any(p.dim != 0 for p in tiles):
            dtype = torch.float8_e4m3fn if tiles[0].quantize else piece_dtype(tiles[0], out_dtype)
            need = max(need, _nbytes(tiles[0].full_shape, dtype))
    return need


PARAMS_IN_FLIGHT = 4   # parameters of a streamed unit read at once (a deeper disk queue than one tensor's chunks)


def _units(mine, d: Dims, streamed: bool, device, phases: Phases | None = None):
    """(unit, items) in the global unit order (a streamed source: ``streamed_unit_order``). A streamed source is
    read on a thread one unit ahead, and every rank visits every unit and learns whether any rank failed reading it,
    before any collective of that unit."""
    units_mine = {u: list(g) for u, g in groupby(mine, key=lambda pt: pt[0].order.unit)}
    if not streamed:
        yield from sorted(units_mine.items())
        return
    me = coll.rank()

    from concurrent.futures import ThreadPoolExecutor
    loaders = ThreadPoolExecutor(PARAMS_IN_FLIGHT, thread_name_prefix="fp8pb-load")

    def load(u):
        t0 = time.perf_counter()
        items = materialize(units_mine.get(u, []), me, device, loaders)
        if phases is not None:
            phases.add("read", time.perf_counter() - t0, sum(t.numel() * t.element_size() for _, t in items))
        return items
    pre = Prefetch(streamed_unit_order(d), load)   # every write unit, lm_head's after the first layer's
    try:
        for u, items, error in pre:
            if coll.any_true(error is not None, device):
                agree(error and f"rank {me}, stage read: {error}")
            yield u, items
            pre.release()
    finally:
        pre.close()
        loaders.shutdown(wait=False)


def _transfer(mine, by_name, groups, traffic, writer, out_dtype, d: Dims, streamed: bool = False,
              phases: Phases | None = None, routes: Routes | None = None) -> None:
    me, routes = coll.rank(), routes or Routes(coll.rank())
    if not routes.writer:
        for u, items in _units(mine, d, streamed, groups.device):
            if items:
                payloads = quantize_unit(items, groups, traffic, out_dtype)
                routes.wait(routes.send(items, payloads, traffic, groups.device))
        return
    asm = None
    if writer is not None and hasattr(writer, "assembler"):     # a sink that places tensors itself (stream/)
        asm = writer.assembler(traffic, groups.device, out_dtype, me)
    elif writer is not None:
        cuda = groups.device.type == "cuda" or any(torch.is_tensor(t) and t.is_cuda for _, t in mine)
        asm = _Assembler(writer, traffic, groups.device, out_dtype, SlabPool(_slab_bytes(by_name, out_dtype), 3, cuda),
                         me)
    by_unit: dict[int, list[list[Piece]]] = {}
    for name, tiles in sorted(by_name.items(), key=lambda kv: kv[1][0].order):
        by_unit.setdefault(tiles[0].order.unit, []).append(tiles)
    phases = phases or Phases()
    if writer is not None:
        writer.writer.phases = phases
    progress = Progress(phases, routes.write_total(writer), len(by_unit), routes.scope,
                        quiet=getattr(writer, "quiet", False))
    mine_by_unit = dict(_units(mine, d, False, groups.device)) if not streamed else None
    stream = _units(mine, d, True, groups.device, phases) if streamed else \
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
        progress.update(done, force=done == len(by_unit) and u in by_unit)
