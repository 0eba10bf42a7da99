"""FORMAT.md checks that need no source: config.json, dtypes, scales, which linears are quantized."""
from __future__ import annotations

import json
import re

import torch

from megatron_fp8pb.safetensors_dtypes import torch_dtype
from megatron_fp8pb.quant.reference import BLOCK, SCALE_FMTS
from megatron_fp8pb.quant.blockmath import pow2_ceil
from .names import is_linear_weight, module_of, never_fp8
from .reading import Checkpoint, row_chunks
from .report import FP8, SCALE_SUFFIX, TensorInfo, VerifyReport

FORBIDDEN_SUFFIXES = (".input_scale", ".weight_scale", ".activation_scale")
REQUIRED_QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
KNOWN_QC_KEYS = set(REQUIRED_QC) | {"modules_to_not_convert", "ignored_layers", "scale_fmt"}


def should_convert_module(full_name: str, patterns: list[str] | None) -> bool:
    """transformers' rule (``quantizers_utils.should_convert_module``): a module is skipped when a pattern matches it
    from the start up to a module boundary (as a regex), or as a suffix."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", full_name) or full_name.endswith(key) for key in patterns)


def check_quant_config(cfg: dict, rep: VerifyReport) -> list[str] | None:
    """Validate ``quantization_config`` field by field. Returns modules_to_not_convert ([] when absent or broken),
    or None when the config has no quantization_config (an unquantized export)."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        rep.error(f"config.json quantization_config is a {type(qc).__name__}, not an object")
        return []
    for key, want in REQUIRED_QC.items():
        if qc.get(key) != want:
            rep.error(f"config.json quantization_config.{key} = {json.dumps(qc.get(key))}, FORMAT.md requires "
                      f"{json.dumps(want)}")
    fmt = qc.get("scale_fmt", "amax")
    fmt = "amax" if fmt == "float" else fmt      # transformers writes "float" for float32 amax/448 scales
    if fmt in SCALE_FMTS:
        rep.scale_fmt = fmt
    else:
        rep.error(f"config.json quantization_config.scale_fmt = {json.dumps(qc.get('scale_fmt'))} is unknown: "
                  f"FORMAT.md defines \"ue8m0\" (power-of-two block scales) or no key (amax/448)")
    extra = sorted(set(qc) - KNOWN_QC_KEYS)
    if extra:
        rep.warn(f"config.json quantization_config has keys FORMAT.md does not define: {extra}")
    skip = qc.get("modules_to_not_convert")
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        rep.error(f"config.json quantization_config.modules_to_not_convert = {json.dumps(skip)}, must be a list of "
                  f"HF module names (e.g. [\"lm_head\"])")
        return []
    ignored = qc.get("ignored_layers")
    if ignored is not None and sorted(ignored) != sorted(skip):
        rep.error("config.json quantization_config.ignored_layers differs from modules_to_not_convert; vLLM reads the "
                  "first, transformers the second: write the same list to both")
    return skip


def check_vocab_and_tie(cfg: dict, tensors: dict[str, TensorInfo], rep: VerifyReport) -> None:
    """vocab_size = rows of the embedding (and of lm_head); tie_word_embeddings true iff no lm_head.weight."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    vocab = text.get("vocab_size", cfg.get("vocab_size"))
    embed = next((t for n, t in tensors.items() if n.endswith("embed_tokens.weight")), None)
    if embed is None:
        rep.error("no model.embed_tokens.weight tensor in the checkpoint; the export is incomplete")
    elif vocab != embed.shape[0]:
        rep.error(f"config.json vocab_size = {vocab}, but tensor {embed.name!r} has {embed.shape[0]} rows; set "
                  f"vocab_size to {embed.shape[0]} (the real, unpadded vocabulary)")
    head = tensors.get("lm_head.weight")
    if head is not None and vocab != head.shape[0]:
        rep.error(f"config.json vocab_size = {vocab}, but tensor 'lm_head.weight' has {head.shape[0]} rows; write "
                  f"lm_head with the real vocabulary")
    tie = text.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
    if tie is None:
        rep.warn("config.json has no tie_word_embeddings; loaders fall back to the architecture's default")
    elif tie and head is not None:
        rep.error("config.json tie_word_embeddings = true, but 'lm_head.weight' is written (loaders drop it and "
                  "reuse the embedding); set tie_word_embeddings to false")
    elif not tie and head is None:
        rep.error("config.json tie_word_embeddings = false, but there is no 'lm_head.weight'; write lm_head.weight "
                  "or set tie_word_embeddings to true")


def output_dtype(cfg: dict) -> torch.dtype:
    """The unquantized dtype of the checkpoint (config ``dtype`` / ``torch_dtype``, bfloat16 when absent)."""
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    got = torch_dtype(str(d))
    return got if got in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def expected_scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    """[N, K] -> [ceil(N/block), ceil(K/block)]."""
    return -(-shape[0] // block), -(-shape[1] // block)


def check_tensors(ck: Checkpoint, skip: list[str] | None, rep: VerifyReport) -> None:
    """Dtypes, scales and the quantized/unquantized split of every tensor (scales are read, weights are not)."""
    for name, t in ck.tensors.items():
        if name.endswith(SCALE_SUFFIX):
            _check_scale_owner(name, ck.tensors, rep)
            continue
        if name.endswith(FORBIDDEN_SUFFIXES):
            rep.fail(name, f"tensor {name!r}: FORMAT.md has no {name.rsplit('.', 1)[-1]} (dynamic activations, "
                           f"scales only as weight_scale_inv); remove it")
        elif t.dtype.startswith("F8_"):
            _check_fp8_weight(ck, name, skip, rep)
        elif skip is not None and is_linear_weight(name, t.shape) and should_convert_module(module_of(name), skip):
            rep.fail(name, f"tensor {name!r} is {t.dtype}, but module {module_of(name)!r} is not matched by "
                           f"modules_to_not_convert, so loaders expect F8_E4M3 + weight_scale_inv; quantize it or "
                           f"add it to modules_to_not_convert")


def _check_scale_owner(name: str, tensors: dict[str, TensorInfo], rep: VerifyReport) -> None:
    weight = name[:-len(SCALE_SUFFIX)]
    owner = tensors.get(weight)
    if owner is None or owner.dtype != FP8:
        what = "does not exist" if owner is None else f"is {owner.dtype}"
        rep.fail(weight, f"tensor {name!r} is a stray scale: its weight {weight!r} {what}; remove the scale or "
                         f"quantize the weight")


def _check_fp8_weight(ck: Checkpoint, name: str, skip: list[str] | None, rep: VerifyReport) -> None:
    t = ck.tensors[name]
    module = module_of(name)
    if skip is None:
        rep.fail(name, f"tensor {name!r} is {t.dtype}, but config.json has no quantization_config; add it or write "
                       f"the tensor unquantized")
        return
    if t.dtype != FP8:
        rep.fail(name, f"tensor {name!r} is {t.dtype}; FORMAT.md weights are F8_E4M3 (float8_e4m3fn)")
        return
    if not name.endswith(".weight") or len(t.shape) != 2:
        rep.fail(name, f"tensor {name!r} {list(t.shape)} is F8_E4M3, but only 2-D linear .weight tensors are "
                       f"quantized; write it in the source dtype")
        return
    if never_fp8(module):
        rep.fail(name, f"tensor {name!r} is F8_E4M3, but embeddings, norms and routers stay in the source dtype")
    elif not should_convert_module(module, skip):
        rep.fail(name, f"tensor {name!r} is F8_E4M3, but module {module!r} is matched by modules_to_not_convert; "
                       f"write it unquantized or remove it from the list")
    elif not is_linear_weight(name, t.shape):
        rep.warn(f"tensor {name!r} is F8_E4M3 but {module!r} is not a known linear (q/k/v/o, gate/up/down, "
                 f"lm_head); make sure the loaders build it as a linear")
    _check_scale(ck, name, rep)


def _check_scale(ck: Checkpoint, name: str, rep: VerifyReport) -> None:
    t = ck.tensors[name]
    sname = name + SCALE_SUFFIX
    s = ck.tensors.get(sname)
    want = expected_scale_shape(t.shape)
    if s is None:
        rep.fail(name, f"tensor {name!r} is F8_E4M3 but has no {sname!r}; write its float32 block scales "
                       f"{list(want)} = [ceil(N/128), ceil(K/128)] next to it")
        return
    if s.dtype != "F32":
        rep.fail(name, f"tensor {sname!r} is {s.dtype}; weight_scale_inv must be F32 (float32)")
    if s.shape != want:
        rep.fail(name, f"tensor {sname!r} has shape {list(s.shape)}, expected {list(want)} = [ceil({t.shape[0]}/128),"
                       f" ceil({t.shape[1]}/128)] for weight {name!r} {list(t.shape)}; re-export it")
        return
    if s.file != t.file:
        rep.fail(name, f"tensor {sname!r} is in {s.file} but its weight {name!r} in {t.file}; keep a weight and its "
                       f"weight_scale_inv in the same shard")
    if s.dtype == "F32":
        _check_scale_values(ck.read(sname), sname, name, rep)


def _check_scale_values(scale: torch.Tensor, sname: str, name: str, rep: VerifyReport) -> None:
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        rep.fail(name, f"tensor {sname!r}: {int(bad.sum())} block scale(s) not finite and > 0, first at block {idx} "
                       f"= {scale[idx].item()}; every block scale must be amax/448 (1.0 for an all-zero block)")
    elif rep.scale_fmt == "ue8m0":
        bad = pow2_ceil(scale) != scale
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
            rep.fail(name, f"tensor {sname!r}: {int(bad.sum())} block scale(s) not a power of two, first at block "
                           f"{idx} = {scale[idx].item()!r}, but quantization_config.scale_fmt is \"ue8m0\"; every "
                           f"block scale must be 2^ceil(log2(amax/448)): re-export with quant.scale_fmt=ue8m0")


def scan_fp8_nan(ck: Checkpoint, rep: VerifyReport) -> None:
    """Read every FP8 weight in 128-row chunks and fail the ones holding NaN bytes (0x7F / 0xFF)."""
    for name, t in ck.tensors.items():
        if t.dtype != FP8 or len(t.shape) != 2:
            continue
        nan = sum(_nan_bytes(ck.read(name, a, a + n)) for a, n in row_chunks(t.shape))
        if nan:
            rep.fail(name, f"tensor {name!r} holds {nan} NaN byte(s) (0x7F/0xFF); the file is corrupt, re-export it")


def _nan_bytes(q: torch.Tensor) -> int:
    return int(((q.view(torch.uint8) & 0x7F) == 0x7F).sum())
