"""Reading an HF checkpoint lazily (only the slices a rank needs), and the HF config of a source."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .plan import Piece


class HFReader:
    """Tensors of an HF safetensors checkpoint directory, read slice by slice."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            self.files = {n: self.path / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.exists():
            self.files = {n: single for n in _keys(single)}
        else:
            raise FileNotFoundError(f"source.path {self.path} holds no model.safetensors or "
                                    f"model.safetensors.index.json; point source.path at an HF checkpoint directory")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def _open(self, name: str):
        from safetensors import safe_open
        if name not in self.files:
            raise KeyError(f"source {self.path} has no tensor {name!r}")
        f = self.files[name]
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"source file {f} cannot be read as safetensors ({e}); it is truncated or "
                                 f"corrupt") from e
        return self._handles[f]

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._open(name).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str, dim: int = 0, offset: int = 0, length: int | None = None) -> torch.Tensor:
        sl = self._open(name).get_slice(name)
        shape = sl.get_shape()
        length = shape[dim] - offset if length is None else length
        try:
            if len(shape) == 1:
                return sl[offset:offset + length]
            return sl[offset:offset + length] if dim == 0 else sl[:, offset:offset + length]
        except Exception as e:
            raise ValueError(f"source tensor {name!r} in {self.files[name]} cannot be read ({e}); the file is "
                             f"truncated or corrupt") from e


class DictReader:
    """The same interface over an in-memory HF state dict (the embedded tiny source)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        t = self.state[name]
        return tuple(t.shape), str(t.dtype)

    def read(self, name: str, dim: int = 0, offset: int = 0, length: int | None = None) -> torch.Tensor:
        if name not in self.state:
            raise KeyError(f"source has no tensor {name!r}")
        t = self.state[name]
        length = t.shape[dim] - offset if length is None else length
        return t.narrow(dim, offset, length)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise ValueError(f"source file {path} cannot be read as safetensors ({e}); it is truncated or corrupt") from e


_DTYPE_NAMES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}


def check_source(reader, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor the architecture needs is present, float, and of the shape the config implies."""
    have = set(reader.names())
    missing = sorted(set(expected) - have)
    if missing:
        raise ValueError(f"source {where} lacks {len(missing)} tensor(s) the config implies, e.g. {missing[:5]}")
    for name, shape in expected.items():
        got, dtype = reader.meta(name)
        if tuple(got) != tuple(shape):
            raise ValueError(f"source tensor {name!r} has shape {tuple(got)}, but the config implies {tuple(shape)};"
                             f" the config.json and the weights disagree")
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"source tensor {name!r} has dtype {dtype}; expected a float dtype (BF16/F16/F32)")


def read_slice(reader, p: Piece) -> torch.Tensor:
    return reader.read(p.hf_name, p.dim if len(p.full_shape) > 1 else 0, p.offset, p.length)


def hf_config(path: str | os.PathLike):
    from transformers import AutoConfig
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json; an HF checkpoint directory (source.path with "
                                f"source.kind=hf) or source.hf_config (source.kind=megatron) must hold one")
    return AutoConfig.from_pretrained(str(p))


def config_dtype(cfg) -> torch.dtype:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.bfloat16
    if isinstance(d, str):
        d = _DTYPE_NAMES.get(d, None) or getattr(torch, d)
    return d
