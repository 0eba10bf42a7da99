"""``verify_checkpoint`` (every check in order) and the command line."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .format import check_quant_config, check_tensors, check_vocab_and_tie, output_dtype, scan_fp8_nan
from .reading import Checkpoint, _load_json, check_index
from .report import DEFAULT_INFO_TP, VerifyReport, _logits_line
from .serving import compare_logits, run_serve_checks
from .source import _open_source, compare_to_source

def verify_checkpoint(out_dir: str | os.PathLike, source=None, serve_tp: Iterable[int] = (), logits: bool = False,
                      *, info_tp: Iterable[int] = DEFAULT_INFO_TP, scan_weights: bool = False,
                      max_rel_err: float = 0.1, min_top1: float = 0.9) -> VerifyReport:
    """Check the checkpoint at ``out_dir`` (see the module docstring).

    source: None, an HF bf16 checkpoint directory, or a reader (``hf_source.DictReader``-like).
    serve_tp: TP sizes that must serve (their problems are errors); info_tp: TP sizes reported as warnings.
    logits: compare transformers logits (needs ``source`` as a directory).
    scan_weights: without a source, still read every FP8 weight and fail NaN bytes.
    """
    out = Path(out_dir)
    src_label = None if source is None else (str(source) if isinstance(source, (str, os.PathLike))
                                             else type(source).__name__)
    rep = VerifyReport(out_dir=str(out), source=src_label)
    if not out.is_dir():
        rep.error(f"{out} is not a directory; pass the export's output.dir")
        return rep
    cfg = _load_json(out / "config.json", rep, "the export writes the source config with quantization_config") or {}
    skip = check_quant_config(cfg, rep)
    ck = Checkpoint(out, check_index(out, rep))
    try:
        check_tensors(ck, skip, rep)
        check_vocab_and_tie(cfg, ck.tensors, rep)
        reader = _open_source(source, rep)
        if reader is not None:
            tied = bool(cfg.get("tie_word_embeddings"))
            compare_to_source(ck, reader, output_dtype(cfg), tied, rep)
        elif scan_weights:
            scan_fp8_nan(ck, rep)
        run_serve_checks(ck.tensors, cfg, serve_tp, info_tp, rep)
    finally:
        ck.close()
    if logits:
        _run_logits(out, source, rep, max_rel_err, min_top1)
    return rep


def _run_logits(out: Path, source, rep: VerifyReport, max_rel_err: float, min_top1: float) -> None:
    if not isinstance(source, (str, os.PathLike)):
        rep.logits = {"error": "--logits needs --source as an HF checkpoint directory"}
        rep.error(f"logits: {rep.logits['error']}")
        return
    try:
        rep.logits = compare_logits(out, source, max_rel_err=max_rel_err, min_top1=min_top1)
    except Exception as e:  # transformers raises many types when a checkpoint does not load
        hint = " (see transformers-check)" if rep.transformers else ""
        rep.logits = {"error": f"transformers could not load and run the checkpoints: {type(e).__name__}: {e}{hint}"}
        rep.error(f"logits: {rep.logits['error']}")
        return
    if not rep.logits["ok"]:
        rep.error(f"logits: {_logits_line(rep.logits)}")


def _tp_list(text: str) -> list[int]:
    try:
        tps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--serve-tp {text!r}: write sizes like 1,2,4,8") from None
    if not tps or min(tps) < 1:
        raise argparse.ArgumentTypeError(f"--serve-tp {text!r}: sizes must be integers >= 1")
    return tps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-fp8pb-verify", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="the exported checkpoint directory")
    p.add_argument("--source", help="HF checkpoint directory the export came from (byte-exact comparison)")
    p.add_argument("--serve-tp", type=_tp_list, default=None,
                   help="comma-separated TP sizes that must serve in vLLM/SGLang (else 1,2,4,8 are only reported)")
    p.add_argument("--logits", action="store_true", help="compare transformers logits of source and output (CPU)")
    p.add_argument("--json", dest="json_path", help="write the full report to this JSON file")
    p.add_argument("--scan-weights", action="store_true", help="without --source, still scan FP8 weights for NaN")
    p.add_argument("--max-rel-err", type=float, default=0.1, help="--logits: max relative logit error (0.1)")
    p.add_argument("--min-top1", type=float, default=0.9, help="--logits: min top-1 agreement (0.9)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point: print the table, write the JSON report, return 0 only when everything passes."""
    args = build_parser().parse_args(argv)
    rep = verify_checkpoint(args.out_dir, source=args.source, serve_tp=args.serve_tp or (), logits=args.logits,
                            scan_weights=args.scan_weights, max_rel_err=args.max_rel_err, min_top1=args.min_top1)
    print(rep.table())
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rep.to_json(), indent=2) + "\n")
    return 0 if rep.ok else 1
