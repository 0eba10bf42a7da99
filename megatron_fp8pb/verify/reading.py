"""Reading a checkpoint directory: safetensors headers, the index (or a single file), lazy tensor access."""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_fp8pb.quant.reference import BLOCK
from megatron_fp8pb.safetensors_dtypes import itemsize
from .report import CHUNK_ELEMENTS, FP8, INDEX, SINGLE, SCALE_SUFFIX, TensorInfo, TensorResult, VerifyReport



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
        per = itemsize(h["dtype"])
        want = math.prod(shape) * (per or 0)
        if per is not None and stop - begin != want:
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
    """Headers of every shard, and the index checked against them (a lone ``model.safetensors`` needs none, as
    ``save_pretrained`` writes it for a small model). Returns name -> TensorInfo of what is there (natural order) and
    starts a per-tensor result for every tensor but the scales."""
    if not (out / INDEX).exists() and (out / SINGLE).is_file():
        index, weight_map = None, {}
        extra = sorted(p.name for p in out.glob("*.safetensors") if p.name != SINGLE)
        if extra:
            rep.error(f"{out} holds {SINGLE} and {extra} but no {INDEX}; loaders read only {SINGLE}: write the index "
                      f"or remove the other files")
    elif not (out / INDEX).exists() and not list(out.glob("*.safetensors")):
        rep.error(f"{out} holds neither {INDEX} nor {SINGLE}; pass the directory of an HF safetensors checkpoint")
        index, weight_map = None, {}
    else:
        index = _load_json(out / INDEX, rep,
                           "write the index {\"metadata\": {\"total_size\"}, \"weight_map\"} (re-export)")
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


def row_chunks(shape: tuple[int, ...], block: int = BLOCK, budget: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """(start, rows) chunks of a [N, K] tensor, each a multiple of ``block`` rows (but the last), ~``budget``
    elements each; one chunk for a 1-D tensor."""
    n = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else n
    rows = n if len(shape) < 2 else max(block, (budget // max(cols, 1)) // block * block)
    for a in range(0, n, rows):
        yield a, min(rows, n - a)
