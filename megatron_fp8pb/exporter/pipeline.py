"""The export pass: plan -> split -> shard-consistent quantization -> gather fp8 to rank 0 -> streaming writer.

Units (the embedding, each layer, the final norm + lm_head) are processed in one global order on every rank
(``schedule``: a source streamed from disk in the order its bytes arrive); a rank skips units it holds nothing of.
Inside a unit, quantized pieces first agree on block amax in their TP (or expert-TP) group (``quantize``), then
every piece travels to rank 0 as fp8 bytes plus the scale rows it touches; rank 0 checks that straddling scale rows
agree, assembles each HF tensor and hands it to the writer (``assemble``), which places it at its planned offset, so
the files do not depend on the order. With ``output.writers=node`` a piece goes to the writer of its tensor's node
instead (node_writers.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.archs import Dims, rules_for
from megatron_fp8pb.archs.base import hf_module
from megatron_fp8pb.output.hf_files import config_json, quantization_config
from megatron_fp8pb.parallel.collectives import agree
from megatron_fp8pb.faults import ExportError, stage
from megatron_fp8pb.log import log0
from megatron_fp8pb.output.node_writers import Routes
from megatron_fp8pb.exporter.naming import write_specs
from megatron_fp8pb.exporter.options import ExportOptions, RankView
from megatron_fp8pb.exporter.progress import Phases
from megatron_fp8pb.exporter.schedule import transfer
from megatron_fp8pb.plan.params import (Layout, ParamPlan, Piece, PlanContext, check_coverage, expected_tensors,
                                        plan_param)
from megatron_fp8pb.plan.tp_slices import check_piece_finite, finite_flags, pieces_of
from megatron_fp8pb.sources.streamed import Deferred, LazyParam


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


def make_plans(view: RankView, ctx: PlanContext, check_finite: bool = True) -> list[tuple[ParamPlan, torch.Tensor]]:
    """``view.params``: ``[(mcore_name, tensor)]``; when it carries ``styles`` (``mcore.local_params``), each rule's
    sharding is checked against the module that holds the parameter. ``check_finite`` false: the caller checks the
    values itself on every pass (``stream/packed.py``), so a plan can be kept while the weights change."""
    styles = getattr(view.params, "styles", None) or {}
    out = []
    loaded = [p for _, p in view.params if not isinstance(p, LazyParam) and check_finite]   # streamed: when read
    finite = iter(finite_flags(loaded))
    for name, p in view.params:
        lazy = isinstance(p, LazyParam)
        plan = plan_param(name, tuple(p.shape), ctx, style=styles.get(name))
        if not lazy and check_finite and not next(finite):
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
                                                      untie, view.source_dtypes))
    except (ValueError, TypeError) as e:
        error = str(e)
    agree(error)
    mine = local_pieces(plans, d, me)
    streamed = any(isinstance(local, LazyParam) for _, local in plans)
    all_pieces = coll.gather_objects([p for p, _ in mine])
    routes = Routes.start(options.writers if out_dir is not None else "rank0")
    writer, by_name, error = None, {}, None
    result = ExportResult(out_dir=str(out_dir) if out_dir else None, traffic=traffic,
                          tie_word_embeddings=d.tie_embeddings and not untie)
    if me == 0:
        try:
            by_name = check_coverage([p for tiles in all_pieces for p in tiles],
                                     expected_tensors(rules_for(d), d, untie))
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
            progress = transfer(mine, own, groups, traffic, writer, out_dtype, d, streamed, result.phases, routes,
                                view.unit_order)
        routes.flush(writer)
        if progress is not None and writer is not None:
            progress.finish()
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
