"""Where the checkpoint serves: vLLM/SGLang partition rules and the transformers load."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import megatron_fp8pb.verify.serve_check as serve_check
from .names import is_linear_weight, module_of
from .report import FP8, TensorInfo, VerifyReport

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
