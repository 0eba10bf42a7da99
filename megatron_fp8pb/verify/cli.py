"""``verify_checkpoint`` (every check in order) and the command line."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .format import check_quant_config, check_tensors, check_vocab_and_tie, output_dtype, scan_fp8_nan
from .reading import Checkpoint, _load_json, check_index
from .logits import REL_ERR_SLACK, TOP1_SLACK, compare_logits
from .report import DEFAULT_INFO_TP, VerifyReport
from .serving import check_transformers_load, run_serve_checks
from .source import _open_source, compare_to_source

def verify_checkpoint(out_dir: str | os.PathLike, source=None, serve_tp: Iterable[int] = (), logits: bool = False,
                      *, serve_transformers: bool = False, tolerance: str = "exact", load: bool = True,
                      info_tp: Iterable[int] = DEFAULT_INFO_TP, scan_weights: bool = False,
                      rel_err_slack: float = REL_ERR_SLACK, top1_slack: float = TOP1_SLACK) -> VerifyReport:
    """Check the checkpoint at ``out_dir`` (see the module docstring).

    source: None, an HF bf16 checkpoint directory, or a reader (``hf_source.DictReader``-like).
    serve_tp: TP sizes that must serve (their problems are errors); info_tp: TP sizes reported as warnings.
    serve_transformers: transformers must dequantize every FP8 weight right (its problems are errors).
    tolerance: "exact" (every FP8 tensor must be the reference quantization of the source) or "bound" (a tensor
    within the e4m3 error bound passes, with a warning: for checkpoints from tools that round differently).
    load: load the checkpoint with transformers on the meta device (keys and shapes against the architecture).
    logits: logits of the checkpoint and of the reference quantization of the source against the bf16 source (needs
    ``source`` as a directory, see ``logits.compare_logits``); the checkpoint fails when its rel err exceeds the
    reference's by more than ``rel_err_slack`` of it, or its top-1 is more than ``top1_slack`` below.
    scan_weights: without a source, still read every FP8 weight and fail NaN bytes.
    """
    out = Path(out_dir)
    src_label = None if source is None else (str(source) if isinstance(source, (str, os.PathLike))
                                             else type(source).__name__)
    if tolerance not in ("exact", "bound"):
        raise ValueError(f"tolerance={tolerance!r}: choose exact or bound")
    rep = VerifyReport(out_dir=str(out), source=src_label, tolerance=tolerance,
                       transformers_required=serve_transformers)
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
    if load and (out / "config.json").is_file():
        check_transformers_load(out, rep)
    if logits:
        _run_logits(out, source, rep, rel_err_slack, top1_slack)
    return rep


def _run_logits(out: Path, source, rep: VerifyReport, rel_err_slack: float, top1_slack: float) -> None:
    if not isinstance(source, (str, os.PathLike)):
        rep.logits = {"error": "--logits needs --source as an HF checkpoint directory"}
        rep.error(f"logits: {rep.logits['error']}")
        return
    try:
        rep.logits = compare_logits(out, source, rel_err_slack=rel_err_slack, top1_slack=top1_slack)
    except Exception as e:  # transformers raises many types when a checkpoint does not load
        rep.logits = {"error": f"transformers could not load and run the checkpoints: {type(e).__name__}: {e}"}
        rep.error(f"logits: {rep.logits['error']}")
        return
    if not rep.logits["ok"]:
        rep.error(f"logits: the checkpoint is further from bf16 than the reference quantization of the same source "
                  f"({'; '.join(rep.logits['failures'])}); its tensors are not what this format reaches, see the "
                  f"tensor errors and re-export")


def _targets(text: str) -> tuple[tuple[int, ...], bool]:
    from ..config import serve_targets
    try:
        tps, tf = serve_targets(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--serve-tp {text!r}: write TP sizes and/or transformers, like "
                                         f"1,2,4,8 or 4,transformers") from None
    if not (tps or tf):
        raise argparse.ArgumentTypeError(f"--serve-tp {text!r}: name at least one TP size or transformers")
    return tps, tf


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-fp8pb-verify", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="the exported checkpoint directory")
    p.add_argument("--source", help="HF checkpoint directory the export came from (byte-exact comparison)")
    p.add_argument("--serve-tp", type=_targets, default=None,
                   help="targets that must load the checkpoint right: vLLM/SGLang TP sizes and/or transformers, "
                        "e.g. 2,8 or 4,transformers (else TP 1,2,4,8 and transformers are only reported)")
    p.add_argument("--tolerance", choices=("exact", "bound"), default="exact",
                   help="exact (default): every FP8 tensor must be the reference quantization of --source, byte for "
                        "byte; bound: a tensor within the e4m3 error bound passes (checkpoints made by tools that "
                        "round differently)")
    p.add_argument("--logits", action="store_true",
                   help="logits on CPU of the output and of the reference quantization of --source against the bf16 "
                        "source: weight-only (W8A16) and with activations quantized per token per 128 (W8A8, as "
                        "servers run it); the output fails only when it is further from bf16 than the reference")
    p.add_argument("--no-load", dest="load", action="store_false",
                   help="skip loading the checkpoint with transformers on the meta device")
    p.add_argument("--json", dest="json_path", help="write the full report to this JSON file")
    p.add_argument("--scan-weights", action="store_true", help="without --source, still scan FP8 weights for NaN")
    p.add_argument("--rel-err-slack", type=float, default=REL_ERR_SLACK,
                   help=f"--logits: how far the output's logit rel err may exceed the reference quantization's, as a "
                        f"fraction of it ({REL_ERR_SLACK})")
    p.add_argument("--top1-slack", type=float, default=TOP1_SLACK,
                   help=f"--logits: how far the output's top-1 agreement may fall below the reference's ({TOP1_SLACK})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point: print the table, write the JSON report, return 0 only when everything passes."""
    args = build_parser().parse_args(argv)
    tps, tf = args.serve_tp or ((), False)
    rep = verify_checkpoint(args.out_dir, source=args.source, serve_tp=tps, logits=args.logits,
                            serve_transformers=tf, tolerance=args.tolerance, load=args.load,
                            scan_weights=args.scan_weights, rel_err_slack=args.rel_err_slack,
                            top1_slack=args.top1_slack)
    print(rep.table(json_path=args.json_path))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rep.to_json(), indent=2) + "\n")
    return 0 if rep.ok else 1
