"""Logits of the checkpoint against its bf16 source, measured beside the reference quantization of the same source.

Three models run the same seeded random token ids on CPU in float32: the bf16 source; the checkpoint, its FP8
weights dequantized exactly as FORMAT.md says (``float(q) * weight_scale_inv``); and the reference quantization of
the source, the same modules quantized with ``quantize_blockfp8_reference``. Each quantized model runs twice: weights
only (W8A16) and with the servers' dynamic activation quantization simulated at the input of every quantized linear
(W8A8).

The reference's distance from bf16 is what the format costs on this model. It is reported and never fails: on
nearly flat logits (random weights) FP8 rounding alone moves top-1. The checkpoint fails only when it is further from
bf16 than the reference beyond a small slack, which a byte-exact checkpoint never is: its logits are the
reference's.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from megatron_fp8pb.quant.format import FORMAT
from megatron_fp8pb.quant.reference import BLOCK, FP8_MAX, dequantize_blockfp8, quantize_blockfp8_reference
from .names import module_of
from .reading import Checkpoint, check_index
from .report import FP8, SCALE_SUFFIX, VerifyReport

REL_ERR_SLACK = 0.02    # the checkpoint's rel err may exceed the reference's by this fraction of it
TOP1_SLACK = 0.02       # the checkpoint's top-1 agreement may be this much below the reference's
KINDS = (("W8A16", ""), ("W8A8", "w8a8_"))


def compare_logits(out_dir: str | os.PathLike, src_dir: str | os.PathLike, *, batch: int = 4, seq: int = 16,
                   seed: int = 0, rel_err_slack: float = REL_ERR_SLACK, top1_slack: float = TOP1_SLACK) -> dict:
    """Logit error and top-1 agreement against the bf16 source, of the checkpoint and of the reference quantization.

    rel_err = ||logits - bf16|| / ||bf16||, top1 = the fraction of the ``batch`` x ``seq`` positions whose argmax
    matches bf16's. Keys: ``rel_err``, ``top1`` (checkpoint, W8A16), ``w8a8_rel_err``, ``w8a8_top1``; the same with
    ``ref_`` for the reference quantization; ``to_ref`` and ``w8a8_to_ref`` = ||checkpoint - reference|| /
    ||reference||; ``ok`` and ``failures`` (the rule: rel_err <= ref_rel_err * (1 + rel_err_slack) and
    top1 >= ref_top1 - top1_slack, for W8A16 and W8A8).
    """
    out_dir, src_dir = Path(out_dir), Path(src_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    text_cfg = cfg.get("text_config") or cfg
    ids = torch.randint(0, int(text_cfg["vocab_size"]), (batch, seq), generator=torch.Generator().manual_seed(seed))
    bf16, _, _, src_bad = _run(src_dir, ids, set())
    output, reference, fp8 = _weights(out_dir, src_dir, cfg)
    res: dict = {"batch": batch, "seq": seq, "seed": seed, "rel_err_slack": rel_err_slack, "top1_slack": top1_slack}
    runs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="fp8pb-logits-") as tmp:
        for prefix, state in (("", output), ("ref_", reference)):
            path = _write_plain(Path(tmp) / f"{prefix}model", cfg, state)
            state.clear()
            w8a16, w8a8, res["w8a8_linears"], bad = _run(path, ids, fp8)
            bad = {k: [n for n in v if n not in src_bad.get(k, ())] for k, v in bad.items()}
            if any(bad.values()):
                raise ValueError("the checkpoint's tensors do not fit the model of its config.json: " + ", ".join(
                    f"{len(v)} {k} key(s), e.g. {v[:2]}" for k, v in bad.items() if v))
            runs[prefix] = (w8a16, w8a8)
            for (_, tag), got in zip(KINDS, runs[prefix]):
                res[prefix + tag + "rel_err"] = _rel(got, bf16)
                res[prefix + tag + "top1"] = float((got.argmax(-1) == bf16.argmax(-1)).float().mean())
    for i, (_, tag) in enumerate(KINDS):
        res[tag + "to_ref"] = _rel(runs[""][i], runs["ref_"][i])
    res["failures"] = failures(res)
    res["ok"] = not res["failures"]
    return res


def failures(lg: dict) -> list[str]:
    """Where the checkpoint's logits are further from bf16 than the reference quantization's, beyond the slack."""
    out = []
    for kind, tag in KINDS:
        err, ref_err = lg[tag + "rel_err"], lg["ref_" + tag + "rel_err"]
        if err > ref_err * (1 + lg["rel_err_slack"]) + 1e-7:
            out.append(f"{kind} rel err {err:.4g} > the reference quantization's {ref_err:.4g} x "
                       f"{1 + lg['rel_err_slack']:g}")
        top1, ref_top1 = lg[tag + "top1"], lg["ref_" + tag + "top1"]
        if top1 < ref_top1 - lg["top1_slack"] - 1e-9:
            out.append(f"{kind} top-1 {top1:.3f} < the reference quantization's {ref_top1:.3f} - {lg['top1_slack']:g}")
    return out


def quantize_activation(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The servers' dynamic activation quantization, simulated: x [..., K] -> x with every 1 x ``block`` group of
    each token quantized to e4m3 with scale amax/448 (1.0 for an all-zero group) and dequantized, in x's dtype."""
    k = x.shape[-1]
    xf = torch.nn.functional.pad(x.float(), (0, (-k) % block))
    g = xf.reshape(*xf.shape[:-1], -1, block)
    amax = g.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(FORMAT.fp8_dtype).float() * scale
    return q.reshape(xf.shape)[..., :k].to(x.dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _weights(out_dir: Path, src_dir: Path, cfg: dict) -> tuple[dict, dict, set[str]]:
    """(the checkpoint's tensors with FP8 dequantized to float32, the reference quantization of the source
    dequantized the same way, the modules quantized). Both hold the checkpoint's tensor names."""
    from megatron_fp8pb.sources.hf import HFReader
    from .format import output_dtype
    from .source import UntiedSource
    rep = VerifyReport(out_dir=str(out_dir))
    ck = Checkpoint(out_dir, check_index(out_dir, rep))
    if rep.errors:
        raise ValueError(f"the checkpoint cannot be read: {rep.errors[0]}")
    scale_fmt = (cfg.get("quantization_config") or {}).get("scale_fmt") or "amax"
    dtype = output_dtype(cfg)
    src = UntiedSource.wrap(HFReader(src_dir))
    src_names = set(src.names())
    output, reference, fp8 = {}, {}, set()
    try:
        for name, t in ck.tensors.items():
            if name.endswith(SCALE_SUFFIX):
                continue
            got = ck.read(name)
            if t.dtype == FP8:
                fp8.add(module_of(name))
                output[name] = dequantize_blockfp8(got, ck.read(name + SCALE_SUFFIX), dtype=torch.float32)
            else:
                output[name] = got
            if name not in src_names:      # the source comparison fails it; the reference takes the checkpoint's
                reference[name] = output[name]
            elif t.dtype == FP8:
                q, s = quantize_blockfp8_reference(src.read(name).to(dtype), name=name, scale_fmt=scale_fmt)
                reference[name] = dequantize_blockfp8(q, s, dtype=torch.float32)
            else:
                reference[name] = src.read(name)
    finally:
        ck.close()
    return output, reference, fp8


def _write_plain(path: Path, cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    """An unquantized HF checkpoint of ``state`` under the checkpoint's config (without quantization_config)."""
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    (path / "config.json").write_text(json.dumps(plain, indent=2))
    save_file({n: t.contiguous() for n, t in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _run(path: Path, ids: torch.Tensor, fp8: set[str]) -> tuple[torch.Tensor, torch.Tensor | None, int, dict]:
    """logits [batch, seq, vocab] float32 of the unquantized checkpoint at ``path``; with ``fp8`` modules also the
    logits with activations quantized at the input of each of them that is an nn.Linear, and how many that is; and
    the missing / unexpected / mismatched keys of the load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as tf_logging
    bars, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu",
                                                           output_loading_info=True)
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()
    bad = {k: sorted(map(str, info.get(f"{k}_keys") or ())) for k in ("missing", "unexpected", "mismatched")}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        hooks = [m.register_forward_pre_hook(lambda _m, args: (quantize_activation(args[0]), *args[1:]))
                 for name, m in model.named_modules() if name in fp8 and isinstance(m, torch.nn.Linear)]
        try:
            w8a8 = model(input_ids=ids).logits.float() if fp8 else None
        finally:
            for h in hooks:
                h.remove()
    del model
    return logits, w8a8, len(hooks), bad
