"""Comparing a checkpoint with its bf16 source: FP8 tensors against the reference quantization, the rest byte
for byte."""
from __future__ import annotations

import math
import os

import torch

from megatron_fp8pb.quant.reference import BLOCK, dequantize_blockfp8, e4m3_error_bound, quantize_blockfp8_reference
from .reading import Checkpoint, row_chunks
from .report import BOUND_SLACK, SCALE_SUFFIX, VerifyReport

def _open_source(source, rep: VerifyReport):
    """None, an HF checkpoint directory, or a reader with ``.names()``, ``.meta(name)`` and
    ``.read(name, dim, offset, length)`` (``hf_source.DictReader``-like) -> a reader, or None (errors reported)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from megatron_fp8pb.sources.hf import HFReader
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
            q_ref, s_ref = quantize_blockfp8_reference(src, name=name, scale_fmt=rep.scale_fmt)
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
    if ratio <= 1.0 + BOUND_SLACK and rep.tolerance == "bound":
        res.status, res.detail = "within-bound", detail
        rep.warn(f"tensor {name!r}: {detail}")
    elif ratio <= 1.0 + BOUND_SLACK:
        rep.fail(name, f"tensor {name!r}: {detail}: within the e4m3 bound, but not the reference quantization")
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
