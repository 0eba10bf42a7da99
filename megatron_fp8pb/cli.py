"""The CLI job: config -> checks -> process groups -> source model -> export -> verification summary."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megatron_fp8pb.parallel import collectives as coll
from megatron_fp8pb.parallel import session
from megatron_fp8pb.archs import dims_from_hf
from megatron_fp8pb.config import ExportConfig, load_config
from megatron_fp8pb.sources.kinds import kind
from megatron_fp8pb.errors import is_expected, message, refuse_everywhere
from megatron_fp8pb.parallel.collectives import agree
from megatron_fp8pb.process import exit_on_sigterm, set_phase
from megatron_fp8pb.log import log0
from megatron_fp8pb.exporter.options import ExportOptions, RankView
from megatron_fp8pb.exporter.pipeline import run_export
from megatron_fp8pb.sources.megatron_plain import plain_source
from megatron_fp8pb.sources.registry import build_source, source_config
from megatron_fp8pb.sources.streamed import fixed_mmap_threshold
from megatron_fp8pb.plan.validate import check_layout
from megatron_fp8pb.output.writer import partial_dir

RESOLVED_CONFIG = "fp8pb_export_config.json"    # written into the output: the config this export resolved


def preflight(cfg: ExportConfig, world: int):
    """Everything that can be refused before a process group or a weight is touched (the same verdict on every
    rank: it reads only the config and the source's config.json)."""
    check_source_paths(cfg)
    hfc = source_config(cfg)
    d = dims_from_hf(hfc)
    p = cfg.parallel
    try:
        check_layout(d, world, p.tp, p.pp, p.ep, p.etp)
    except ValueError as e:
        if kind(cfg.source.kind).streamed:
            raise ValueError(f"{e}. The export's layout need not be the one the model was trained or saved at: "
                             f"choose parallel.tp/pp/ep/etp that divide these sizes (1 always does)") from None
        raise
    out = os.path.realpath(cfg.output.dir)
    for src in (cfg.source.path,):
        if src and (out == os.path.realpath(src) or out.startswith(os.path.realpath(src) + os.sep)):
            raise ValueError(f"output.dir {cfg.output.dir} lies inside source.path {src}; write elsewhere")
    return hfc, d


def check_source_paths(cfg: ExportConfig) -> None:
    """A source path that is not there is named as such (before anything looks inside it)."""
    s = cfg.source
    what = kind(s.kind).path_is
    if what and s.path and not os.path.exists(s.path):
        raise FileNotFoundError(f"source.path {s.path} does not exist; point it at {what}")
    if s.kind == "megatron" and s.hf_config and not os.path.exists(s.hf_config):
        raise FileNotFoundError(f"source.hf_config {s.hf_config} does not exist; point it at the HF config.json "
                                f"(or its directory) describing the architecture")


def check_output_on_rank0(cfg: ExportConfig) -> None:
    """Collective: rank 0 (the writer) checks output.dir; every rank learns its verdict at once."""
    from megatron_fp8pb.output.writer import prepare_output
    error = cause = None
    if coll.rank() == 0:
        try:
            prepare_output(cfg.output.dir, cfg.output.overwrite)
        except (OSError, ValueError) as e:
            error, cause = message(e), e
    agree(error, name_rank=False, cause=cause)


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


def run(config_path: str | None, overrides: list[str]) -> int:
    imported = session.process_age()
    exit_on_sigterm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(config_path, overrides)
        preflight(cfg, world)
    except Exception as e:
        if is_expected(e):
            raise refuse_everywhere(e) from e
        raise
    start = session.process_age()
    # the layout and its groups without megatron-core, also for a dense GPT's Megatron checkpoint read directly
    # (decided here from the checkpoint's files, then agreed by every rank when the session starts)
    plain = plain_source(cfg.source.kind, cfg.source.path, cfg.source.hf_config, cfg.source.megatron_core)
    needs_megatron = kind(cfg.source.kind).needs_megatron and plain is None
    if needs_megatron:
        from megatron_fp8pb.parallel.megatron_import import import_without_compiling
        import_without_compiling()      # this job never runs the model
    with session.started(cfg.parallel, megatron=needs_megatron, agreed=True) as sess:
        if kind(cfg.source.kind).streamed:
            fixed_mmap_threshold()      # a streamed source's tensors come and go: each gets its own pages
        ok = export_job(cfg, sess, [("imports", imported), ("checks", start)] + sess.marks,
                        None if sess.megatron else plain)
    return 0 if ok else 1


def export_job(cfg: ExportConfig, sess: session.Session, marks: list[tuple[str, float]], plain=None) -> bool:
    """The CLI job inside its session: source -> export -> verification; whether every check passed (on every
    rank). ``marks``: (step, seconds since the process started) so far. ``plain``: the keys of a Megatron source
    read without megatron-core (``megatron_plain.plain_source``), None where megatron-core maps it."""
    check_output_on_rank0(cfg)
    resolved = json.dumps(cfg.to_dict(), indent=2) + "\n"
    log0("resolved config:\n" + resolved, logging.DEBUG)
    out = Path(cfg.output.dir)
    set_phase("reading the source", partial=partial_dir(out))
    layout = sess.layout
    rss_start = reset_peak_rss()
    src = error = cause = None
    try:
        src = build_source(cfg, layout, sess.on_gpu, stream=True, plain=plain)
    except (ValueError, TypeError, KeyError, OSError) as e:
        error, cause = message(e), e
    agree(error, cause=cause)
    log0(f"source {cfg.source.kind} ({src.dims.model_type}, {src.dims.num_layers} layers) "
         f"{'streamed' if src.model is None else 'built'} for "
         f"tp={layout.tp_size} pp={layout.pp_size} ep={layout.ep_size} on {sess.world} rank(s)")
    marks.append(("source", session.process_age()))
    options = ExportOptions.from_config(cfg.quant, cfg.output, src.dims, src.dtype,
                                        {**src.extra_files, RESOLVED_CONFIG: resolved.encode()})
    set_phase("exporting")
    result = run_export(RankView.of_source(src, layout), src.dims, layout, sess.groups, src.hf_config, cfg.output.dir,
                        options)
    set_phase("verifying", complete=Path(result.out_dir) if result.out_dir else out)
    ok = True
    if sess.rank == 0:
        t = result.traffic
        log0(f"wrote {result.num_tensors} tensors, {result.bytes_written / 1e9:.3f} GB to {result.out_dir} in "
             f"{result.seconds:.1f} s; bytes moved to rank 0: {t.p2p_received / 1e6:.2f} MB, amax all-reduce "
             f"{t.allreduce / 1e6:.3f} MB on rank 0; {len(result.quantized)} linears quantized, "
             f"not converted: {result.not_converted}")
        marks.append(("export", session.process_age()))
        log0(f"phases: {result.phases.summary()}; files: {', '.join(result.files)}")
        if len(result.bytes_by_writer) > 1:
            log0("GB written by each writer rank (output.writers=node; the phases count rank 0's): " +
                 ", ".join(f"rank {r} {b / 1e9:.6f}" for r, b in sorted(result.bytes_by_writer.items())))
        log0("wall clock since the process started: " + ", ".join(f"{k} {v:.1f} s" for k, v in marks))
        if cfg.output.verify:
            from megatron_fp8pb.verify import verify_checkpoint
            tps, for_transformers = options.quant.serve_targets()
            report = verify_checkpoint(result.out_dir, source=src.truth, serve_tp=tps,
                                       serve_transformers=for_transformers)
            log0("verification:\n" + report.table())
            ok = report.ok
    rss = coll.gather_objects((rss_start, peak_rss_bytes()))
    log0("peak RSS per rank: " + " ".join(f"{b / 1e9:.3f}" for _, b in rss or []) + " GB; the export added: " +
         " ".join(f"{(b - s) / 1e9:.3f}" for s, b in rss or []) + " GB")
    return coll.broadcast_object(ok)
