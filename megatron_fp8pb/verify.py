"""Prove a written block-FP8 checkpoint right (FORMAT.md) and say at which tensor-parallel sizes it serves.

``verify_checkpoint(out_dir, source=..., serve_tp=..., logits=...)`` reads the checkpoint lazily: safetensors headers
first, then one tensor (or a block of 128-row chunks of one) at a time, never the whole model. Checks:

- config.json ``quantization_config`` exactly as FORMAT.md; without one, no FP8 tensor anywhere;
- ``model.safetensors.index.json`` complete and true (every tensor listed, every listed tensor present, total_size);
- every F8_E4M3 ``<m>.weight`` [N, K] has a float32 ``<m>.weight_scale_inv`` [ceil(N/128), ceil(K/128)] in the
  same file, finite and > 0; no ``input_scale`` / ``weight_scale``; every linear not matched by
  ``modules_to_not_convert`` (transformers' matching rule) is FP8 and every matched one is not;
- ``vocab_size`` and ``tie_word_embeddings`` agree with the tensors;
- against a source: FP8 tensors byte-identical to ``blockfp8.quantize_blockfp8_reference`` of the source tensor,
  or within the e4m3 dequantization bound; the rest equal to the source cast to the output dtype;
- optionally logits of the transformers-loaded source and output on a fixed prompt batch;
- serve-check (vLLM / SGLang partition rules) and transformers-check (``serve_check``).

CLI: ``python -m megatron_fp8pb.verify OUT_DIR [--source SRC] [--serve-tp 1,2,4,8] [--logits] [--json R.json]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import archs, serve_check
from .blockfp8 import BLOCK, dequantize_blockfp8, e4m3_error_bound, quantize_blockfp8_reference

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8 = "F8_E4M3"
FORBIDDEN_SUFFIXES = (".input_scale", ".weight_scale", ".activation_scale")
EXPERT_LEAVES = archs.expert_only_leaves()      # Mixtral-style w1 / w2 / w3, linears only inside experts
LINEAR_LEAVES = tuple(x for x in archs.linear_leaves() if x not in EXPERT_LEAVES)
REQUIRED_QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
KNOWN_QC_KEYS = set(REQUIRED_QC) | {"modules_to_not_convert", "ignored_layers"}
DEFAULT_INFO_TP = (1, 2, 4, 8)
CHUNK_ELEMENTS = 1 << 25
BOUND_SLACK = 1e-5          # float32 division in the quantizer may land a hair past a rounding tie
_DTYPE_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2,
                "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}
_CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def should_convert_module(full_name: str, patterns: list[str] | None) -> bool:
    """transformers' rule (``quantizers_utils.should_convert_module``): a module is skipped when a pattern matches it
    from the start up to a module boundary (as a regex), or as a suffix."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", full_name) or full_name.endswith(key) for key in patterns)


def module_of(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return name[:-len(".weight")] if name.endswith(".weight") else name


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D ``.weight`` of a linear that FORMAT.md quantizes unless listed: q/k/v/o, gate/up/down (dense, shared and
    experts), Mixtral-style ``experts.{e}.w1/w2/w3``, lm_head."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    module = module_of(name)
    leaf = module.rsplit(".", 1)[-1]
    return leaf in LINEAR_LEAVES or module == "lm_head" or (leaf in EXPERT_LEAVES and ".experts." in module)


def never_fp8(module: str) -> bool:
    """Embeddings, norms and routers stay in the source dtype (FORMAT.md)."""
    leaf = module.rsplit(".", 1)[-1]
    return leaf == "embed_tokens" or "norm" in leaf or leaf in archs.never_quantized_leaves()


# ----------------------------------------------------------------------------------------------------------------
# Report

@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class TensorResult:
    """Per-tensor outcome. status: "exact" | "within-bound" | "FAIL" | "ok" (format only, no source)."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    quantized: bool
    status: str = "ok"
    detail: str = ""
    max_err_ratio: float | None = None      # max |dequant - source| / e4m3 bound, when bytes differ
    bytes_differing: int | None = None
    scales_differing: int | None = None


@dataclass
class VerifyReport:
    out_dir: str
    source: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: dict[str, TensorResult] = field(default_factory=dict)
    serve: dict[int, list[serve_check.Problem]] = field(default_factory=dict)
    serve_required: list[int] = field(default_factory=list)
    fused_partial: list[serve_check.Problem] = field(default_factory=list)
    transformers: list[serve_check.Problem] = field(default_factory=list)
    logits: dict | None = None
    compared: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def fail(self, name: str, msg: str) -> None:
        """An error about one tensor: recorded in ``errors`` and on its per-tensor result."""
        self.errors.append(msg)
        res = self.tensors.get(name) or self.tensors.get(name.removesuffix(SCALE_SUFFIX))
        if res is not None:
            res.status = "FAIL"
            res.detail = f"{res.detail}; {msg}" if res.detail else msg

    def counts(self) -> dict[str, int]:
        rs = list(self.tensors.values())
        return {"checked": len(rs), "quantized": sum(r.quantized for r in rs),
                "exact": sum(r.status == "exact" for r in rs),
                "within_bound": sum(r.status == "within-bound" for r in rs),
                "failed": sum(r.status == "FAIL" for r in rs)}

    def table(self, max_lines: int = 20) -> str:
        """A short human summary: tensor counts, serve-check per TP, transformers-check, logits, first errors."""
        c = self.counts()
        head = "OK" if self.ok else f"FAILED ({len(self.errors)} error(s))"
        vs = "against source" if self.compared else "no --source"
        lines = [f"verify {self.out_dir}: {head}",
                 f"  tensors checked      {c['checked']}",
                 f"  quantized (fp8)      {c['quantized']}",
                 f"  exact                {c['exact'] if self.compared else '-'}  ({vs})",
                 f"  within e4m3 bound    {c['within_bound'] if self.compared else '-'}",
                 f"  failed               {c['failed']}"]
        for tp in sorted(self.serve):
            probs = self.serve[tp]
            tag = " (required)" if tp in self.serve_required else ""
            verdict = "OK" if not probs else f"refused: {len(probs)} layer(s), e.g. {probs[0]}"
            lines.append(f"  serve tp={tp:<3}         {verdict}{tag}")
        if self.fused_partial:
            lines.append(f"  fused modules        {len(self.fused_partial)} partly quantized (refused at any tp)")
        tf = "OK" if not self.transformers else f"{len(self.transformers)} layer(s) with dims not multiples of 128"
        lines.append(f"  transformers load    {tf}")
        if self.logits is not None:
            lines.append(f"  logits               {_logits_line(self.logits)}")
        other = [w for w in self.warnings if not w.startswith(("serve-check", "transformers-check"))]
        lines += [f"  warning: {w}" for w in other[:max_lines]]
        if len(other) > max_lines:
            lines.append(f"  ... and {len(other) - max_lines} more warning(s) (see the JSON report)")
        lines += [f"  error: {e}" for e in self.errors[:max_lines]]
        if len(self.errors) > max_lines:
            lines.append(f"  ... and {len(self.errors) - max_lines} more error(s) (see the JSON report)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": self.ok, "out_dir": self.out_dir, "source": self.source, "counts": self.counts(),
                "errors": list(self.errors), "warnings": list(self.warnings),
                "tensors": [asdict(r) for r in self.tensors.values()],
                "serve": {str(tp): {"required": tp in self.serve_required, "ok": not probs,
                                    "problems": [p.to_json() for p in probs]} for tp, probs in self.serve.items()},
                "fused_partial": [p.to_json() for p in self.fused_partial],
                "transformers": [p.to_json() for p in self.transformers],
                "logits": self.logits}


def _logits_line(lg: dict) -> str:
    if "error" in lg:
        return f"FAILED: {lg['error']}"
    verdict = "OK" if lg["ok"] else "FAILED"
    return (f"rel err {lg['rel_err']:.4g} (max {lg['max_rel_err']}), top-1 agreement {lg['top1']:.3f} "
            f"(min {lg['min_top1']}): {verdict}")


# ----------------------------------------------------------------------------------------------------------------
# Reading the checkpoint

def read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """(``__metadata__``, name -> TensorInfo) of a safetensors file; ValueError naming the file when it is
    truncated or its header is not what the data says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short for a safetensors header; the file is truncated")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise ValueError(f"{path.name}: header length {n} exceeds the file size {size}; the file is truncated")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path.name}: the safetensors header is not JSON ({e}); the file is corrupt") from e
    meta = header.pop("__metadata__", None) or {}
    out, end = {}, 0
    for name, h in header.items():
        shape = tuple(int(s) for s in h["shape"])
        begin, stop = h["data_offsets"]
        want = math.prod(shape) * _DTYPE_BYTES.get(h["dtype"], 0)
        if h["dtype"] in _DTYPE_BYTES and stop - begin != want:
            raise ValueError(f"{path.name}: tensor {name!r} {h['dtype']} {list(shape)} spans {stop - begin} bytes, "
                             f"its shape needs {want}; the file is corrupt")
        out[name] = TensorInfo(name, path.name, h["dtype"], shape, stop - begin)
        end = max(end, stop)
    if 8 + n + end > size:
        raise ValueError(f"{path.name}: the header places data up to byte {8 + n + end} but the file has {size} bytes;"
                         f" the file is truncated (re-export)")
    return meta, out


class Checkpoint:
    """Lazy access to the tensors of an output directory (safetensors handles opened on demand)."""

    def __init__(self, out: Path, tensors: dict[str, TensorInfo]):
        self.out = out
        self.tensors = tensors
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        from safetensors import safe_open
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.out / file), framework="pt")
        return self._handles[file]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name``, or its rows ``[start, stop)``."""
        sl = self._handle(self.tensors[name].file).get_slice(name)
        if start is None:
            return sl[:]
        return sl[start:stop]

    def close(self) -> None:
        self._handles.clear()


def _load_json(path: Path, rep: VerifyReport, what: str) -> dict | None:
    if not path.is_file():
        rep.error(f"{path.name} is missing from {path.parent}; {what}")
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        rep.error(f"{path.name} is not valid JSON ({e}); {what}")
        return None
    if not isinstance(data, dict):
        rep.error(f"{path.name} holds a {type(data).__name__}, not a JSON object; {what}")
        return None
    return data


def check_index(out: Path, rep: VerifyReport) -> dict[str, TensorInfo]:
    """Headers of every shard, and the index checked against them. Returns name -> TensorInfo of what is there
    (natural order) and starts a per-tensor result for every tensor but the scales."""
    index = _load_json(out / INDEX, rep, "write the index {\"metadata\": {\"total_size\"}, \"weight_map\"} (re-export)")
    weight_map = _weight_map(index, rep)
    files = sorted(set(weight_map.values()) | {p.name for p in out.glob("*.safetensors")})
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in _shard_tensors(out, file, weight_map, rep).items():
            if name in tensors:
                rep.error(f"tensor {name!r} is stored twice, in {tensors[name].file} and {file}; keep one copy")
            tensors[name] = info
    tensors = {n: tensors[n] for n in sorted(tensors, key=natural_key)}
    for name, t in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            rep.tensors[name] = TensorResult(name, t.dtype, t.shape, quantized=t.dtype == FP8)
    if index is not None:
        _check_map_against_files(weight_map, tensors, out, rep)
        _check_total_size(index, tensors, rep)
    return tensors


def natural_key(name: str) -> tuple:
    """``model.layers.10.x`` sorts after ``model.layers.9.x``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _weight_map(index: dict | None, rep: VerifyReport) -> dict[str, str]:
    if index is None:
        return {}
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        rep.error(f"{INDEX}: weight_map must map tensor names to shard file names; got {type(wm).__name__}")
        return {}
    return wm


def _shard_tensors(out: Path, file: str, weight_map: dict[str, str], rep: VerifyReport) -> dict[str, TensorInfo]:
    """Header of one shard (errors reported when it is missing, truncated or lacks {"format": "pt"})."""
    path = out / file
    if not path.is_file():
        listed = sorted(n for n, f in weight_map.items() if f == file)
        rep.error(f"{INDEX} maps {len(listed)} tensor(s) (e.g. {listed[:2]}) to {file}, which does not exist; "
                  f"the export is incomplete")
        return {}
    try:
        meta, tensors = read_header(path)
    except (ValueError, KeyError, TypeError) as e:
        rep.error(str(e))
        return {}
    if meta.get("format") != "pt":
        rep.error(f"{file}: safetensors metadata {meta} lacks {{\"format\": \"pt\"}}; transformers refuses the file")
    return tensors


def _check_map_against_files(weight_map: dict[str, str], tensors: dict[str, TensorInfo], out: Path,
                             rep: VerifyReport) -> None:
    """Every stored tensor listed with its file; every listed tensor stored in the file named."""
    for name, t in tensors.items():
        if name not in weight_map:
            rep.fail(name, f"tensor {name!r} in {t.file} is missing from the {INDEX} weight_map; add it (loaders "
                           f"never see it)")
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None and (out / file).is_file():
            rep.error(f"{INDEX} lists tensor {name!r} in {file}, which does not hold it; remove the entry or write it")
        elif info is not None and info.file != file:
            rep.error(f"{INDEX} maps tensor {name!r} to {file}, but it is in {info.file}; fix the weight_map")


def _check_total_size(index: dict | None, tensors: dict[str, TensorInfo], rep: VerifyReport) -> None:
    if index is None:
        return
    total = (index.get("metadata") or {}).get("total_size")
    have = sum(t.nbytes for t in tensors.values())
    if total != have:
        rep.error(f"{INDEX}: metadata.total_size = {total}, but the shards hold {have} bytes of tensors; "
                  f"set it to {have}")


# ----------------------------------------------------------------------------------------------------------------
# config.json

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
    return _CONFIG_DTYPES.get(str(d).replace("torch.", ""), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Tensor format

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


def row_chunks(shape: tuple[int, ...], block: int = BLOCK, budget: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """(start, rows) chunks of a [N, K] tensor, each a multiple of ``block`` rows (but the last), ~``budget``
    elements each; one chunk for a 1-D tensor."""
    n = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else n
    rows = n if len(shape) < 2 else max(block, (budget // max(cols, 1)) // block * block)
    for a in range(0, n, rows):
        yield a, min(rows, n - a)


# ----------------------------------------------------------------------------------------------------------------
# Against a source

def _open_source(source, rep: VerifyReport):
    """None, an HF checkpoint directory, or a reader with ``.names()``, ``.meta(name)`` and
    ``.read(name, dim, offset, length)`` (``hf_source.DictReader``-like) -> a reader, or None (errors reported)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from .hf_source import HFReader
    try:
        return HFReader(source)
    except (OSError, ValueError) as e:
        rep.error(f"--source: {e}")
        return None


def _read_rows(reader, name: str, start: int, rows: int, full_rows: int) -> torch.Tensor:
    if start == 0 and rows == full_rows:
        return reader.read(name)
    return reader.read(name, 0, start, rows)


class UntiedSource:
    """A source with tied embeddings (no lm_head.weight) seen with ``lm_head.weight`` = ``model.embed_tokens.weight``:
    the counterpart of an lm_head the export untied to quantize it."""

    def __init__(self, reader, head: str = "lm_head.weight", embed: str = "model.embed_tokens.weight"):
        self.reader, self.alias = reader, {head: embed}

    @classmethod
    def wrap(cls, reader):
        names = set(reader.names())
        return cls(reader) if "lm_head.weight" not in names and "model.embed_tokens.weight" in names else reader

    def names(self) -> list[str]:
        return list(self.reader.names()) + list(self.alias)

    def meta(self, name: str):
        return self.reader.meta(self.alias.get(name, name))

    def read(self, name: str, *args) -> torch.Tensor:
        return self.reader.read(self.alias.get(name, name), *args)


def compare_to_source(ck: Checkpoint, reader, dtype: torch.dtype, tied: bool, rep: VerifyReport) -> None:
    """Each tensor against the reference quantization (FP8) or the cast (others) of its source counterpart."""
    reader = UntiedSource.wrap(reader)
    src_names = set(reader.names())
    rep.compared = True
    for name, res in rep.tensors.items():
        if name not in src_names:
            rep.fail(name, f"tensor {name!r} has no counterpart in the source; it should not be in the checkpoint")
        elif res.status == "FAIL" and res.quantized:
            continue
        elif res.quantized:
            _compare_fp8(ck, reader, name, dtype, rep)
        else:
            _compare_plain(ck, reader, name, rep)
    missing = sorted(src_names - set(ck.tensors) - ({"lm_head.weight"} if tied else set()))
    if missing:
        rep.error(f"{len(missing)} source tensor(s) are missing from the checkpoint, e.g. {missing[:3]}; the export "
                  f"is incomplete")


def _source_shape(reader, name: str, want: tuple[int, ...], rep: VerifyReport) -> bool:
    shape = tuple(reader.meta(name)[0]) if hasattr(reader, "meta") else tuple(reader.read(name).shape)
    if shape != want:
        rep.fail(name, f"tensor {name!r} has shape {list(want)}, the source {list(shape)}; re-export it")
        return False
    return True


def _compare_plain(ck: Checkpoint, reader, name: str, rep: VerifyReport) -> None:
    t = ck.tensors[name]
    if not _source_shape(reader, name, t.shape, rep):
        return
    diff, worst = 0, 0.0
    for a, n in row_chunks(t.shape):
        out = ck.read(name, a, a + n) if len(t.shape) > 1 else ck.read(name)
        src = _read_rows(reader, name, a, n, t.shape[0]).to(out.dtype)
        ne = int((_bytes(out) != _bytes(src)).sum())
        if ne:
            diff += ne
            worst = max(worst, float((out.float() - src.float()).abs().nan_to_num(math.inf).max()))
    if diff:
        rep.fail(name, f"tensor {name!r} ({t.dtype}) differs from the source cast to {t.dtype} in {diff} byte(s), "
                       f"max |diff| {worst:.4g}; it must be the source tensor unchanged")
    elif rep.tensors[name].status != "FAIL":
        rep.tensors[name].status = "exact"


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """Any tensor -> its raw bytes as uint8 [nbytes]."""
    return x.contiguous().reshape(-1).view(torch.uint8)


def _compare_fp8(ck: Checkpoint, reader, name: str, dtype: torch.dtype, rep: VerifyReport) -> None:
    t = ck.tensors[name]
    if not _source_shape(reader, name, t.shape, rep):
        return
    sname = name + SCALE_SUFFIX
    res = rep.tensors[name]
    nbytes = nscales = 0
    ratio, where = 0.0, (0, 0)
    try:
        for a, n in row_chunks(t.shape):
            src = _read_rows(reader, name, a, n, t.shape[0]).to(dtype)
            q_ref, s_ref = quantize_blockfp8_reference(src, name=name)
            q = ck.read(name, a, a + n)
            s = ck.read(sname, a // BLOCK, -(-(a + n) // BLOCK))
            db = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            ds = int((s.view(torch.int32) != s_ref.view(torch.int32)).sum())
            nbytes, nscales = nbytes + db, nscales + ds
            if db or ds:
                r, (i, j) = _max_error_ratio(q, s, s_ref, src)
                if r > ratio:
                    ratio, where = r, (a + i, j)
    except ValueError as e:
        rep.fail(name, f"tensor {name!r}: the source cannot be quantized ({e})")
        return
    res.bytes_differing, res.scales_differing = nbytes, nscales
    if not nbytes and not nscales:
        res.status = "exact"
        return
    res.max_err_ratio = ratio
    detail = (f"{nbytes} of {math.prod(t.shape)} fp8 byte(s) and {nscales} block scale(s) differ from the reference "
              f"quantization of the source; max |dequant - source| = {ratio:.3g} x the e4m3 bound (16 x block scale) "
              f"at element {list(where)}")
    if ratio <= 1.0 + BOUND_SLACK:
        res.status, res.detail = "within-bound", detail
        rep.warn(f"tensor {name!r}: {detail}")
    else:
        rep.fail(name, f"tensor {name!r}: {detail}; the tensor is corrupt or wrongly scaled, re-export it")


def _max_error_ratio(q: torch.Tensor, s: torch.Tensor, s_ref: torch.Tensor,
                     src: torch.Tensor) -> tuple[float, tuple[int, int]]:
    """max over elements of |dequant(q, s) - src| / e4m3_error_bound(s_ref), and where (NaN counts as inf).

    q [n, K] fp8, s and s_ref [ceil(n/128), ceil(K/128)], src [n, K]. In float64, where the dequantization and the
    difference are exact: a round-half-to-even tie of the reference sits exactly at ratio 1.
    """
    deq = q.double() * dequantize_blockfp8(torch.ones_like(q, dtype=torch.float32), s, dtype=torch.float64)
    err = (deq - src.double()).abs()
    r = (err / e4m3_error_bound(s_ref, tuple(q.shape)).double()).nan_to_num(nan=math.inf)
    flat = int(r.argmax())
    return float(r.reshape(-1)[flat]), divmod(flat, q.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# Logits

def compare_logits(out_dir: str | os.PathLike, src_dir: str | os.PathLike, *, batch: int = 4, seq: int = 16,
                   seed: int = 0, max_rel_err: float = 0.1, min_top1: float = 0.9) -> dict:
    """Load both checkpoints with transformers on CPU (the FP8 one dequantized), run ``batch`` x ``seq`` seeded
    random token ids below vocab_size. Returns {rel_err = ||a-b||/||b||, top1 agreement, ok, thresholds}."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(out_dir))
    vocab = cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ref = _logits_of(src_dir, ids, None)
    out = _logits_of(out_dir, ids, getattr(cfg, "quantization_config", None))
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_err": rel, "top1": top1, "max_rel_err": max_rel_err, "min_top1": min_top1,
            "ok": rel <= max_rel_err and top1 >= min_top1, "batch": batch, "seq": seq, "seed": seed}


def _logits_of(path, ids: torch.Tensor, qc) -> torch.Tensor:
    """logits [batch, seq, vocab] float32 of the checkpoint at ``path`` (FP8 dequantized on load)."""
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
    del model
    return logits


# ----------------------------------------------------------------------------------------------------------------
# Serve- and transformers-check

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
    kv = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    rep.serve_required = sorted(set(serve_tp))
    for tp in sorted(set(serve_tp) | set(info_tp)):
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
    if rep.transformers:
        rep.warn(f"transformers-check: {len(rep.transformers)} layer(s) have dims that are not multiples of 128 "
                 f"(transformers cannot load them; vLLM/SGLang can), e.g. {rep.transformers[0]}")


# ----------------------------------------------------------------------------------------------------------------
# Entry points

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


__all__ = ["verify_checkpoint", "VerifyReport", "TensorResult", "compare_logits", "should_convert_module",
           "is_linear_weight", "main"]

if __name__ == "__main__":
    sys.exit(main())
