"""Where the checkpoint serves: vLLM/SGLang partition rules, transformers loading, and logits."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_fp8pb.verify import serve_check
from megatron_fp8pb.quant.reference import BLOCK, FP8_MAX
from .names import is_linear_weight, module_of
from .report import FP8, TensorInfo, VerifyReport

def compare_logits(out_dir: str | os.PathLike, src_dir: str | os.PathLike, *, batch: int = 4, seq: int = 16,
                   seed: int = 0, max_rel_err: float = 0.1, min_top1: float = 0.9) -> dict:
    """Load both checkpoints with transformers on CPU (the FP8 one dequantized), run ``batch`` x ``seq`` seeded
    random token ids below vocab_size, twice for the output: weights only (W8A16, ``rel_err``, ``top1``) and with the
    servers' dynamic activation quantization simulated in every quantized linear (W8A8: per token, per 128 input
    channels, e4m3, ``w8a8_rel_err``, ``w8a8_top1``). rel_err = ||a-b||/||b|| against the source; both must meet
    the thresholds."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(out_dir))
    vocab = cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ref, _, _ = _logits_of(src_dir, ids, None)
    out, w8a8, simulated = _logits_of(out_dir, ids, getattr(cfg, "quantization_config", None))
    res = {"max_rel_err": max_rel_err, "min_top1": min_top1, "batch": batch, "seq": seq, "seed": seed}
    for tag, got in (("", out), ("w8a8_", w8a8)):
        res[tag + "rel_err"] = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        res[tag + "top1"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    res["w8a8_linears"] = simulated
    res["ok"] = all(res[t + "rel_err"] <= max_rel_err and res[t + "top1"] >= min_top1 for t in ("", "w8a8_"))
    return res


def quantize_activation(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The servers' dynamic activation quantization, simulated: x [..., K] -> x with every 1 x ``block`` group of
    each token quantized to e4m3 with scale amax/448 (1.0 for an all-zero group) and dequantized, in x's dtype."""
    k = x.shape[-1]
    xf = torch.nn.functional.pad(x.float(), (0, (-k) % block))
    g = xf.reshape(*xf.shape[:-1], -1, block)
    amax = g.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(xf.shape)[..., :k].to(x.dtype)


def _logits_of(path, ids: torch.Tensor, qc) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """logits [batch, seq, vocab] float32 of the checkpoint at ``path`` (FP8 dequantized on load); for an FP8
    checkpoint also the logits with activations quantized at the input of every quantized nn.Linear, and how many
    linears that covers."""
    from transformers import AutoModelForCausalLM
    kw = {}
    if qc is not None:
        from transformers import FineGrainedFP8Config
        qd = qc if isinstance(qc, dict) else qc.to_dict()
        kw["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=tuple(qd.get("weight_block_size") or (128, 128)),
            modules_to_not_convert=qd.get("modules_to_not_convert"))
    from transformers.utils import logging as tf_logging
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu", **kw)
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        if qc is None:
            return logits, None, 0
        quantized = _fp8_modules(path)
        hooks = [m.register_forward_pre_hook(lambda _m, args: (quantize_activation(args[0]), *args[1:]))
                 for name, m in model.named_modules() if name in quantized and isinstance(m, torch.nn.Linear)]
        try:
            w8a8 = model(input_ids=ids).logits.float()
        finally:
            for h in hooks:
                h.remove()
    del model
    return logits, w8a8, len(hooks)


def _fp8_modules(path) -> set[str]:
    """Module names of the FP8 weights of the checkpoint at ``path``."""
    from .reading import check_index
    rep = VerifyReport(out_dir=str(path))
    return {module_of(n) for n, t in check_index(Path(path), rep).items() if t.dtype == FP8}


def quantized_modules(tensors: dict[str, TensorInfo]) -> dict[str, tuple[int, int]]:
    """module -> (N, K) of every 2-D FP8 weight."""
    return {module_of(n): (t.shape[0], t.shape[1]) for n, t in tensors.items() if t.dtype == FP8 and
            len(t.shape) == 2}


def run_serve_checks(tensors: dict[str, TensorInfo], cfg: dict, serve_tp: Iterable[int], info_tp: Iterable[int],
                     rep: VerifyReport) -> None:
    """Serve problems are errors at the required ``serve_tp``, warnings at the ``info_tp``; transformers problems
    are warnings."""
    mods = quantized_modules(tensors)
    unq = [module_of(n) for n, t in tensors.items() if t.dtype != FP8 and is_linear_weight(n, t.shape)]
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg   # a vision-language config
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads") or heads
    norms = {n: t.shape[0] for n, t in tensors.items()
             if len(t.shape) == 1 and n.endswith(serve_check.FULL_WIDTH_NORMS)}
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
    rep.serve_required = sorted(set(serve_tp))
    for tp in sorted(set(serve_tp) | set(info_tp)):
        if norms and heads and head_dim:
            for p in serve_check.norm_problems(norms, tp, heads, kv, head_dim)[:1]:
                rep.warn(f"serve-check tp={tp}: {p}")
        probs = serve_check.serve_problems(mods, tp, num_kv_heads=kv)
        rep.serve[tp] = probs
        if tp in rep.serve_required:
            rep.errors.extend(f"serve-check: {p}" for p in probs)
        elif probs:
            rep.warn(f"serve-check tp={tp}: vLLM/SGLang refuse {len(probs)} layer(s), e.g. {probs[0]}")
    rep.fused_partial = serve_check.fused_partial_problems(mods, unq)
    if rep.fused_partial and rep.serve_required:
        rep.errors.extend(f"serve-check: {p}" for p in rep.fused_partial)
    elif rep.fused_partial:
        rep.warn(f"serve-check: {len(rep.fused_partial)} quantized module(s) fused with unquantized ones, e.g. "
                 f"{rep.fused_partial[0]}")
    rep.transformers = serve_check.transformers_problems(mods)
    if rep.transformers and rep.transformers_required:
        rep.errors.extend(f"transformers-check: {p}" for p in rep.transformers)
    elif rep.transformers:
        rep.warn(f"transformers-check: {len(rep.transformers)} quantized weight(s) with rows/cols not multiples of "
                 f"128, which transformers' dequantize gets wrong or refuses (vLLM/SGLang are fine), e.g. "
                 f"{rep.transformers[0]}")


def transformers_load(out: str | os.PathLike) -> dict:
    """Load the checkpoint with transformers on the meta device (no weight is materialized): the model class its
    config.json names, with its FP8 quantizer. Returns {"model", "missing", "unexpected", "mismatched", "error"}:
    keys of the checkpoint that no parameter takes, parameters no key fills, shapes that disagree."""
    import json

    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging as tf_logging
    model_type = json.loads((Path(out) / "config.json").read_text()).get("model_type")
    if model_type not in CONFIG_MAPPING:
        return {"skipped": f"transformers has no built-in model_type {model_type!r}; its code is the checkpoint's "
                           f"own (config.json auto_map), which is not run here"}
    bars, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        # use_kernels=False: transformers >= 5.25 kernelizes by default, which refuses the meta device
        model, info = AutoModelForCausalLM.from_pretrained(str(out), device_map="meta", output_loading_info=True,
                                                           use_kernels=False)
    except Exception as e:  # transformers raises many types when a checkpoint does not load
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()
    out = {"model": type(model).__name__, "error": None}
    for key in ("missing", "unexpected", "mismatched"):
        out[key] = sorted(str(k) for k in info.get(f"{key}_keys") or ())
    return out


def check_transformers_load(out: str | os.PathLike, rep: VerifyReport) -> None:
    rep.transformers_load = ld = transformers_load(out)
    if ld.get("skipped"):
        return
    if ld.get("error") and rep.transformers:
        # on a machine without a GPU transformers dequantizes while loading, and refuses the weights listed by
        # the transformers-check (an error already when transformers is a required target)
        ld["error"] = f"{ld['error']} (its CPU dequantize refuses the weights of the transformers-check)"
        rep.warn(f"transformers-check: transformers cannot load the checkpoint here: {ld['error']}")
        return
    if ld.get("error"):
        rep.error(f"transformers cannot load the checkpoint (meta device): {ld['error']}")
        return
    for key in ("missing", "unexpected", "mismatched"):
        if ld[key]:
            rep.error(f"transformers ({ld['model']}, meta device) finds {len(ld[key])} {key} key(s), e.g. "
                      f"{ld[key][:3]}; the tensor names or shapes do not fit the architecture of config.json")
