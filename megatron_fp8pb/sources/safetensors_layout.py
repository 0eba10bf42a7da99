"""Where each tensor's bytes lie in a safetensors checkpoint directory (torch-free: read before torch is imported)."""
from __future__ import annotations

import json
from pathlib import Path


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    path = Path(path)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        return {n: path / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    if single.exists():
        return {n: single for n in header(single)[0]}
    other = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    if other:
        raise FileNotFoundError(f"source.path {path} holds {other[:3]} but no model.safetensors or "
                                f"model.safetensors.index.json, which the export reads: save the model with "
                                f"transformers' save_pretrained (safetensors) and point source.path at that directory")
    raise FileNotFoundError(f"source.path {path} holds no model.safetensors or model.safetensors.index.json; point "
                            f"source.path at an HF checkpoint directory")


def header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries and the byte where its data starts; refuses a truncated file by name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes does not fit a file of {size} bytes")
            entries = json.loads(fh.read(n))
        entries.pop("__metadata__", None)
        end = max((e["data_offsets"][1] for e in entries.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"its tensors end at byte {8 + n + end}, the file has {size}")
        return entries, 8 + n
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"source file {path} cannot be read as safetensors ({e}); it is truncated or corrupt") from e


def byte_ranges(path: str | Path) -> dict[str, tuple[Path, int, int]]:
    """Tensor name -> (file, first byte, length) of its data."""
    files = tensor_files(path)
    headers = {f: header(f) for f in set(files.values())}
    out = {}
    for name, f in files.items():
        entries, base = headers[f]
        if name in entries:
            a, b = entries[name]["data_offsets"]
            out[name] = (f, base + a, b - a)
    return out
