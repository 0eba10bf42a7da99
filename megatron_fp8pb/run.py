"""The CLI job: config -> checks -> process groups -> source model -> export -> verification summary."""
from __future__ import annotations

import json
import os

import torch

from . import collectives as coll
from . import mcore
from .archs import dims_from_hf
from .config import ExportConfig, load_config
from .log import log0
from .pipeline import run_export
from .plan import QuantChoice
from .ranks import group_ranks, rank_layout
from .stream import fixed_mmap_threshold
from .sources import build_source, source_config
from .validate import check_layout


def preflight(cfg: ExportConfig, world: int):
    """Everything that can be refused before a process group or a weight is touched."""
    hfc = source_config(cfg)
    d = dims_from_hf(hfc)
    p = cfg.parallel
    check_layout(d, world, p.tp, p.pp, p.ep, p.etp)
    out = os.path.realpath(cfg.output.dir)
    for src in (cfg.source.path,):
        if src and (out == os.path.realpath(src) or out.startswith(os.path.realpath(src) + os.sep)):
            raise ValueError(f"output.dir {cfg.output.dir} lies inside source.path {src}; write elsewhere")
    from .writer import parse_size, prepare_output
    parse_size(cfg.output.max_shard_size)
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_output(cfg.output.dir, cfg.output.overwrite)
    return hfc, d


def serve_exclusions(d, quant: QuantChoice, serve_tp: int | None) -> tuple[str, ...]:
    """Modules a server at ``serve_tp`` would refuse in FP8 (with their fusion groups): kept unquantized."""
    from .archs import rules_for
    from .archs.base import hf_module
    from .plan import linear_weights
    from .serve_check import layers_to_keep_unquantized
    if not serve_tp or not quant.enabled:
        return ()
    mods = {hf_module(n): s for n, s in linear_weights(rules_for(d), d, quant.lm_head and d.tie_embeddings).items()
            if quant.quantizes(hf_module(n))}
    keep = layers_to_keep_unquantized(mods, serve_tp, num_kv_heads=d.num_query_groups)
    if keep:
        log0(f"quant.serve_tp={serve_tp}: keeping {len(keep)} layer(s) unquantized so that vLLM/SGLang accept the "
             f"checkpoint at tp={serve_tp}, e.g. {keep[:4]}")
    return tuple(keep)


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so that interpreter start and imports are counted."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Restart this process's peak-RSS mark (Linux ``clear_refs``) so that the peak covers the export, not the
    imports before it; returns the RSS now (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size since the last reset (the process's whole life where none is)."""
    import resource
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _exit_on_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails: unwind, so a partial output is removed."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def run(config_path: str | None, overrides: list[str]) -> int:
    _exit_on_sigterm()
    cfg = load_config(config_path, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    preflight(cfg, world)
    p = cfg.parallel
    on_gpu = p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available())
    backend = p.backend if p.backend != "auto" else ("nccl" if on_gpu else "gloo")
    marks = [("start", process_age())]
    mcore.init_distributed(backend, p.timeout_s)
    log0("resolved config:\n" + json.dumps(cfg.to_dict(), indent=2))
    marks.append(("process group", process_age()))
    streamed = cfg.source.kind in ("hf", "tiny")
    if streamed:    # no Megatron model: the layout and its groups without megatron-core
        fixed_mmap_threshold()
        layout = rank_layout(coll.rank(), coll.world_size(), p.tp, p.pp, p.ep, p.etp)
        g = coll.new_groups(group_ranks(coll.world_size(), p.tp, p.pp, p.ep, p.etp))
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        groups = mcore.Groups(g.get("tp"), g.get("etp"), device)
    else:
        mcore.initialize_parallel(p.tp, p.pp, p.ep, p.etp)
        layout, groups = mcore.layout_and_groups()
    marks.append(("parallel state", process_age()))
    rss_start = reset_peak_rss()
    src = build_source(cfg, layout, on_gpu, stream=True)
    log0(f"source {cfg.source.kind} ({src.dims.model_type}, {src.dims.num_layers} layers) "
         f"{'streamed' if src.model is None else 'built'} for "
         f"tp={p.tp} pp={p.pp} ep={p.ep} on {coll.world_size()} rank(s)")
    marks.append(("source", process_age()))
    q = cfg.quant
    quant = QuantChoice(q.enabled, tuple(q.exclude), q.lm_head)
    quant = QuantChoice(q.enabled, tuple(q.exclude) + serve_exclusions(src.dims, quant, q.serve_tp), q.lm_head)
    result = run_export(
        src.params, src.dims, layout, groups, src.hf_config, cfg.output.dir,
        quant=quant, max_shard_size=cfg.output.max_shard_size,
        overwrite=cfg.output.overwrite, out_dtype=src.dtype, layer_of_local=src.layer_of_local,
        num_local_experts=mcore.num_local_experts(src.dims, layout), extra_files=src.extra_files)
    ok = True
    if coll.rank() == 0:
        t = result.traffic
        log0(f"wrote {result.num_tensors} tensors, {result.bytes_written / 1e9:.3f} GB to {result.out_dir} in "
             f"{result.seconds:.1f} s; bytes moved to rank 0: {t.p2p_received / 1e6:.2f} MB, amax all-reduce "
             f"{t.allreduce / 1e6:.3f} MB on rank 0; {len(result.quantized)} linears quantized, "
             f"not converted: {result.not_converted}")
        marks.append(("export", process_age()))
        log0(f"phases: {result.phases.summary()}; files: {', '.join(result.files)}")
        log0("wall clock since the process started: " + ", ".join(f"{k} {v:.1f} s" for k, v in marks))
        if cfg.output.verify:
            from .verify import verify_checkpoint
            report = verify_checkpoint(result.out_dir, source=src.truth,
                                       serve_tp=(q.serve_tp,) if q.serve_tp else ())
            log0("verification:\n" + report.table())
            ok = report.ok
    rss = coll.gather_objects((rss_start, peak_rss_bytes()))
    log0("peak RSS per rank: " + " ".join(f"{p / 1e9:.3f}" for _, p in rss or []) + " GB; the export added: " +
         " ".join(f"{(p - s) / 1e9:.3f}" for s, p in rss or []) + " GB")
    ok = coll.broadcast_object(ok)
    coll.barrier()
    if not streamed:
        mcore.destroy_parallel()
    torch.distributed.destroy_process_group()
    return 0 if ok else 1
