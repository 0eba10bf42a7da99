"""Tiny FP8 checkpoints for the verify tests: a qwen3 source and its export written in-process (any scale format),
and byte-level edits of an output's safetensors. The fixtures using them are in conftest.py."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_fp8pb.quant.reference import quantize_blockfp8
from megatron_fp8pb.output.hf_files import config_json, quantization_config
from megatron_fp8pb.verify import INDEX, is_linear_weight, module_of, should_convert_module
from megatron_fp8pb.output.writer import CheckpointWriter, TensorSpec

Q = "model.layers.0.mlp.gate_proj.weight"          # [1152, 384] -> scale [9, 3]
NOT_CONVERTED = ["lm_head"]


def write_source(cfg, state: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True)
    cfg.save_pretrained(str(path))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def output_tensors(state: dict[str, torch.Tensor], skip: list[str] = NOT_CONVERTED,
                   scale_fmt: str = "amax") -> dict[str, torch.Tensor]:
    out = {}
    for name, w in state.items():
        if is_linear_weight(name, tuple(w.shape)) and should_convert_module(module_of(name), skip):
            out[name], out[name + "_scale_inv"] = quantize_blockfp8(w, name=name, scale_fmt=scale_fmt)
        else:
            out[name] = w
    return out


def write_output(cfg, state: dict[str, torch.Tensor], path: Path, skip: list[str] = NOT_CONVERTED,
                 scale_fmt: str = "amax", qc_fmt: str | None = None) -> Path:
    """An output quantized with ``scale_fmt`` whose config.json says ``qc_fmt`` (default: the same)."""
    tensors = output_tensors(state, skip, scale_fmt)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = CheckpointWriter(path, specs, max_shard_size="1MB")
    for n, t in tensors.items():
        w.write(n, t)
    qc = quantization_config(skip, True, qc_fmt or scale_fmt)
    w.finish({"config.json": config_json(cfg, cfg.vocab_size, False, torch.bfloat16, qc)})
    return path


def tiny_checkpoint(root: Path, scale_fmt: str = "amax"):
    """(cfg, state, source dir, FP8 output dir) of the tiny qwen3 under ``root``, its scales in ``scale_fmt``."""
    from megatron_fp8pb.sources.tiny import random_hf_state, tiny_hf_config
    cfg = tiny_hf_config("qwen3")
    state = random_hf_state(cfg)
    src = write_source(cfg, state, root / "src")
    return cfg, state, src, write_output(cfg, state, root / "out", scale_fmt=scale_fmt)


def read_index(out: Path) -> dict:
    return json.loads((out / INDEX).read_text())


def file_of(out: Path, name: str) -> Path:
    return out / read_index(out)["weight_map"][name]


def data_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def patch(out: Path, name: str, at: int, data: bytes) -> None:
    """Overwrite bytes of tensor ``name`` in place, ``at`` bytes into its data."""
    path = file_of(out, name)
    with open(path, "r+b") as f:
        f.seek(data_offset(path, name) + at)
        f.write(data)


def rewrite(out: Path, name: str, edit) -> None:
    """Load the shard holding ``name``, let ``edit(tensors)`` change it, save it and keep the index consistent."""
    path = file_of(out, name)
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    idx = read_index(out)
    wm = {n: f for n, f in idx["weight_map"].items() if f != path.name or n in tensors}
    wm.update({n: path.name for n in tensors})
    total = 0
    for f in set(wm.values()):
        total += sum(t.numel() * t.element_size() for t in load_file(str(out / f)).values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
