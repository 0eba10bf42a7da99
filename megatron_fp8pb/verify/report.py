"""The verify report: per-tensor results, errors and warnings, the human table and the JSON form."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .. import serve_check

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8 = "F8_E4M3"

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
