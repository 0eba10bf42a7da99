"""The verify report: per-tensor results, errors and warnings, the human table and the JSON form."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from megatron_fp8pb.quant.format import FORMAT
from megatron_fp8pb.safetensors_dtypes import code_of
from megatron_fp8pb.verify.serve_check import Problem

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = FORMAT.scale_suffix
FP8 = code_of(FORMAT.fp8_dtype)

DEFAULT_INFO_TP = (1, 2, 4, 8)
CHUNK_ELEMENTS = 1 << 25
BOUND_SLACK = 1e-5          # float32 division in the quantizer may land a hair past a rounding tie


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
    serve: dict[int, list[Problem]] = field(default_factory=dict)
    serve_required: list[int] = field(default_factory=list)
    fused_partial: list[Problem] = field(default_factory=list)
    transformers: list[Problem] = field(default_factory=list)
    logits: dict | None = None
    compared: bool = False
    scale_fmt: str = "amax"     # quantization_config.scale_fmt ("ue8m0": every block scale a power of two)
    tolerance: str = "exact"                # "exact": a differing fp8 byte fails; "bound": within e4m3 bound passes
    transformers_load: dict | None = None   # the meta-device load: {"missing", "unexpected", "mismatched", "error"}
    transformers_required: bool = False     # quant.serve_tp=transformers: its dequantize problems are errors

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

    def table(self, max_lines: int = 20, json_path: str | None = None) -> str:
        """A short human summary: tensor counts, serve-check per TP, transformers, logits, then warnings and errors
        grouped across layers, and the fix."""
        c = self.counts()
        head = "OK" if self.ok else f"FAILED ({len(self.errors)} error(s))"
        vs = "the reference quantization of the source, byte for byte" if self.compared else "no --source"
        lines = [f"verify {self.out_dir}: {head}",
                 f"  tensors checked      {c['checked']}",
                 f"  quantized (fp8)      {c['quantized']}",
                 f"  exact                {c['exact'] if self.compared else '-'}  ({vs})",
                 f"  within e4m3 bound    {c['within_bound'] if self.compared else '-'}"
                 f"{'  (allowed: --tolerance bound)' if self.tolerance == 'bound' else ''}",
                 f"  failed               {c['failed']}"]
        if self.scale_fmt != "amax":
            lines.append(f"  scale_fmt            {self.scale_fmt} (every block scale a power of two)")
        for tp in sorted(self.serve):
            probs = self.serve[tp]
            tag = " (required)" if tp in self.serve_required else ""
            verdict = "OK" if not probs else f"refused: {len(probs)} layer(s), e.g. {probs[0]}"
            lines.append(f"  serve tp={tp:<3}         {verdict}{tag}")
        if self.fused_partial:
            lines.append(f"  fused modules        {len(self.fused_partial)} partly quantized (refused at any tp)")
        lines.append(f"  transformers load    {_load_line(self.transformers_load)}")
        if self.transformers_load is not None:
            tf = "OK" if not self.transformers else (
                f"{len(self.transformers)} quantized weight(s) with rows/cols not multiples of 128 dequantized wrong "
                f"or refused (vLLM/SGLang are fine), e.g. {self.transformers[0].module}")
            lines.append(f"  transformers dequant {tf}{' (required)' if self.transformers_required else ''}")
        if self.logits is not None:
            lines += _logits_lines(self.logits)
        more = (f"all of them in {json_path}" if json_path else
                "megatron-fp8pb-verify --json REPORT.json lists all of them")
        other = [w for w in self.warnings if not w.startswith(("serve-check", "transformers-check"))]
        lines += _grouped("warning", other, max_lines, more)
        lines += _grouped("error", self.errors, max_lines, more)
        fixes = self.fixes()
        if fixes:
            lines.append(f"  fix: {'; '.join(fixes)}")
        return "\n".join(lines)

    def fixes(self) -> list[str]:
        """What to do about the errors that share one remedy (other errors say their own fix)."""
        out = []
        if any(e.startswith("serve-check:") for e in self.errors) and self.serve_required:
            out.append(f"re-export with quant.serve_tp={','.join(map(str, self.serve_required))}"
                       f"{',transformers' if self.transformers_required else ''}")
        elif any(e.startswith("transformers-check:") for e in self.errors):
            out.append("re-export with quant.serve_tp=transformers")
        if any("within the e4m3 bound" in e for e in self.errors):
            out.append("re-export with this tool for byte-exact tensors, or pass --tolerance bound for a checkpoint "
                       "made by a tool that rounds differently")
        return out

    def to_json(self) -> dict:
        return {"ok": self.ok, "out_dir": self.out_dir, "source": self.source, "scale_fmt": self.scale_fmt,
                "counts": self.counts(),
                "errors": list(self.errors), "warnings": list(self.warnings),
                "tensors": [asdict(r) for r in self.tensors.values()],
                "serve": {str(tp): {"required": tp in self.serve_required, "ok": not probs,
                                    "problems": [p.to_json() for p in probs]} for tp, probs in self.serve.items()},
                "fused_partial": [p.to_json() for p in self.fused_partial],
                "transformers": [p.to_json() for p in self.transformers],
                "transformers_load": self.transformers_load, "tolerance": self.tolerance,
                "logits": self.logits}


_LAYER = re.compile(r"\.(layers|experts)\.(\d+)\.")


def _grouped(kind: str, messages: list[str], max_lines: int, more: str) -> list[str]:
    """One line per distinct message once layer and expert numbers are replaced by ``*``, with how many it stands
    for and which numbers: ``error: (36x) serve-check: model.layers.*.self_attn.k_proj at tp=2: ... [layers 0-35]``.

    A message that no other shares up to those numbers is printed as it is, naming its own layer.
    """
    groups: dict[str, list[str]] = {}
    for m in messages:
        groups.setdefault(_LAYER.sub(lambda g: f".{g.group(1)}.*.", m), []).append(m)
    lines = []
    for key, found in list(groups.items())[:max_lines]:
        count = f"({len(found)}x) " if len(found) > 1 else ""
        if len(set(found)) == 1:
            lines.append(f"  {kind}: {count}{found[0]}")
        else:
            lines.append(f"  {kind}: {count}{key} [{_numbers(found)}]")
    if len(groups) > max_lines:
        rest = sum(len(v) for v in list(groups.values())[max_lines:])
        lines.append(f"  ... and {rest} more {kind}(s) ({more})")
    return lines


def _numbers(messages: list[str]) -> str:
    """The layer and expert numbers the ``*`` of a group stands for: ``layers 0-3, 7; experts 0-127``."""
    seen: dict[str, set[int]] = {}
    for m in messages:
        for axis, n in _LAYER.findall(m):
            seen.setdefault(axis, set()).add(int(n))
    return "; ".join(f"{axis} {_ranges(sorted(ns))}" for axis, ns in seen.items())


def _ranges(ns: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> ``0-2, 5, 7-8``."""
    runs: list[list[int]] = []
    for n in ns:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _load_line(ld: dict | None) -> str:
    if ld is None:
        return "-  (not checked)"
    if ld.get("skipped"):
        return f"-  (skipped: {ld['skipped']})"
    if ld.get("error"):
        return f"FAILED: {ld['error']}"
    bad = {k: ld[k] for k in ("missing", "unexpected", "mismatched") if ld.get(k)}
    if not bad:
        return f"OK  (every tensor maps to a parameter of {ld.get('model', 'the model')}, built on the meta device)"
    return "FAILED: " + ", ".join(f"{len(v)} {k} key(s), e.g. {v[:2]}" for k, v in bad.items())


def _logits_lines(lg: dict) -> list[str]:
    """The logits block of the table: the checkpoint and the reference quantization against bf16, the verdict and
    the rule it follows."""
    if "error" in lg:
        return [f"  logits               FAILED: {lg['error']}"]
    if not lg["ok"]:
        verdict = "FAILED: further from bf16 than the reference quantization of the source (the rule below)"
    elif lg["to_ref"] == lg["w8a8_to_ref"] == 0:
        verdict = "OK: identical to the reference quantization of the source (what this format reaches)"
    else:
        verdict = "OK: within the slack of the reference quantization of the source (what this format reaches)"
    lines = [f"  logits               {verdict}",
             "    against bf16       checkpoint rel err, top-1   reference rel err, top-1   checkpoint vs reference"]
    for kind, tag in (("W8A16", ""), ("W8A8", "w8a8_")):
        to_ref = lg[tag + "to_ref"]
        lines.append(f"    {kind:<18} {lg[tag + 'rel_err']:<9.4g} {lg[tag + 'top1']:<17.3f} "
                     f"{lg['ref_' + tag + 'rel_err']:<9.4g} {lg['ref_' + tag + 'top1']:<16.3f} "
                     f"{'identical' if to_ref == 0 else f'rel diff {to_ref:.3g}'}")
    lines += [f"    on {lg['batch']} x {lg['seq']} seeded random token ids; rel err = ||logits - bf16|| / ||bf16||; "
              f"top-1 = share of argmax equal to bf16's",
              f"    fails when the checkpoint's rel err > the reference's x {1 + lg['rel_err_slack']:g} or its top-1 < "
              f"the reference's - {lg['top1_slack']:g}",
              "    the reference's numbers are the format's cost on this model: reported, never failed (on nearly flat",
              "    logits, as random weights give, FP8 rounding alone moves top-1)"]
    return lines
